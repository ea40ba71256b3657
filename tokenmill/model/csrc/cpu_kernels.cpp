// tokenmill CPU kernels: paged attention, skinny GEMM, and the small fused layer ops.
//
// Built on first use by tokenmill/model/kernels.py with torch.utils.cpp_extension.load
// (-O3 -march=native -fopenmp) and registered as torch.ops.tokenmill.*. Every op takes
// fp32 or bf16 tensors and accumulates in fp32. AVX-512 paths are used when the compiler
// targets it; a plain scalar path keeps the file building elsewhere.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#define TM_AVX512 1
#else
#define TM_AVX512 0
#endif

using at::BFloat16;
using at::Tensor;

namespace {

// ----------------------------------------------------------------------------------------
// small vector helpers
// ----------------------------------------------------------------------------------------

inline float to_f(float x) { return x; }
inline float to_f(BFloat16 x) { return static_cast<float>(x); }
template <typename T>
inline T from_f(float x) { return static_cast<T>(x); }

inline int num_threads() { return at::get_num_threads(); }

#if TM_AVX512
inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const BFloat16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const BFloat16* p, __mmask16 m) {
  __m256i raw = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
// Round-to-nearest-even fp32 -> bf16 (what c10::BFloat16 does), NaNs are not produced here.
inline __m256i to_bf16(__m512 v) {
  __m512i x = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
  x = _mm512_add_epi32(x, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(x, 16));
}
inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline void store16(BFloat16* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, to_bf16(v));
}

// exp for x <= 0 mostly (softmax) and moderate |x| (SiLU); relative error ~2e-7.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  x = _mm512_min_ps(x, _mm512_set1_ps(88.3f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}
#endif

inline float dot_f32(const float* a, const float* b, int64_t n) {
#if TM_AVX512
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 m = tail_mask(n - i);
    acc = _mm512_fmadd_ps(load16(a + i, m), load16(b + i, m), acc);
  }
  return _mm512_reduce_add_ps(acc);
#else
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
#endif
}

// y = y * scale + a * x   (x in T)
template <typename T>
inline void scale_axpy(float* y, float scale, float a, const T* x, int64_t n) {
#if TM_AVX512
  __m512 vs = _mm512_set1_ps(scale), va = _mm512_set1_ps(a);
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 m = tail_mask(n - i);
    __m512 yv = _mm512_mul_ps(load16(y + i, m), vs);
    store16(y + i, _mm512_fmadd_ps(va, load16(x + i, m), yv), m);
  }
#else
  for (int64_t i = 0; i < n; ++i) y[i] = y[i] * scale + a * to_f(x[i]);
#endif
}

template <typename T>
inline void to_float_row(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_f(src[i]);
}

inline void exp_inplace(float* s, int64_t n, float sub) {
#if TM_AVX512
  __m512 vsub = _mm512_set1_ps(sub);
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 m = tail_mask(n - i);
    store16(s + i, exp16(_mm512_sub_ps(load16(s + i, m), vsub)), m);
  }
#else
  for (int64_t i = 0; i < n; ++i) s[i] = std::exp(s[i] - sub);
#endif
}

// ----------------------------------------------------------------------------------------
// paged attention
// ----------------------------------------------------------------------------------------
//
// Work item = (sequence, kv head, tile of up to QTILE queries). The G query heads that
// share a kv head and the queries of a tile are processed together, so each K/V row read
// from its block serves QTILE * G rows. Online softmax (flash-attention style) over the
// context in chunks of up to 16 keys, never materialising a sequence's whole context.

constexpr int QTILE = 8;
constexpr int KCHUNK = 16;

struct AttnScratch {
  std::vector<float> q, acc, s, m, l, kv;
};

template <typename T>
void attention_tile(const T* q, int64_t q_tok_stride, T* out, int64_t out_tok_stride,
                    const T* k_cache, const T* v_cache, int64_t block_stride, int64_t tok_stride,
                    const int32_t* block_table, int block_size, int kvh, int group, int head_dim,
                    int64_t first_pos, int nq, float scale, AttnScratch& sc) {
  const int rows = nq * group;
  const int D = head_dim;
  sc.q.resize(static_cast<size_t>(rows) * D);
  sc.acc.assign(static_cast<size_t>(rows) * D, 0.f);
  sc.s.resize(static_cast<size_t>(rows) * KCHUNK);
  sc.m.assign(rows, -std::numeric_limits<float>::infinity());
  sc.l.assign(rows, 0.f);
  sc.kv.resize(static_cast<size_t>(KCHUNK) * D);

  // rows are (query i, head-in-group g): r = i * group + g, head = kvh * group + g
  for (int i = 0; i < nq; ++i) {
    for (int g = 0; g < group; ++g) {
      const T* src = q + i * q_tok_stride + static_cast<int64_t>(kvh * group + g) * D;
      float* dst = sc.q.data() + static_cast<size_t>(i * group + g) * D;
      for (int d = 0; d < D; ++d) dst[d] = to_f(src[d]) * scale;
    }
  }
  const int64_t kv_end = first_pos + nq;  // the last query sees keys [0, first_pos + nq)
  for (int64_t j0 = 0; j0 < kv_end; j0 += block_size) {
    const int64_t blk = block_table[j0 / block_size];
    const T* kb = k_cache + blk * block_stride + static_cast<int64_t>(kvh) * D;
    const T* vb = v_cache + blk * block_stride + static_cast<int64_t>(kvh) * D;
    for (int t0 = 0; t0 < block_size && j0 + t0 < kv_end; t0 += KCHUNK) {
      const int n = static_cast<int>(std::min<int64_t>({KCHUNK, block_size - t0, kv_end - j0 - t0}));
      const int64_t jbase = j0 + t0;
      // scores s[r][t] for keys jbase + t
      for (int t = 0; t < n; ++t) {
        const T* krow = kb + static_cast<int64_t>(t0 + t) * tok_stride;
        const float* kf;
        if constexpr (std::is_same_v<T, float>) {
          kf = krow;
        } else {
          to_float_row(krow, sc.kv.data() + static_cast<size_t>(t) * D, D);
          kf = sc.kv.data() + static_cast<size_t>(t) * D;
        }
        for (int r = 0; r < rows; ++r) {
          sc.s[static_cast<size_t>(r) * KCHUNK + t] = dot_f32(sc.q.data() + static_cast<size_t>(r) * D, kf, D);
        }
      }
      for (int r = 0; r < rows; ++r) {
        const int64_t qpos = first_pos + r / group;
        const int valid = static_cast<int>(std::min<int64_t>(n, qpos - jbase + 1));
        float* s = sc.s.data() + static_cast<size_t>(r) * KCHUNK;
        if (valid <= 0) {
          for (int t = 0; t < n; ++t) s[t] = 0.f;
          continue;
        }
        float cmax = s[0];
        for (int t = 1; t < valid; ++t) cmax = std::max(cmax, s[t]);
        const float m_new = std::max(sc.m[r], cmax);
        const float corr = std::exp(sc.m[r] - m_new);  // exp(-inf) == 0 on the first chunk
        exp_inplace(s, valid, m_new);
        float psum = 0.f;
        for (int t = 0; t < valid; ++t) psum += s[t];
        for (int t = valid; t < n; ++t) s[t] = 0.f;
        sc.l[r] = sc.l[r] * corr + psum;
        sc.m[r] = m_new;
        if (corr != 1.f) {
          float* a = sc.acc.data() + static_cast<size_t>(r) * D;
          for (int d = 0; d < D; ++d) a[d] *= corr;
        }
      }
      for (int t = 0; t < n; ++t) {
        const T* vrow = vb + static_cast<int64_t>(t0 + t) * tok_stride;
        for (int r = 0; r < rows; ++r) {
          const float p = sc.s[static_cast<size_t>(r) * KCHUNK + t];
          if (p != 0.f) scale_axpy<T>(sc.acc.data() + static_cast<size_t>(r) * D, 1.f, p, vrow, D);
        }
      }
    }
  }
  for (int i = 0; i < nq; ++i) {
    for (int g = 0; g < group; ++g) {
      const int r = i * group + g;
      const float inv = sc.l[r] > 0.f ? 1.f / sc.l[r] : 0.f;
      const float* a = sc.acc.data() + static_cast<size_t>(r) * D;
      T* dst = out + i * out_tok_stride + static_cast<int64_t>(kvh * group + g) * D;
      for (int d = 0; d < D; ++d) dst[d] = from_f<T>(a[d] * inv);
    }
  }
}

template <typename T>
void paged_attention_impl(const Tensor& q, const Tensor& kv_cache, const Tensor& block_tables,
                          const Tensor& query_start_loc, const Tensor& seq_lens, double scale,
                          Tensor& out) {
  const int64_t num_heads = q.size(1);
  const int64_t head_dim = q.size(2);
  const int64_t num_blocks = kv_cache.size(1);
  const int64_t block_size = kv_cache.size(2);
  const int64_t kv_heads = kv_cache.size(3);
  const int group = static_cast<int>(num_heads / kv_heads);
  const int64_t num_seqs = seq_lens.size(0);
  const int64_t bt_stride = block_tables.stride(0);
  const int64_t tok_stride = kv_heads * head_dim;
  const int64_t block_stride = block_size * tok_stride;

  const T* qp = q.data_ptr<T>();
  const T* kc = kv_cache.data_ptr<T>();
  const T* vc = kc + num_blocks * block_stride;
  T* op = out.data_ptr<T>();
  const int32_t* qsl = query_start_loc.data_ptr<int32_t>();
  const int32_t* sl = seq_lens.data_ptr<int32_t>();
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int64_t q_stride = q.stride(0);
  const int64_t o_stride = out.stride(0);

  struct Item {
    int32_t seq, kvh, q0, nq;
  };
  std::vector<Item> items;
  int64_t work = 0;
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int32_t nq_total = qsl[b + 1] - qsl[b];
    for (int32_t q0 = 0; q0 < nq_total; q0 += QTILE) {
      for (int32_t h = 0; h < kv_heads; ++h) {
        items.push_back({static_cast<int32_t>(b), h, q0, std::min<int32_t>(QTILE, nq_total - q0)});
      }
    }
    work += static_cast<int64_t>(nq_total) * sl[b];
  }
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int nt = (work * num_heads * head_dim > 32768 && n_items > 1) ? num_threads() : 1;
#pragma omp parallel num_threads(nt)
  {
    AttnScratch sc;
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < n_items; ++w) {
      const Item& it = items[w];
      const int64_t nq_total = qsl[it.seq + 1] - qsl[it.seq];
      const int64_t first_pos = sl[it.seq] - nq_total + it.q0;
      const int64_t tok = qsl[it.seq] + it.q0;
      attention_tile<T>(qp + tok * q_stride, q_stride, op + tok * o_stride, o_stride, kc, vc,
                        block_stride, tok_stride, bt + it.seq * bt_stride,
                        static_cast<int>(block_size), it.kvh, group, static_cast<int>(head_dim),
                        first_pos, it.nq, static_cast<float>(scale), sc);
    }
  }
}

Tensor paged_attention(const Tensor& q, const Tensor& kv_cache, const Tensor& block_tables,
                       const Tensor& query_start_loc, const Tensor& seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2),
              "q must be [T, heads, head_dim] with contiguous heads");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.is_contiguous(), "kv_cache must be contiguous 5-d");
  TORCH_CHECK(kv_cache.scalar_type() == q.scalar_type(), "q and kv_cache dtypes differ");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.stride(1) == 1,
              "block_tables must be int32 with contiguous rows");
  TORCH_CHECK(query_start_loc.scalar_type() == at::kInt && query_start_loc.is_contiguous() &&
                  seq_lens.scalar_type() == at::kInt && seq_lens.is_contiguous(),
              "query_start_loc and seq_lens must be contiguous int32");
  Tensor out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  if (q.scalar_type() == at::kFloat) {
    paged_attention_impl<float>(q, kv_cache, block_tables, query_start_loc, seq_lens, scale, out);
  } else if (q.scalar_type() == at::kBFloat16) {
    paged_attention_impl<BFloat16>(q, kv_cache, block_tables, query_start_loc, seq_lens, scale, out);
  } else {
    TORCH_CHECK(false, "paged_attention: only float32 and bfloat16");
  }
  return out;
}

// ----------------------------------------------------------------------------------------
// rope + KV write: rotate q and k of a fused qkv [T, (H + 2 KVH) * D] in place and store
// k, v into their cache slots.
// ----------------------------------------------------------------------------------------

template <typename T>
inline void rotate(T* x, const float* cs, int half) {
  const float* cosv = cs;
  const float* sinv = cs + half;
  for (int d = 0; d < half; ++d) {
    const float x1 = to_f(x[d]), x2 = to_f(x[d + half]);
    x[d] = from_f<T>(x1 * cosv[d] - x2 * sinv[d]);
    x[d + half] = from_f<T>(x2 * cosv[d] + x1 * sinv[d]);
  }
}

template <typename T>
void rope_write_kv_impl(Tensor& qkv, const Tensor& positions, const Tensor& cos_sin,
                        Tensor& kv_cache, const Tensor& slot_mapping, int64_t num_heads,
                        int64_t kv_heads) {
  const int64_t T_ = qkv.size(0);
  const int64_t D = kv_cache.size(4);
  const int half = static_cast<int>(D / 2);
  const int64_t row = qkv.stride(0);
  const int64_t slots_total = kv_cache.size(1) * kv_cache.size(2);
  T* base = qkv.data_ptr<T>();
  T* kc = kv_cache.data_ptr<T>();
  T* vc = kc + slots_total * kv_heads * D;
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const float* table = cos_sin.data_ptr<float>();
  const int nt = T_ >= 16 ? num_threads() : 1;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t t = 0; t < T_; ++t) {
    T* x = base + t * row;
    const float* cs = table + pos[t] * D;
    for (int64_t h = 0; h < num_heads + kv_heads; ++h) rotate<T>(x + h * D, cs, half);
    const int64_t slot = slots[t];
    if (slot < 0) continue;  // padding token: compute but do not store
    std::memcpy(kc + slot * kv_heads * D, x + num_heads * D, sizeof(T) * kv_heads * D);
    std::memcpy(vc + slot * kv_heads * D, x + (num_heads + kv_heads) * D, sizeof(T) * kv_heads * D);
  }
}

void rope_write_kv(Tensor qkv, const Tensor& positions, const Tensor& cos_sin, Tensor kv_cache,
                   const Tensor& slot_mapping, int64_t num_heads, int64_t kv_heads) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1, "qkv must be [T, (H + 2 KVH) * D]");
  TORCH_CHECK(kv_cache.is_contiguous() && kv_cache.scalar_type() == qkv.scalar_type(),
              "kv_cache must be contiguous and match qkv's dtype");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() &&
                  slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous(),
              "positions and slot_mapping must be contiguous int64");
  TORCH_CHECK(cos_sin.scalar_type() == at::kFloat && cos_sin.is_contiguous(),
              "cos_sin must be contiguous float32");
  TORCH_CHECK(qkv.size(1) == (num_heads + 2 * kv_heads) * kv_cache.size(4), "qkv width mismatch");
  if (qkv.scalar_type() == at::kFloat) {
    rope_write_kv_impl<float>(qkv, positions, cos_sin, kv_cache, slot_mapping, num_heads, kv_heads);
  } else if (qkv.scalar_type() == at::kBFloat16) {
    rope_write_kv_impl<BFloat16>(qkv, positions, cos_sin, kv_cache, slot_mapping, num_heads, kv_heads);
  } else {
    TORCH_CHECK(false, "rope_write_kv: only float32 and bfloat16");
  }
}

// ----------------------------------------------------------------------------------------
// RMSNorm, optionally fused with the residual add: residual += x; out = norm(residual) * w
// ----------------------------------------------------------------------------------------

template <typename T>
void rms_norm_impl(const T* x, T* residual, const T* w, T* out, int64_t rows, int64_t n,
                   float eps) {
  const int nt = rows >= 16 ? num_threads() : 1;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * n;
    T* rr = residual ? residual + r * n : nullptr;
    T* o = out + r * n;
    float ss = 0.f;
    if (rr) {
      for (int64_t i = 0; i < n; ++i) {
        const T v = from_f<T>(to_f(rr[i]) + to_f(xr[i]));  // round like the model dtype
        rr[i] = v;
        const float f = to_f(v);
        ss += f * f;
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        const float f = to_f(xr[i]);
        ss += f * f;
      }
    }
    const T* src = rr ? rr : xr;
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
    for (int64_t i = 0; i < n; ++i) {
      // normalise in fp32, round to the model dtype, then scale by the weight
      o[i] = from_f<T>(to_f(w[i]) * to_f(from_f<T>(to_f(src[i]) * inv)));
    }
  }
}

Tensor rms_norm_any(const Tensor& x, const c10::optional<Tensor>& residual, const Tensor& w,
                    double eps) {
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "rms_norm: contiguous inputs only");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "rms_norm: x and weight dtypes differ");
  Tensor out = at::empty(x.sizes(), x.options());
  const int64_t n = x.size(-1);
  const int64_t rows = x.numel() / n;
  if (x.scalar_type() == at::kFloat) {
    rms_norm_impl<float>(x.data_ptr<float>(), residual ? residual->data_ptr<float>() : nullptr,
                         w.data_ptr<float>(), out.data_ptr<float>(), rows, n, eps);
  } else if (x.scalar_type() == at::kBFloat16) {
    rms_norm_impl<BFloat16>(x.data_ptr<BFloat16>(),
                            residual ? residual->data_ptr<BFloat16>() : nullptr,
                            w.data_ptr<BFloat16>(), out.data_ptr<BFloat16>(), rows, n, eps);
  } else {
    TORCH_CHECK(false, "rms_norm: only float32 and bfloat16");
  }
  return out;
}

Tensor rms_norm(const Tensor& x, const Tensor& w, double eps) {
  return rms_norm_any(x, c10::nullopt, w, eps);
}

Tensor add_rms_norm(const Tensor& x, Tensor residual, const Tensor& w, double eps) {
  TORCH_CHECK(residual.is_contiguous() && residual.sizes() == x.sizes() &&
                  residual.scalar_type() == x.scalar_type(),
              "add_rms_norm: residual must match x");
  return rms_norm_any(x, residual, w, eps);
}

// ----------------------------------------------------------------------------------------
// SiLU-gated product: x [T, 2I] (gate | up) -> silu(gate) * up  [T, I]
// ----------------------------------------------------------------------------------------

template <typename T>
void silu_mul_impl(const T* x, T* out, int64_t rows, int64_t inter) {
  const int nt = rows * inter >= 65536 ? num_threads() : 1;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T* g = x + r * 2 * inter;
    const T* u = g + inter;
    T* o = out + r * inter;
#if TM_AVX512
    for (int64_t i = 0; i < inter; i += 16) {
      __mmask16 m = tail_mask(inter - i);
      __m512 gv = load16(g + i, m);
      __m512 sig = _mm512_div_ps(_mm512_set1_ps(1.f),
                                 _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
      __m512 act = _mm512_mul_ps(gv, sig);
      if constexpr (std::is_same_v<T, BFloat16>) {
        // the model rounds the activation to bf16 before the product; do the same
        act = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16(act)), 16));
      }
      store16(o + i, _mm512_mul_ps(act, load16(u + i, m)), m);
    }
#else
    for (int64_t i = 0; i < inter; ++i) {
      const float gv = to_f(g[i]);
      o[i] = from_f<T>(gv / (1.f + std::exp(-gv)) * to_f(u[i]));
    }
#endif
  }
}

Tensor silu_mul(const Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % 2 == 0, "silu_mul: x [T, 2I]");
  const int64_t inter = x.size(1) / 2;
  Tensor out = at::empty({x.size(0), inter}, x.options());
  if (x.scalar_type() == at::kFloat) {
    silu_mul_impl<float>(x.data_ptr<float>(), out.data_ptr<float>(), x.size(0), inter);
  } else if (x.scalar_type() == at::kBFloat16) {
    silu_mul_impl<BFloat16>(x.data_ptr<BFloat16>(), out.data_ptr<BFloat16>(), x.size(0), inter);
  } else {
    TORCH_CHECK(false, "silu_mul: only float32 and bfloat16");
  }
  return out;
}

// ----------------------------------------------------------------------------------------
// skinny GEMM: y [M, N] = x [M, K] @ w[N, K]^T (+ b), for small M. Memory bound on w, so
// it streams w once (rows split across threads), keeping the M x-rows (fp32) in cache.
// ----------------------------------------------------------------------------------------

#if TM_AVX512
template <int MB, int NR, typename T>
inline void skinny_tile(const float* x, int64_t K, const T* w, int64_t K_w, float* res) {
  __m512 acc[MB][NR];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NR; ++j) acc[m][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = load16(w + j * K_w + k);
    for (int m = 0; m < MB; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * K + k);
      for (int j = 0; j < NR; ++j) acc[m][j] = _mm512_fmadd_ps(xv, wv[j], acc[m][j]);
    }
  }
  if (k < K) {
    const __mmask16 mk = tail_mask(K - k);
    __m512 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = load16(w + j * K_w + k, mk);
    for (int m = 0; m < MB; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(mk, x + m * K + k);
      for (int j = 0; j < NR; ++j) acc[m][j] = _mm512_fmadd_ps(xv, wv[j], acc[m][j]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NR; ++j) res[m * NR + j] = _mm512_reduce_add_ps(acc[m][j]);
}
#else
template <int MB, int NR, typename T>
inline void skinny_tile(const float* x, int64_t K, const T* w, int64_t K_w, float* res) {
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NR; ++j) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += x[m * K + k] * to_f(w[j * K_w + k]);
      res[m * NR + j] = s;
    }
}
#endif

template <int NR, typename T>
inline void skinny_rows(const float* x, int64_t M, int64_t K, const T* w, const T* bias,
                        T* y, int64_t N, int64_t n0) {
  float res[4 * NR];
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const int mb = static_cast<int>(std::min<int64_t>(4, M - m0));
    const float* xm = x + m0 * K;
    const T* wn = w + n0 * K;
    switch (mb) {
      case 1: skinny_tile<1, NR, T>(xm, K, wn, K, res); break;
      case 2: skinny_tile<2, NR, T>(xm, K, wn, K, res); break;
      case 3: skinny_tile<3, NR, T>(xm, K, wn, K, res); break;
      default: skinny_tile<4, NR, T>(xm, K, wn, K, res); break;
    }
    for (int m = 0; m < mb; ++m)
      for (int j = 0; j < NR; ++j) {
        float v = res[m * NR + j];
        if (bias) v += to_f(bias[n0 + j]);
        y[(m0 + m) * N + n0 + j] = from_f<T>(v);
      }
  }
}

template <typename T>
void skinny_gemm_impl(const Tensor& x, const Tensor& w, const c10::optional<Tensor>& b, Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  std::vector<float> xf(static_cast<size_t>(M * K));
  const T* xp = x.data_ptr<T>();
  for (int64_t i = 0; i < M * K; ++i) xf[i] = to_f(xp[i]);
  const T* wp = w.data_ptr<T>();
  const T* bp = b ? b->data_ptr<T>() : nullptr;
  T* yp = y.data_ptr<T>();
  constexpr int NR = 4;
  const int64_t tiles = N / NR;
  // ~64 KiB of weights per task keeps the OpenMP fork worthwhile
  const int nt = (N * K * static_cast<int64_t>(sizeof(T)) > (1 << 16)) ? num_threads() : 1;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t t = 0; t < tiles; ++t) {
    skinny_rows<NR, T>(xf.data(), M, K, wp, bp, yp, N, t * NR);
  }
  for (int64_t n0 = tiles * NR; n0 < N; ++n0) skinny_rows<1, T>(xf.data(), M, K, wp, bp, yp, N, n0);
}

Tensor skinny_gemm(const Tensor& x, const Tensor& w, const c10::optional<Tensor>& b) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "skinny_gemm: shapes");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "skinny_gemm: contiguous inputs only");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "skinny_gemm: x and w dtypes differ");
  Tensor y = at::empty({x.size(0), w.size(0)}, x.options());
  if (x.scalar_type() == at::kFloat) {
    skinny_gemm_impl<float>(x, w, b, y);
  } else if (x.scalar_type() == at::kBFloat16) {
    skinny_gemm_impl<BFloat16>(x, w, b, y);
  } else {
    TORCH_CHECK(false, "skinny_gemm: only float32 and bfloat16");
  }
  return y;
}

bool has_avx512() {
#if TM_AVX512
  return __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(tokenmill, m) {
  m.def(
      "paged_attention(Tensor q, Tensor kv_cache, Tensor block_tables, Tensor query_start_loc, "
      "Tensor seq_lens, float scale) -> Tensor",
      &paged_attention);
  m.def(
      "rope_write_kv(Tensor(a!) qkv, Tensor positions, Tensor cos_sin, Tensor(b!) kv_cache, "
      "Tensor slot_mapping, int num_heads, int num_kv_heads) -> ()",
      &rope_write_kv);
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor", &rms_norm);
  m.def("add_rms_norm(Tensor x, Tensor(a!) residual, Tensor w, float eps) -> Tensor",
        &add_rms_norm);
  m.def("silu_mul(Tensor x) -> Tensor", &silu_mul);
  m.def("skinny_gemm(Tensor x, Tensor w, Tensor? b) -> Tensor", &skinny_gemm);
  m.def("has_avx512() -> bool", &has_avx512);
}
