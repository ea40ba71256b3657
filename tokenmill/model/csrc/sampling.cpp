// Sampling from fp32 logits rows: temperature, top-k, top-p, min-p and an inverse-CDF draw
// with a given uniform per row, all in one pass set per row (rows in parallel).
//
// Same semantics as the torch path in tokenmill/model/sampler.py (which is its reference):
// top-k, then top-p on the mass left after top-k, then min-p relative to the most likely
// token; the draw picks the first survivor whose running sum exceeds u * (survivor mass).
//
// Structured output: an optional token bitmask (xgrammar's packed layout, int32 words, bit
// t % 32 of word t / 32 set when token t is allowed) removes tokens in the same pass that
// computes the weights (a masked token weighs 0 and never sets the maximum), so constrained
// rows cost no extra pass over the logits. A row whose mask allows nothing is sampled as if
// unmasked. A temperature of 0 takes the (masked) argmax.

#include "ops.h"
#include "simd.h"

namespace tokenmill {
namespace {

// top-k / top-p first look at tokens within these factors of the most likely one (see
// sampler.py); the last resort is every token
constexpr float CAND_THRESHOLDS[] = {1e-3f, 1e-6f, 0.f};

struct Cand {
  float w;
  int32_t id;
};

inline bool heavier(const Cand& a, const Cand& b) { return a.w > b.w || (a.w == b.w && a.id < b.id); }

// token t allowed by a packed bitmask row (null: every token is)
inline bool allowed(const int32_t* mask, int64_t t) {
  return !mask || ((static_cast<uint32_t>(mask[t >> 5]) >> (t & 31)) & 1u);
}

#if TM_AVX512
// the mask bits of tokens [i, i + 16), i a multiple of 16
inline __mmask16 mask16(const int32_t* mask, int64_t i) {
  return mask ? static_cast<__mmask16>(static_cast<uint32_t>(mask[i >> 5]) >> (i & 31)) : 0xFFFF;
}
#endif

// whether the mask allows any of the V tokens
bool any_allowed(const int32_t* mask, int64_t V) {
  const int64_t words = V >> 5;
  for (int64_t j = 0; j < words; ++j)
    if (mask[j]) return true;
  for (int64_t t = words << 5; t < V; ++t)
    if (allowed(mask, t)) return true;
  return false;
}

// the first index of the largest allowed x
int64_t masked_argmax(const float* x, int64_t V, const int32_t* mask) {
  int64_t best = -1;
  for (int64_t i = 0; i < V; ++i)
    if (allowed(mask, i) && (best < 0 || x[i] > x[best])) best = i;
  return best < 0 ? 0 : best;
}

// w[i] = exp((x[i] - max) / t), zeroed below min_p (the most likely token has weight 1) and
// where the mask (if any) disallows i; the max is over allowed tokens. Returns the sum of w.
double weights(const float* x, int64_t V, float temperature, float min_p, float* w,
               const int32_t* mask) {
  float mx = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
#if TM_AVX512
  __m512 vmax = _mm512_set1_ps(mx);
  for (; i + 16 <= V; i += 16) vmax = _mm512_mask_max_ps(vmax, mask16(mask, i), vmax, _mm512_loadu_ps(x + i));
  mx = _mm512_reduce_max_ps(vmax);
#endif
  for (; i < V; ++i)
    if (allowed(mask, i)) mx = std::max(mx, x[i]);
  const float inv_t = 1.f / temperature;
  double total = 0.0;
  i = 0;
#if TM_AVX512
  const __m512 vmx = _mm512_set1_ps(mx), vit = _mm512_set1_ps(inv_t), vmin = _mm512_set1_ps(min_p);
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= V; i += 16) {
    __m512 e = exp16(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), vmx), vit));
    e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(e, vmin, _CMP_GE_OQ) & mask16(mask, i), e);
    _mm512_storeu_ps(w + i, e);
    acc = _mm512_add_ps(acc, e);
  }
  total = _mm512_reduce_add_ps(acc);
#endif
  for (; i < V; ++i) {
    const float e = allowed(mask, i) ? std::exp((x[i] - mx) * inv_t) : 0.f;
    w[i] = e >= min_p ? e : 0.f;
    total += w[i];
  }
  return total;
}

// first index whose running sum of w exceeds target (blocks of 16 summed first)
int64_t draw(const float* w, int64_t V, double target) {
  double run = 0.0;
  int64_t i = 0;
#if TM_AVX512
  for (; i + 16 <= V; i += 16) {
    const double block = _mm512_reduce_add_ps(_mm512_loadu_ps(w + i));
    if (run + block > target) break;
    run += block;
  }
#endif
  int64_t last = -1;
  for (; i < V; ++i) {
    if (w[i] <= 0.f) continue;
    run += w[i];
    last = i;
    if (run > target) return i;
  }
  if (last >= 0) return last;  // rounding put target at the total: the last survivor
  for (int64_t j = V - 1; j >= 0; --j)
    if (w[j] > 0.f) return j;
  return 0;
}

// tokens with w >= thr, most likely first not guaranteed; returns their mass
double collect(const float* w, int64_t V, float thr, std::vector<Cand>& cand) {
  cand.resize(V);
  std::vector<int32_t> ids;
  int64_t n = 0;
  double mass = 0.0;
  int64_t i = 0;
#if TM_AVX512
  alignas(64) float wbuf[16];
  alignas(64) int32_t ibuf[16];
  const __m512 vthr = _mm512_set1_ps(thr);
  __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  for (; i + 16 <= V; i += 16, idx = _mm512_add_epi32(idx, step)) {
    const __m512 v = _mm512_loadu_ps(w + i);
    const __mmask16 m = _mm512_cmp_ps_mask(v, vthr, _CMP_GE_OQ) & _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GT_OQ);
    if (!m) continue;
    _mm512_mask_compressstoreu_ps(wbuf, m, v);
    _mm512_mask_compressstoreu_epi32(ibuf, m, idx);
    const int c = __builtin_popcount(m);
    for (int j = 0; j < c; ++j) cand[n++] = {wbuf[j], ibuf[j]}, mass += wbuf[j];
  }
#endif
  for (; i < V; ++i)
    if (w[i] >= thr && w[i] > 0.f) cand[n++] = {w[i], static_cast<int32_t>(i)}, mass += w[i];
  cand.resize(n);
  return mass;
}

// The survivors of top-k / top-p are the tokens whose (weight, -id) key is at least the
// cutoff's: found by selection, never by sorting the vocabulary, and drawn in id order.
int64_t sample_row(const float* x, int64_t V, float temperature, int64_t top_k, float top_p,
                   float min_p, float u, const int32_t* mask, std::vector<float>& w,
                   std::vector<Cand>& cand) {
  if (mask && !any_allowed(mask, V)) mask = nullptr;
  if (temperature <= 0.f) return masked_argmax(x, V, mask);
  w.resize(V);
  const bool use_k = top_k > 0 && top_k < V;
  if (!use_k && top_p >= 1.f) {
    const double total = weights(x, V, temperature, min_p, w.data(), mask);
    return draw(w.data(), V, u * total);
  }
  const double total = weights(x, V, temperature, 0.f, w.data(), mask);
  for (float thr : CAND_THRESHOLDS) {
    const double cmass = collect(w.data(), V, thr, cand);
    if (use_k ? static_cast<int64_t>(cand.size()) >= top_k : cmass >= top_p * total) break;
  }
  int64_t n = static_cast<int64_t>(cand.size());
  double mass = total;  // top-p is relative to the mass left after top-k
  if (use_k && n > top_k) {
    std::nth_element(cand.begin(), cand.begin() + (top_k - 1), cand.end(), heavier);
    n = top_k;
  }
  if (use_k) {
    mass = 0.0;
    for (int64_t j = 0; j < n; ++j) mass += cand[j].w;
  }
  // cand[0, keep) are the survivors in no particular order; cut = the lightest of them
  int64_t keep = n;
  if (top_p < 1.f) {
    // weighted quickselect: keep a token iff the mass of heavier tokens is < top_p * mass
    const double limit = top_p * mass;
    int64_t lo = 0, hi = n;
    double ahead = 0.0;  // mass of cand[0, lo), all heavier than cand[lo, hi)
    while (lo < hi) {
      std::swap(cand[lo + (hi - lo) / 2], cand[hi - 1]);
      const Cand pivot = cand[hi - 1];
      const auto mid = std::partition(cand.begin() + lo, cand.begin() + hi - 1,
                                      [&](const Cand& c) { return heavier(c, pivot); });
      const int64_t m = mid - cand.begin();
      double heavy = 0.0;
      for (int64_t j = lo; j < m; ++j) heavy += cand[j].w;
      if (ahead + heavy >= limit) {
        hi = m;  // the pivot is cut: the boundary lies among the heavier ones
      } else {
        std::swap(cand[m], cand[hi - 1]);  // the pivot is kept: it goes right after them
        ahead += heavy + pivot.w;
        lo = m + 1;
      }
    }
    keep = std::max<int64_t>(lo, 1);
  }
  Cand cut = cand[0];
  for (int64_t j = 1; j < keep; ++j)
    if (heavier(cut, cand[j])) cut = cand[j];
  // draw in id order among tokens at or above the cut (and min-p)
  const float floor_w = std::max(min_p, 0.f);
  auto survives = [&](int64_t i) {
    const float wi = w[i];
    return wi >= floor_w && (wi > cut.w || (wi == cut.w && i <= cut.id));
  };
  double kept = 0.0;
  int64_t last = cut.id;
  for (int64_t i = 0; i < V; ++i)
    if (w[i] >= cut.w && survives(i)) kept += w[i], last = i;
  if (kept <= 0.0) return cand[0].id;  // min-p removed everything: cannot happen (max is 1)
  const double target = u * kept;
  double run = 0.0;
  for (int64_t i = 0; i < V; ++i) {
    if (w[i] < cut.w || !survives(i)) continue;
    run += w[i];
    if (run > target) return i;
  }
  return last;
}

}  // namespace

Tensor sample_rows(const Tensor& logits, const Tensor& temperature, const Tensor& top_k,
                   const Tensor& top_p, const Tensor& min_p, const Tensor& u,
                   const std::optional<Tensor>& bitmask) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.scalar_type() == at::kFloat,
              "sample_rows: contiguous float32 logits [rows, vocab]");
  const int64_t rows = logits.size(0), V = logits.size(1);
  for (const Tensor* t : {&temperature, &top_p, &min_p, &u})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == rows && t->scalar_type() == at::kFloat &&
                    t->is_contiguous(),
                "sample_rows: per-row float32 parameters");
  TORCH_CHECK(top_k.dim() == 1 && top_k.size(0) == rows && top_k.scalar_type() == at::kLong &&
                  top_k.is_contiguous(),
              "sample_rows: per-row int64 top_k");
  const int32_t* mp32 = nullptr;  // the token bitmask rows, if any
  int64_t words = 0;
  if (bitmask.has_value() && bitmask->defined()) {
    words = (V + 31) / 32;
    TORCH_CHECK(bitmask->dim() == 2 && bitmask->size(0) == rows && bitmask->size(1) >= words &&
                    bitmask->scalar_type() == at::kInt && bitmask->is_contiguous(),
                "sample_rows: contiguous int32 bitmask [rows, >= ceil(vocab / 32)]");
    words = bitmask->size(1);
    mp32 = bitmask->data_ptr<int32_t>();
  }
  Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  const float* xp = logits.data_ptr<float>();
  const float *tp = temperature.data_ptr<float>(), *pp = top_p.data_ptr<float>(),
              *mp = min_p.data_ptr<float>(), *up = u.data_ptr<float>();
  const int64_t* kp = top_k.data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  const int nt = rows > 1 ? num_threads() : 1;
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> w;
    std::vector<Cand> cand;
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < rows; ++r)
      op[r] = sample_row(xp + r * V, V, tp[r], kp[r], pp[r], mp[r], up[r],
                         mp32 ? mp32 + r * words : nullptr, w, cand);
  }
  return out;
}

}  // namespace tokenmill
