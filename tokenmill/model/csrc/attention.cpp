// Paged attention over block tables, straight from the KV-cache blocks (fp32 / bf16 queries;
// the cache in the model's dtype, or int8 / int4 with per-token scales: kv_quant.h).
//
// Cache layout (see tokenmill/model/attention.py): kv_cache [2, num_blocks, kv_heads,
// block_size * head_dim]; a K block of one head is stored transposed, [head_dim][block_size],
// so the scores of 16 keys against one query row are head_dim FMAs into one vector (no
// horizontal sums); a V block is [block_size][head_dim].
//
// Work item = (sequence, kv head, tile of up to QTILE queries). Its rows are (query, head
// of the group sharing this kv head); they are processed RB rows at a time with their
// output accumulators in registers, streaming the context in chunks of up to 16 keys with
// an online (flash-attention style) softmax, so no context is ever copied or materialised.
//
// Options: a sliding window (a query at position p sees keys p - window + 1 ..= p; the
// loop starts at the first block any row of the group can see) and tanh soft-capping of
// the scaled scores, cap * tanh(s / cap) (Gemma 2), applied before masking and softmax.
//
// Attention mass (H2O's heavy hitters): with ``attn_mass`` given, each key's softmax
// probability, summed over the rows of a (sequence, kv head), is added to
// attn_mass[seq][kv head][key]. The rows' raw scores are kept in a scratch row while the
// context streams, and turned into probabilities with the final max and sum: one exp per
// (row, key) more. A work item then covers all of a (sequence, kv head)'s queries and the
// context is not split, so no two threads add to one entry.

#include "kv_quant.h"
#include "ops.h"
#include "simd.h"

namespace tokenmill {
namespace {

constexpr int QTILE = 8;
constexpr int MAX_HEAD_DIM = 256;

struct Geometry {
  int64_t block_stride;  // bytes between consecutive blocks of one head (kv_heads * head block)
  int64_t head_block;    // bytes of one head's K (or V) in one block
  int block_size;
  int head_dim;
  int group;  // query heads per kv head
  int64_t window;  // sliding window in keys (0: the whole context)
  float softcap;   // 0: off
};

#if TM_AVX512

// cap * tanh(s / cap), with tanh(x) = 1 - 2 / (exp(2x) + 1) (exp16 saturates, so |x| large
// gives +-1 exactly; the absolute error near 0 is ~1e-7 * cap)
inline __m512 softcap16(__m512 s, float cap) {
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 e = exp16(_mm512_mul_ps(s, _mm512_set1_ps(2.f / cap)));
  const __m512 t = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.f), _mm512_add_ps(e, one)));
  return _mm512_mul_ps(t, _mm512_set1_ps(cap));
}

// q holds a tile's rows scaled by the softmax scale, fp32 [rows][D].
// Where a work unit's rows go: the final output (normalised, in T), or with ``part`` set,
// fp32 partial results [row][D + 2] = (unnormalised acc, running max, running sum) of a
// context split, merged later.
template <typename T>
struct Sink {
  T* out;
  int64_t out_tok_stride;
  int out_head0;
  float* part;
  float* mass;    // attention mass of this (sequence, kv head), per key; null: not gathered
  float* scores;  // scratch, NR rows of ``score_stride`` raw scores (with ``mass``)
  int64_t score_stride;
};

// NR rows from row0 of a tile (row r = query r / group, head r % group), all kept in
// registers: NR and DV (vectors per head_dim) are compile-time so nothing spills.
template <typename T, typename F, int DV, int NR>
void attend_group(const float* q, int row0, int64_t first_pos, const Geometry& g,
                  const uint8_t* k_head, const uint8_t* v_head, const int32_t* block_table,
                  int64_t key_begin, int64_t key_end, const Sink<T>& sink) {
  const int D = g.head_dim, bs = g.block_size;
  const __mmask16 dmask = tail_mask(D - (DV - 1) * 16);  // the last vector may be partial
  {
    __m512 acc[NR][DV];
    float m[NR];
    alignas(64) float lsum[NR][16];  // per-lane softmax denominators, summed at the end
    alignas(64) float zsum[NR][16];  // per-lane sum of p * zero (V's zero points), int4 only
    float qsum[NR];                  // sum of the row's q (scaled): what K's zero points add
    int64_t qpos[NR];
    const float* qr = q + static_cast<int64_t>(row0) * D;
    for (int r = 0; r < NR; ++r) {
      for (int j = 0; j < DV; ++j) acc[r][j] = _mm512_setzero_ps();
      m[r] = -std::numeric_limits<float>::infinity();
      _mm512_store_ps(lsum[r], _mm512_setzero_ps());
      if constexpr (F::kZero) {
        _mm512_store_ps(zsum[r], _mm512_setzero_ps());
        float sum = 0.f;
        for (int d = 0; d < D; ++d) sum += qr[r * D + d];
        qsum[r] = sum;
      }
      qpos[r] = first_pos + (row0 + r) / g.group;
    }
    // the last row sees the most keys; a context split covers [key_begin, key_end) only
    const int64_t kv_end = std::min(qpos[NR - 1] + 1, key_end);
    // with a window the first row sees the earliest key: start at its block
    if (g.window > 0)
      key_begin = std::max(key_begin, std::max<int64_t>(0, qpos[0] - g.window + 1) / bs * bs);
    alignas(64) float p_buf[NR][16];
    const int64_t block_bytes = g.head_block;
    for (int64_t j = key_begin; j < std::min(kv_end, key_begin + 2 * bs); j += bs) {
      const char* nk = reinterpret_cast<const char*>(k_head + block_table[j / bs] * g.block_stride);
      const char* nv = reinterpret_cast<const char*>(v_head + block_table[j / bs] * g.block_stride);
      for (int64_t off = 0; off < block_bytes; off += 64) {
        _mm_prefetch(nk + off, _MM_HINT_T0);
        _mm_prefetch(nv + off, _MM_HINT_T0);
      }
    }
    const float ninf = -std::numeric_limits<float>::infinity();
    for (int64_t j0 = key_begin; j0 < kv_end; j0 += bs) {
      const int64_t blk = block_table[j0 / bs];
      const uint8_t* kt = k_head + blk * g.block_stride;  // K codes [D][bs], then scales
      const uint8_t* vb = v_head + blk * g.block_stride;  // V codes [bs][D], then scales
      // blocks are scattered, so the hardware prefetcher cannot see them coming: fetch the
      // block after next (one block of compute is too short to hide a DRAM miss), its lines
      // spread over this block's score loop rather than issued in one burst
      const char* nk = nullptr;
      const char* nv = nullptr;
      if (j0 + 2 * bs < kv_end) {
        const int64_t ahead = block_table[j0 / bs + 2];
        nk = reinterpret_cast<const char*>(k_head + ahead * g.block_stride);
        nv = reinterpret_cast<const char*>(v_head + ahead * g.block_stride);
      }
      const int64_t pf_per_d = (block_bytes / 64 + D - 1) / D * F::kStep;
      for (int t0 = 0; t0 < bs && j0 + t0 < kv_end; t0 += 16) {
        const int n = static_cast<int>(std::min<int64_t>({16, bs - t0, kv_end - j0 - t0}));
        const __mmask16 nmask = tail_mask(n);
        __m512 s[NR];
        for (int r = 0; r < NR; ++r) s[r] = _mm512_setzero_ps();
        for (int d = 0; d < D; d += F::kStep) {
          if (nk && t0 == 0)
            for (int64_t i = 0, off = d / F::kStep * pf_per_d * 64; i < pf_per_d && off < block_bytes;
                 ++i, off += 64) {
              _mm_prefetch(nk + off, _MM_HINT_T0);
              _mm_prefetch(nv + off, _MM_HINT_T0);
            }
          __m512 kv[F::kStep];
          F::k_load(kt, d, t0, bs, nmask, kv);
          for (int e = 0; e < F::kStep; ++e)
            for (int r = 0; r < NR; ++r)
              s[r] = _mm512_fmadd_ps(_mm512_set1_ps(qr[r * D + d + e]), kv[e], s[r]);
        }
        if constexpr (F::kScale) {  // s = scale * (q . codes) + zero * sum(q)
          __m512 ksc, kz = _mm512_setzero_ps();
          F::k_scale(kt, t0, bs, D, nmask, ksc, kz);
          for (int r = 0; r < NR; ++r) {
            s[r] = _mm512_mul_ps(s[r], ksc);
            if constexpr (F::kZero) s[r] = _mm512_fmadd_ps(kz, _mm512_set1_ps(qsum[r]), s[r]);
          }
        }
        if (g.softcap > 0.f)
          for (int r = 0; r < NR; ++r) s[r] = softcap16(s[r], g.softcap);
        __m512 vsc = _mm512_setzero_ps(), vz = _mm512_setzero_ps();
        if constexpr (F::kScale) F::v_scale(vb, t0, bs, D, nmask, vsc, vz);
        const int64_t jbase = j0 + t0;
        for (int r = 0; r < NR; ++r) {
          const int64_t valid = std::min<int64_t>(n, qpos[r] - jbase + 1);
          // keys before the row's window: the first ``skip`` lanes
          const int64_t skip = g.window > 0 ? qpos[r] - g.window + 1 - jbase : 0;
          if (valid <= 0 || skip >= valid) {
            _mm512_store_ps(p_buf[r], _mm512_setzero_ps());
            if (sink.mass)
              _mm512_mask_storeu_ps(sink.scores + r * sink.score_stride + jbase, nmask, _mm512_set1_ps(ninf));
            continue;
          }
          __mmask16 vmask = tail_mask(valid);
          if (skip > 0) vmask &= static_cast<__mmask16>(~tail_mask(skip));
          if (sink.mass)
            _mm512_mask_storeu_ps(sink.scores + r * sink.score_stride + jbase, nmask,
                                  _mm512_mask_mov_ps(_mm512_set1_ps(ninf), vmask, s[r]));
          // the running max rarely moves once a few chunks are in: test before reducing
          if (_mm512_mask_cmp_ps_mask(vmask, s[r], _mm512_set1_ps(m[r]), _CMP_GT_OQ)) {
            const float m_new = _mm512_mask_reduce_max_ps(vmask, s[r]);
            // exp(-inf) on the first chunk: exp16 clamps it to ~1e-38, and acc is 0 anyway
            const __m512 c = exp16(_mm512_set1_ps(m[r] - m_new));
            for (int j = 0; j < DV; ++j) acc[r][j] = _mm512_mul_ps(acc[r][j], c);
            _mm512_store_ps(lsum[r], _mm512_mul_ps(_mm512_load_ps(lsum[r]), c));
            if constexpr (F::kZero) _mm512_store_ps(zsum[r], _mm512_mul_ps(_mm512_load_ps(zsum[r]), c));
            m[r] = m_new;
          }
          const __m512 p = _mm512_maskz_mov_ps(vmask, exp16(_mm512_sub_ps(s[r], _mm512_set1_ps(m[r]))));
          _mm512_store_ps(lsum[r], _mm512_add_ps(_mm512_load_ps(lsum[r]), p));
          if constexpr (F::kScale) {  // V's scale folds into p; its zero adds p * zero to every channel
            _mm512_store_ps(p_buf[r], _mm512_mul_ps(p, vsc));
            if constexpr (F::kZero)
              _mm512_store_ps(zsum[r], _mm512_fmadd_ps(p, vz, _mm512_load_ps(zsum[r])));
          } else {
            _mm512_store_ps(p_buf[r], p);
          }
        }
        for (int t = 0; t < n; ++t) {
          __m512 vv[DV];
          for (int j = 0; j < DV; ++j)
            vv[j] = F::v_load(vb, t0 + t, j, bs, D, j + 1 < DV ? static_cast<__mmask16>(0xFFFF) : dmask);
          for (int r = 0; r < NR; ++r) {
            const __m512 pb = _mm512_set1_ps(p_buf[r][t]);
            for (int j = 0; j < DV; ++j) acc[r][j] = _mm512_fmadd_ps(pb, vv[j], acc[r][j]);
          }
        }
      }
    }
    for (int r = 0; r < NR; ++r) {
      const int row = row0 + r;
      const __mmask16 full = 0xFFFF;
      const float l = _mm512_reduce_add_ps(_mm512_load_ps(lsum[r]));
      if constexpr (F::kZero) {
        const __m512 z = _mm512_set1_ps(_mm512_reduce_add_ps(_mm512_load_ps(zsum[r])));
        for (int j = 0; j < DV; ++j) acc[r][j] = _mm512_add_ps(acc[r][j], z);
      }
      if (sink.mass && l > 0.f) {  // p = exp(s - m) / l of every key the row saw
        const float* sr = sink.scores + r * sink.score_stride;
        const __m512 mv = _mm512_set1_ps(m[r]), il = _mm512_set1_ps(1.f / l);
        for (int64_t j = key_begin; j < kv_end; j += 16) {
          const __mmask16 jm = tail_mask(kv_end - j);
          const __m512 pj = _mm512_mul_ps(exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(jm, sr + j), mv)), il);
          _mm512_mask_storeu_ps(sink.mass + j, jm, _mm512_add_ps(_mm512_maskz_loadu_ps(jm, sink.mass + j), pj));
        }
      }
      if (sink.part) {
        float* dst = sink.part + static_cast<int64_t>(row) * (D + 2);
        for (int j = 0; j < DV; ++j) store16(dst + 16 * j, acc[r][j], j + 1 < DV ? full : dmask);
        dst[D] = m[r];
        dst[D + 1] = l;
        continue;
      }
      const __m512 inv = _mm512_set1_ps(l > 0.f ? 1.f / l : 0.f);
      T* dst = sink.out + static_cast<int64_t>(row / g.group) * sink.out_tok_stride +
               static_cast<int64_t>(sink.out_head0 + row % g.group) * D;
      for (int j = 0; j < DV; ++j)
        store16(dst + 16 * j, _mm512_mul_ps(acc[r][j], inv), j + 1 < DV ? full : dmask);
    }
  }
}

// All ``nr`` rows of a tile, in register-sized groups.
template <typename T, typename F, int DV>
void attend_rows(const float* q, int nr, int64_t first_pos, const Geometry& g, const uint8_t* k_head,
                 const uint8_t* v_head, const int32_t* bt, int64_t key_begin, int64_t key_end,
                 const Sink<T>& sink) {
  // rows per group: NR x DV accumulators + NR score vectors fit the 32 vector registers
  constexpr int RB = DV <= 2 ? 8 : (20 / DV > 0 ? 20 / DV : 1);
  for (int r0 = 0; r0 < nr; r0 += RB) {
    switch (std::min(RB, nr - r0)) {
#define TM_ROWS(N) \
  case N:          \
    if constexpr (N <= RB) attend_group<T, F, DV, N>(q, r0, first_pos, g, k_head, v_head, bt, key_begin, key_end, sink); \
    break;
      TM_ROWS(1) TM_ROWS(2) TM_ROWS(3) TM_ROWS(4) TM_ROWS(5) TM_ROWS(6) TM_ROWS(7) TM_ROWS(8)
#undef TM_ROWS
      default: break;
    }
  }
}

template <typename T, typename F>
void attend_format(const float* q, int nr, int64_t first_pos, const Geometry& g,
                   const uint8_t* k_head, const uint8_t* v_head, const int32_t* bt, int64_t key_begin,
                   int64_t key_end, const Sink<T>& sink) {
  switch ((g.head_dim + 15) / 16) {
#define TM_CASE(DV) \
  case DV: attend_rows<T, F, DV>(q, nr, first_pos, g, k_head, v_head, bt, key_begin, key_end, sink); break;
    TM_CASE(1) TM_CASE(2) TM_CASE(3) TM_CASE(4) TM_CASE(5) TM_CASE(6) TM_CASE(7) TM_CASE(8)
    TM_CASE(9) TM_CASE(10) TM_CASE(11) TM_CASE(12) TM_CASE(13) TM_CASE(14) TM_CASE(15) TM_CASE(16)
#undef TM_CASE
    default: TORCH_CHECK(false, "paged_attention: head_dim > ", MAX_HEAD_DIM);
  }
}

template <typename T>
void attend_dispatch(int64_t kv_code, const float* q, int nr, int64_t first_pos, const Geometry& g,
                     const uint8_t* k_head, const uint8_t* v_head, const int32_t* bt, int64_t key_begin,
                     int64_t key_end, const Sink<T>& sink) {
  if (kv_code == KV_INT8)
    attend_format<T, KVInt8>(q, nr, first_pos, g, k_head, v_head, bt, key_begin, key_end, sink);
  else if (kv_code == KV_INT4)
    attend_format<T, KVInt4>(q, nr, first_pos, g, k_head, v_head, bt, key_begin, key_end, sink);
  else
    attend_format<T, KVPlain<T>>(q, nr, first_pos, g, k_head, v_head, bt, key_begin, key_end, sink);
}

#else  // scalar fallback: same math, one row at a time

template <typename T>
struct Sink {
  T* out;
  int64_t out_tok_stride;
  int out_head0;
  float* part;  // unused here: the scalar path never splits the context
  float* mass;
  float* scores;  // unused here
  int64_t score_stride;
};

template <typename T, typename F>
void attend_format(const float* q, int nr, int64_t first_pos, const Geometry& g,
                   const uint8_t* k_head, const uint8_t* v_head, const int32_t* bt,
                   const Sink<T>& sink) {
  T* out = sink.out;
  const int64_t out_stride = sink.out_tok_stride;
  const int head0 = sink.out_head0;
  const int D = g.head_dim, bs = g.block_size;
  std::vector<float> acc(D), s;
  for (int r = 0; r < nr; ++r) {
    const int64_t qpos = first_pos + r / g.group;
    const int64_t lo = g.window > 0 ? std::max<int64_t>(0, qpos - g.window + 1) : 0;
    s.assign(qpos + 1, 0.f);
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t j = lo; j <= qpos; ++j) {
      const uint8_t* kt = k_head + bt[j / bs] * g.block_stride;
      float dot = 0.f;
      for (int d = 0; d < D; ++d) dot += q[r * D + d] * F::k_at(kt, d, static_cast<int>(j % bs), bs, D);
      if (g.softcap > 0.f) dot = g.softcap * std::tanh(dot / g.softcap);
      s[j] = dot;
      mx = std::max(mx, dot);
    }
    float sum = 0.f;
    for (int64_t j = lo; j <= qpos; ++j) sum += std::exp(s[j] - mx);
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t j = lo; j <= qpos; ++j) {
      const float p = std::exp(s[j] - mx) / sum;
      if (sink.mass) sink.mass[j] += p;
      const uint8_t* vb = v_head + bt[j / bs] * g.block_stride;
      for (int d = 0; d < D; ++d) acc[d] += p * F::v_at(vb, static_cast<int>(j % bs), d, bs, D);
    }
    T* dst = out + (r / g.group) * out_stride + static_cast<int64_t>(head0 + r % g.group) * D;
    for (int d = 0; d < D; ++d) dst[d] = from_f<T>(acc[d]);
  }
}

template <typename T>
void attend_dispatch(int64_t kv_code, const float* q, int nr, int64_t first_pos, const Geometry& g,
                     const uint8_t* k_head, const uint8_t* v_head, const int32_t* bt, int64_t, int64_t,
                     const Sink<T>& sink) {
  if (kv_code == KV_INT8)
    attend_format<T, KVQuantScalar<KV_INT8>>(q, nr, first_pos, g, k_head, v_head, bt, sink);
  else if (kv_code == KV_INT4)
    attend_format<T, KVQuantScalar<KV_INT4>>(q, nr, first_pos, g, k_head, v_head, bt, sink);
  else
    attend_format<T, KVPlainScalar<T>>(q, nr, first_pos, g, k_head, v_head, bt, sink);
}

#endif

// The block size of a cache whose heads hold ``head_block`` bytes (elements when plain).
inline int64_t block_size_of(int64_t kv_code, int64_t head_block, int64_t D) {
  if (kv_code == KV_INT8) return head_block / (D + 2);
  if (kv_code == KV_INT4) return head_block / (D / 2 + 4);
  return head_block / D;
}

template <typename T>
void paged_attention_impl(const Tensor& q, const Tensor& kv_cache, const Tensor& block_tables,
                          const Tensor& query_start_loc, const Tensor& seq_lens, double scale,
                          int64_t window, double softcap, int64_t kv_code,
                          const std::optional<Tensor>& attn_mass, Tensor& out) {
  const int64_t num_heads = q.size(1);
  const int D = static_cast<int>(q.size(2));
  const int64_t num_blocks = kv_cache.size(1);
  const int64_t kv_heads = kv_cache.size(2);
  const int64_t head_elems = kv_cache.size(3);
  const int64_t head_block = head_elems * kv_cache.element_size();  // bytes
  const int bs = static_cast<int>(block_size_of(kv_code, head_elems, D));
  const Geometry g{kv_heads * head_block, head_block, bs, D, static_cast<int>(num_heads / kv_heads),
                   window, static_cast<float>(softcap)};
  // keys a query of sequence b attends to at most
  auto span = [&](int64_t len) { return window > 0 ? std::min<int64_t>(len, window) : len; };
  const int64_t num_seqs = seq_lens.size(0);
  const int64_t bt_stride = block_tables.stride(0);

  const T* qp = q.data_ptr<T>();
  const uint8_t* kc = static_cast<const uint8_t*>(kv_cache.data_ptr());
  const uint8_t* vc = kc + num_blocks * kv_heads * head_block;
  T* op = out.data_ptr<T>();
  const int32_t* qsl = query_start_loc.data_ptr<int32_t>();
  const int32_t* sl = seq_lens.data_ptr<int32_t>();
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int64_t q_stride = q.stride(0);
  const int64_t o_stride = out.stride(0);
  const float fscale = static_cast<float>(scale);
  float* mass = attn_mass ? attn_mass->data_ptr<float>() : nullptr;
  const int64_t mass_stride = attn_mass ? attn_mass->size(2) : 0;

  struct Item {
    int32_t seq, kvh, q0, nq;
  };
  std::vector<Item> items;
  int64_t work = 0, max_len = 0;
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int32_t nq_total = qsl[b + 1] - qsl[b];
    // a bad table entry would read outside the cache: check the blocks this sequence uses
    TORCH_CHECK(nq_total >= 0 && nq_total <= sl[b] && qsl[b + 1] <= q.size(0),
                "paged_attention: bad query_start_loc / seq_lens for sequence ", b);
    TORCH_CHECK((sl[b] + g.block_size - 1) / g.block_size <= block_tables.size(1),
                "paged_attention: block table of sequence ", b, " is too short");
    for (int64_t j = 0; j < (sl[b] + g.block_size - 1) / g.block_size; ++j)
      TORCH_CHECK(bt[b * bt_stride + j] >= 0 && bt[b * bt_stride + j] < num_blocks,
                  "paged_attention: block id ", bt[b * bt_stride + j], " outside the cache");
    TORCH_CHECK(!mass || sl[b] <= mass_stride, "paged_attention: attn_mass is narrower than sequence ", b);
    // with attention mass, one item holds all of a (sequence, kv head)'s queries (one writer)
    const int32_t tile = mass ? std::max<int32_t>(nq_total, 1) : QTILE;
    for (int32_t q0 = 0; q0 < nq_total; q0 += tile)
      for (int32_t h = 0; h < kv_heads; ++h)
        items.push_back({static_cast<int32_t>(b), h, q0, std::min<int32_t>(tile, nq_total - q0)});
    work += static_cast<int64_t>(nq_total) * span(sl[b]);
    max_len = std::max<int64_t>(max_len, sl[b]);
  }
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int nt_max = num_threads();
  const int nt = (work * num_heads * D > 65536 && (n_items > 1 || nt_max > 1)) ? nt_max : 1;
  // Few long decodes leave threads idle (one item per kv head): split their context into
  // block-aligned ranges computed in parallel and merged (flash-decoding style).
  int64_t splits = 1;
#if TM_AVX512
  if (nt > 1 && n_items < 2 * nt && !mass) {
    bool all_decode = true;
    int64_t min_len = std::numeric_limits<int64_t>::max();
    for (const Item& it : items) all_decode &= it.nq == 1, min_len = std::min<int64_t>(min_len, span(sl[it.seq]));
    if (all_decode) {
      splits = std::min<int64_t>((2 * nt + n_items - 1) / n_items, min_len / 256);
      splits = std::max<int64_t>(splits, 1);
    }
  }
#endif
  const int64_t n_units = n_items * splits;
  const int64_t part_row = static_cast<int64_t>(D) + 2;
  std::vector<float> parts(splits > 1 ? static_cast<size_t>(n_units * g.group * part_row) : 0);
#pragma omp parallel num_threads(n_units > 1 ? nt : 1)
  {
    std::vector<float> qbuf;
    std::vector<float> scores(mass ? static_cast<size_t>(8 * max_len) : 0);  // 8 rows at most a group
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < n_units; ++w) {
      const Item& it = items[w / splits];
      const int64_t split = w % splits;
      const int64_t nq_total = qsl[it.seq + 1] - qsl[it.seq];
      const int64_t first_pos = sl[it.seq] - nq_total + it.q0;
      const int64_t tok = qsl[it.seq] + it.q0;
      const int head0 = it.kvh * g.group;
      // rows (query i, head-in-group h) -> scaled fp32 [i * group + h][D]
      qbuf.resize(static_cast<size_t>(it.nq) * g.group * D);
      for (int i = 0; i < it.nq; ++i)
        for (int h = 0; h < g.group; ++h) {
          const T* src = qp + (tok + i) * q_stride + static_cast<int64_t>(head0 + h) * D;
          float* dst = qbuf.data() + static_cast<size_t>(i * g.group + h) * D;
          for (int d = 0; d < D; ++d) dst[d] = to_f(src[d]) * fscale;
        }
      int64_t key_begin = 0, key_end = std::numeric_limits<int64_t>::max();
      if (splits > 1) {  // decodes only: the one query sees the last span(len) keys
        const int64_t first = (sl[it.seq] - span(sl[it.seq])) / g.block_size;
        const int64_t blocks = (sl[it.seq] + g.block_size - 1) / g.block_size - first;
        const int64_t per = (blocks + splits - 1) / splits;
        key_begin = (first + split * per) * g.block_size;
        key_end = (first + (split + 1) * per) * g.block_size;
      }
      const Sink<T> sink{op + tok * o_stride, o_stride, head0,
                         splits > 1 ? parts.data() + w * g.group * part_row : nullptr,
                         mass ? mass + (it.seq * kv_heads + it.kvh) * mass_stride : nullptr,
                         mass ? scores.data() : nullptr, max_len};
      attend_dispatch<T>(kv_code, qbuf.data(), it.nq * g.group, first_pos, g, kc + it.kvh * head_block,
                         vc + it.kvh * head_block, bt + it.seq * bt_stride, key_begin, key_end, sink);
    }
  }
  if (splits > 1) {
    // merge: out = sum_s acc_s * exp(m_s - M) / sum_s l_s * exp(m_s - M)
    for (int64_t i = 0; i < n_items; ++i) {
      const Item& it = items[i];
      const int64_t tok = qsl[it.seq] + it.q0;
      for (int h = 0; h < g.group; ++h) {
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t s = 0; s < splits; ++s) {
          const float* p = parts.data() + ((i * splits + s) * g.group + h) * part_row;
          if (p[D + 1] > 0.f) mx = std::max(mx, p[D]);
        }
        std::vector<float> acc(D, 0.f);
        float total = 0.f;
        for (int64_t s = 0; s < splits; ++s) {
          const float* p = parts.data() + ((i * splits + s) * g.group + h) * part_row;
          if (p[D + 1] <= 0.f) continue;  // an empty range (past the context)
          const float c = std::exp(p[D] - mx);
          total += p[D + 1] * c;
          for (int d = 0; d < D; ++d) acc[d] += p[d] * c;
        }
        T* dst = op + tok * o_stride + static_cast<int64_t>(it.kvh * g.group + h) * D;
        for (int d = 0; d < D; ++d) dst[d] = from_f<T>(total > 0.f ? acc[d] / total : 0.f);
      }
    }
  }
}

}  // namespace

Tensor paged_attention(const Tensor& q, const Tensor& kv_cache, const Tensor& block_tables,
                       const Tensor& query_start_loc, const Tensor& seq_lens, double scale,
                       int64_t sliding_window, double softcap, int64_t kv_format,
                       const std::optional<Tensor>& attn_mass) {
  TORCH_CHECK(sliding_window >= 0 && softcap >= 0.0,
              "paged_attention: sliding_window and softcap must be >= 0");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2),
              "q must be [T, heads, head_dim] with contiguous heads");
  TORCH_CHECK(q.size(2) <= MAX_HEAD_DIM, "paged_attention: head_dim > ", MAX_HEAD_DIM);
  TORCH_CHECK(kv_format >= KV_PLAIN && kv_format <= KV_INT4, "paged_attention: unknown kv_format ", kv_format);
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.is_contiguous() && kv_cache.size(0) == 2,
              "kv_cache must be contiguous [2, num_blocks, kv_heads, block elements]");
  if (kv_format == KV_PLAIN) {
    TORCH_CHECK(kv_cache.scalar_type() == q.scalar_type(), "q and kv_cache dtypes differ");
    TORCH_CHECK(kv_cache.size(3) % q.size(2) == 0, "kv_cache's last dim is not a multiple of head_dim");
  } else {
    const int64_t per_token = kv_format == KV_INT8 ? q.size(2) + 2 : q.size(2) / 2 + 4;
    TORCH_CHECK(kv_cache.scalar_type() == at::kByte && kv_cache.size(3) % per_token == 0 &&
                    q.size(2) % 2 == 0,
                "a quantized kv_cache is uint8 [2, num_blocks, kv_heads, block_size * ", per_token, "]");
  }
  TORCH_CHECK(q.size(1) % kv_cache.size(2) == 0, "heads must be a multiple of kv heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.stride(1) == 1,
              "block_tables must be int32 with contiguous rows");
  TORCH_CHECK(query_start_loc.scalar_type() == at::kInt && query_start_loc.is_contiguous() &&
                  seq_lens.scalar_type() == at::kInt && seq_lens.is_contiguous(),
              "query_start_loc and seq_lens must be contiguous int32");
  if (attn_mass)
    TORCH_CHECK(attn_mass->scalar_type() == at::kFloat && attn_mass->is_contiguous() &&
                    attn_mass->dim() == 3 && attn_mass->size(0) == seq_lens.size(0) &&
                    attn_mass->size(1) == kv_cache.size(2),
                "attn_mass must be contiguous float32 [num_seqs, kv_heads, width]");
  Tensor out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  if (q.scalar_type() == at::kFloat) {
    paged_attention_impl<float>(q, kv_cache, block_tables, query_start_loc, seq_lens, scale,
                                sliding_window, softcap, kv_format, attn_mass, out);
  } else if (q.scalar_type() == at::kBFloat16) {
    paged_attention_impl<BFloat16>(q, kv_cache, block_tables, query_start_loc, seq_lens, scale,
                                   sliding_window, softcap, kv_format, attn_mass, out);
  } else {
    TORCH_CHECK(false, "paged_attention: only float32 and bfloat16");
  }
  return out;
}

}  // namespace tokenmill
