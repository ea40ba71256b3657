// Mixture-of-experts MLP: the tokens routed to each expert are grouped, then every expert's
// SwiGLU runs as two grouped GEMMs over its packed weights (fp32 / bf16, or int8 with one
// fp32 scale per output channel), and each token sums its top-k expert outputs.
//
// Expert weights use the packed panel layout of the dense GEMM ([P, K, 16], gemm_kernels.h):
// w13 = [gate; up] with gate and up interleaved in 16-row panels (the fused SiLU-gate
// epilogue writes SiLU(gate) * up), w2 = down. One parallel loop covers all experts' tiles
// (expert x row chunk x panel group), so a decode step with a few tokens on each of several
// experts keeps every thread streaming weights, and no Python loop visits the experts.

#include "gemm_kernels.h"
#include "ops.h"
#include "simd.h"

namespace tokenmill {
namespace {

constexpr int MOE_MAX_MR = 6;
constexpr int64_t MOE_M_CHUNK = 96;  // rows per tile: the tile's x rows stay in L2

template <int NP, typename W>
inline void moe_rows(int mr, const float* x, int64_t K, const W* w, const float* scale, float* y,
                     int64_t N, int64_t n0, bool silu) {
  const float* no_bias = nullptr;
  switch (mr) {
#define TM_MR(R) \
  case R: micro_kernel<R, NP, W, float>(x, K, w, scale, no_bias, y, N, n0, nullptr, 0, silu); break;
    TM_MR(1) TM_MR(2) TM_MR(3) TM_MR(4) TM_MR(5)
#undef TM_MR
    default: micro_kernel<6, NP, W, float>(x, K, w, scale, no_bias, y, N, n0, nullptr, 0, silu); break;
  }
}

struct Tile {
  int32_t expert, p0, np;
  int64_t m0, m1;
};

// y[rows of e] = x[rows of e] @ W_e^T for every expert e (rows of e: [offsets[e], offsets[e+1]));
// with ``silu`` W_e is an interleaved [gate; up] of N = 2I outputs and y gets SiLU(gate) * up.
template <typename W>
void grouped_gemm(const float* x, int64_t K, const std::vector<const W*>& w,
                  const std::vector<const float*>& scale, const std::vector<int64_t>& offsets,
                  int64_t N, bool silu, float* y) {
  const int64_t P = (N + PANEL - 1) / PANEL;
  const int64_t out_w = silu ? N / 2 : N;
  const int64_t experts = static_cast<int64_t>(w.size());
  const int nt_max = num_threads();
  int64_t row_tiles = 0;
  for (int64_t e = 0; e < experts; ++e)
    row_tiles += (offsets[e + 1] - offsets[e] + MOE_M_CHUNK - 1) / MOE_M_CHUNK;
  // widest panel group that still leaves every thread a few tiles (a SiLU-gated product needs
  // whole (gate, up) panel pairs: 2 at least)
  int np = silu ? 2 : 1;
  for (int cand : {4, 2})
    if (row_tiles * ((P + cand - 1) / cand) >= 4 * nt_max) {
      np = cand;
      break;
    }
  std::vector<Tile> tiles;
  tiles.reserve(static_cast<size_t>(row_tiles * ((P + np - 1) / np)));
  for (int64_t e = 0; e < experts; ++e)
    for (int64_t m0 = offsets[e]; m0 < offsets[e + 1]; m0 += MOE_M_CHUNK)
      for (int64_t p0 = 0; p0 < P; p0 += np)
        tiles.push_back({static_cast<int32_t>(e), static_cast<int32_t>(p0),
                         static_cast<int32_t>(std::min<int64_t>(np, P - p0)), m0,
                         std::min(offsets[e + 1], m0 + MOE_M_CHUNK)});
  const int64_t n_tiles = static_cast<int64_t>(tiles.size());
  const int64_t rows = offsets[experts];
  const int nt = (rows * N * K >= (1 << 16) && n_tiles > 1) ? nt_max : 1;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t t = 0; t < n_tiles; ++t) {
    const Tile& tile = tiles[t];
    const W* wt = w[tile.expert] + static_cast<int64_t>(tile.p0) * K * PANEL;
    const float* sc = scale[tile.expert];
    const int64_t n0 = static_cast<int64_t>(tile.p0) * PANEL;
    // split the tile's rows evenly into blocks of at most MOE_MAX_MR (as the dense GEMM)
    const int64_t m_rows = tile.m1 - tile.m0;
    const int64_t blocks = (m_rows + MOE_MAX_MR - 1) / MOE_MAX_MR;
    for (int64_t b = 0, m = tile.m0; b < blocks; ++b) {
      const int mr = static_cast<int>(m_rows / blocks + (b < m_rows % blocks ? 1 : 0));
      const float* xm = x + m * K;
      float* ym = y + m * out_w;
      switch (tile.np) {
        case 4: moe_rows<4, W>(mr, xm, K, wt, sc, ym, N, n0, silu); break;
        case 3: moe_rows<3, W>(mr, xm, K, wt, sc, ym, N, n0, silu); break;
        case 2: moe_rows<2, W>(mr, xm, K, wt, sc, ym, N, n0, silu); break;
        default: moe_rows<1, W>(mr, xm, K, wt, sc, ym, N, n0, silu); break;
      }
      m += mr;
    }
  }
}

template <typename W>
void run_experts(const float* xs, int64_t H, int64_t inter, at::TensorList w13, at::TensorList w2,
                 at::TensorList s13, at::TensorList s2, const std::vector<int64_t>& offsets,
                 float* act, float* ys) {
  const size_t E = w13.size();
  std::vector<const W*> p13(E), p2(E);
  std::vector<const float*> q13(E, nullptr), q2(E, nullptr);
  for (size_t e = 0; e < E; ++e) {
    p13[e] = static_cast<const W*>(w13[e].data_ptr());
    p2[e] = static_cast<const W*>(w2[e].data_ptr());
    if (!s13.empty()) {
      q13[e] = s13[e].data_ptr<float>();
      q2[e] = s2[e].data_ptr<float>();
    }
  }
  grouped_gemm<W>(xs, H, p13, q13, offsets, 2 * inter, true, act);
  grouped_gemm<W>(act, inter, p2, q2, offsets, H, false, ys);
}

// out[t] = sum over t's experts in ascending expert order of weight * y (as transformers adds
// them), rounding each partial sum to T like an accumulation in a T tensor
template <typename T>
void combine(const float* ys, const std::vector<int64_t>& slot, const int64_t* ids,
             const float* weights, int64_t tokens, int64_t k, int64_t H, T* out) {
  const int nt = tokens * H >= 65536 ? num_threads() : 1;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t t = 0; t < tokens; ++t) {
    int64_t order[64];
    for (int64_t j = 0; j < k; ++j) order[j] = j;
    std::sort(order, order + k, [&](int64_t a, int64_t b) { return ids[t * k + a] < ids[t * k + b]; });
    T* o = out + t * H;
    for (int64_t i = 0; i < H; ++i) {
      float acc = 0.f;
      for (int64_t jj = 0; jj < k; ++jj) {
        const int64_t j = order[jj];
        const float y = to_f(from_f<T>(ys[slot[t * k + j] * H + i]));  // the expert's output in T
        acc = to_f(from_f<T>(acc + to_f(from_f<T>(y * weights[t * k + j]))));
      }
      o[i] = from_f<T>(acc);
    }
  }
}

}  // namespace

Tensor moe_experts(const Tensor& x, const Tensor& topk_ids, const Tensor& topk_weights,
                   at::TensorList w13, at::TensorList w2, at::TensorList s13, at::TensorList s2,
                   int64_t inter) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "moe_experts: contiguous float32 / bfloat16 x [T, H]");
  const int64_t T_ = x.size(0), H = x.size(1);
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == T_ && topk_ids.is_contiguous() &&
                  topk_ids.scalar_type() == at::kLong,
              "moe_experts: topk_ids int64 [T, k]");
  const int64_t k = topk_ids.size(1);
  TORCH_CHECK(k >= 1 && k <= 64, "moe_experts: 1 <= top_k <= 64");
  TORCH_CHECK(topk_weights.sizes() == topk_ids.sizes() && topk_weights.is_contiguous() &&
                  topk_weights.scalar_type() == at::kFloat,
              "moe_experts: topk_weights float32 [T, k]");
  const int64_t E = static_cast<int64_t>(w13.size());
  TORCH_CHECK(E >= 1 && static_cast<int64_t>(w2.size()) == E, "moe_experts: one w13 and w2 per expert");
  TORCH_CHECK(inter > 0 && inter % PANEL == 0, "moe_experts: intermediate size a multiple of 16");
  const bool quant = !s13.empty();
  TORCH_CHECK(!quant || (static_cast<int64_t>(s13.size()) == E && static_cast<int64_t>(s2.size()) == E),
              "moe_experts: int8 experts need one s13 and s2 scale per expert");
  const auto wdt = w13[0].scalar_type();
  TORCH_CHECK(wdt == at::kFloat || wdt == at::kBFloat16 || wdt == at::kChar,
              "moe_experts: expert weights float32, bfloat16 or int8");
  TORCH_CHECK(quant == (wdt == at::kChar), "moe_experts: int8 weights come with scales");
  const int64_t p13 = 2 * inter / PANEL, p2 = (H + PANEL - 1) / PANEL;
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(w13[e].scalar_type() == wdt && w2[e].scalar_type() == wdt,
                "moe_experts: experts of one dtype");
    TORCH_CHECK(w13[e].is_contiguous() && w13[e].dim() == 3 && w13[e].size(0) == p13 &&
                    w13[e].size(1) == H && w13[e].size(2) == PANEL,
                "moe_experts: w13 packed [2I / 16, H, 16] (expert ", e, ")");
    TORCH_CHECK(w2[e].is_contiguous() && w2[e].dim() == 3 && w2[e].size(0) == p2 &&
                    w2[e].size(1) == inter && w2[e].size(2) == PANEL,
                "moe_experts: w2 packed [ceil(H / 16), I, 16] (expert ", e, ")");
    if (quant)
      TORCH_CHECK(s13[e].scalar_type() == at::kFloat && s13[e].is_contiguous() &&
                      s13[e].numel() >= p13 * PANEL && s2[e].scalar_type() == at::kFloat &&
                      s2[e].is_contiguous() && s2[e].numel() >= p2 * PANEL,
                  "moe_experts: fp32 scales padded to whole panels (expert ", e, ")");
  }
  Tensor out = at::empty({T_, H}, x.options());
  if (T_ == 0) return out;

  // group the (token, slot) pairs by expert, tokens in order within each expert
  const int64_t* ids = topk_ids.data_ptr<int64_t>();
  std::vector<int64_t> offsets(E + 1, 0), slot(T_ * k);
  for (int64_t i = 0; i < T_ * k; ++i) {
    TORCH_CHECK(ids[i] >= 0 && ids[i] < E, "moe_experts: expert id ", ids[i], " outside [0, ", E, ")");
    ++offsets[ids[i] + 1];
  }
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] += offsets[e];
  std::vector<int64_t> cursor(offsets.begin(), offsets.end() - 1);
  for (int64_t i = 0; i < T_ * k; ++i) slot[i] = cursor[ids[i]]++;

  const int64_t pairs = T_ * k;
  std::vector<float> xs(static_cast<size_t>(pairs * H)), act(static_cast<size_t>(pairs * inter)),
      ys(static_cast<size_t>(pairs * H));
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const void* xp = x.data_ptr();
  const int nt = pairs * H >= 65536 ? num_threads() : 1;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < pairs; ++i) {
    float* dst = xs.data() + slot[i] * H;
    const int64_t t = i / k;
    if (bf16) {
      const BFloat16* src = static_cast<const BFloat16*>(xp) + t * H;
      for (int64_t h = 0; h < H; ++h) dst[h] = to_f(src[h]);
    } else {
      std::memcpy(dst, static_cast<const float*>(xp) + t * H, sizeof(float) * H);
    }
  }
  if (wdt == at::kFloat)
    run_experts<float>(xs.data(), H, inter, w13, w2, s13, s2, offsets, act.data(), ys.data());
  else if (wdt == at::kBFloat16)
    run_experts<BFloat16>(xs.data(), H, inter, w13, w2, s13, s2, offsets, act.data(), ys.data());
  else
    run_experts<int8_t>(xs.data(), H, inter, w13, w2, s13, s2, offsets, act.data(), ys.data());
  const float* wts = topk_weights.data_ptr<float>();
  if (bf16)
    combine<BFloat16>(ys.data(), slot, ids, wts, T_, k, H, out.data_ptr<BFloat16>());
  else
    combine<float>(ys.data(), slot, ids, wts, T_, k, H, out.data_ptr<float>());
  return out;
}

}  // namespace tokenmill
