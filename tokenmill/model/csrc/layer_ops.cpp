// Small fused layer ops: RoPE + KV-cache write, RMSNorm (+ residual add), SiLU-gated product.

#include "kv_quant.h"
#include "ops.h"
#include "simd.h"

namespace tokenmill {

// ----------------------------------------------------------------------------------------
// rope + KV write: rotate q and k of a fused qkv [T, (H + 2 KVH) * D] in place and store
// k, v into their cache slots (quantized per token and head for an int8 / int4 cache,
// kv_quant.h: the values quantized are the rotated ones as rounded to the model dtype).
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
                        int64_t kv_heads, int64_t kv_code) {
  const int64_t T_ = qkv.size(0);
  const int64_t D = cos_sin.size(1);
  const int half = static_cast<int>(D / 2);
  const int64_t row = qkv.stride(0);
  const int64_t num_blocks = kv_cache.size(1);
  const int64_t block_elems = kv_cache.size(3);
  const int64_t bs = kv_code == KV_INT8 ? block_elems / (D + 2)
                     : kv_code == KV_INT4 ? block_elems / (D / 2 + 4)
                                          : block_elems / D;
  T* base = qkv.data_ptr<T>();
  T* kc = kv_code == KV_PLAIN ? kv_cache.data_ptr<T>() : nullptr;
  T* vc = kc + num_blocks * kv_heads * block_elems;
  uint8_t* kq = kv_code == KV_PLAIN ? nullptr : kv_cache.data_ptr<uint8_t>();
  uint8_t* vq = kq + num_blocks * kv_heads * block_elems;
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const float* table = cos_sin.data_ptr<float>();
  for (int64_t t = 0; t < T_; ++t) {
    // a bad slot would write outside the cache: refuse before touching anything
    TORCH_CHECK(slots[t] < num_blocks * bs, "rope_write_kv: slot ", slots[t], " outside the cache");
    TORCH_CHECK(pos[t] >= 0 && pos[t] < cos_sin.size(0), "rope_write_kv: position ", pos[t],
                " outside the rope table");
  }
  const int nt = T_ >= 16 ? num_threads() : 1;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t t = 0; t < T_; ++t) {
    T* x = base + t * row;
    const float* cs = table + pos[t] * D;
    for (int64_t h = 0; h < num_heads + kv_heads; ++h) rotate<T>(x + h * D, cs, half);
    const int64_t slot = slots[t];
    if (slot < 0) continue;  // padding token: compute but do not store
    const int64_t blk = slot / bs, off = slot % bs;
    if (kq) {
      for (int64_t h = 0; h < kv_heads; ++h) {
        const int64_t head_block = (blk * kv_heads + h) * block_elems;  // bytes
        quantize_head<T>(x + (num_heads + h) * D, static_cast<int>(D), static_cast<int>(bs),
                         static_cast<int>(off), kv_code, true, kq + head_block);
        quantize_head<T>(x + (num_heads + kv_heads + h) * D, static_cast<int>(D),
                         static_cast<int>(bs), static_cast<int>(off), kv_code, false, vq + head_block);
      }
      continue;
    }
    for (int64_t h = 0; h < kv_heads; ++h) {
      const int64_t head_block = (blk * kv_heads + h) * block_elems;
      const T* k = x + (num_heads + h) * D;
      T* kdst = kc + head_block + off;  // K blocks are [D][bs]
      for (int64_t d = 0; d < D; ++d) kdst[d * bs] = k[d];
      std::memcpy(vc + head_block + off * D, x + (num_heads + kv_heads + h) * D, sizeof(T) * D);
    }
  }
}

void rope_write_kv(Tensor qkv, const Tensor& positions, const Tensor& cos_sin, Tensor kv_cache,
                   const Tensor& slot_mapping, int64_t num_heads, int64_t kv_heads, int64_t kv_format) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1, "qkv must be [T, (H + 2 KVH) * D]");
  TORCH_CHECK(kv_format >= KV_PLAIN && kv_format <= KV_INT4, "rope_write_kv: unknown kv_format ", kv_format);
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.is_contiguous() && kv_cache.size(2) == kv_heads &&
                  kv_cache.scalar_type() == (kv_format == KV_PLAIN ? qkv.scalar_type() : at::kByte),
              "kv_cache must be contiguous [2, num_blocks, kv_heads, block elements] of qkv's dtype "
              "(uint8 when quantized)");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() &&
                  slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous(),
              "positions and slot_mapping must be contiguous int64");
  TORCH_CHECK(cos_sin.scalar_type() == at::kFloat && cos_sin.is_contiguous() && cos_sin.dim() == 2,
              "cos_sin must be contiguous float32 [max_len, head_dim]");
  const int64_t D = cos_sin.size(1);
  const int64_t per_token = kv_format == KV_INT8 ? D + 2 : kv_format == KV_INT4 ? D / 2 + 4 : D;
  TORCH_CHECK(qkv.size(1) == (num_heads + 2 * kv_heads) * D && kv_cache.size(3) % per_token == 0 &&
                  D % 2 == 0,
              "qkv / kv_cache width does not match head_dim");
  if (qkv.scalar_type() == at::kFloat) {
    rope_write_kv_impl<float>(qkv, positions, cos_sin, kv_cache, slot_mapping, num_heads, kv_heads, kv_format);
  } else if (qkv.scalar_type() == at::kBFloat16) {
    rope_write_kv_impl<BFloat16>(qkv, positions, cos_sin, kv_cache, slot_mapping, num_heads, kv_heads, kv_format);
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
  gated_rows(
      x, out, rows, inter,
#if TM_AVX512
      [](__m512 g, __m512 u) { return silu_mul16<T>(g, u); },
#else
      nullptr,
#endif
      [](float g, float u) { return from_f<T>(g / (1.f + std::exp(-g)) * u); });
}

Tensor silu_mul(const Tensor& x) {
  return gated_product(x, "silu_mul", [](auto* in, auto* out, int64_t rows, int64_t inter) {
    silu_mul_impl(in, out, rows, inter);
  });
}

}  // namespace tokenmill

// ----------------------------------------------------------------------------------------
// argmax over the last dim of fp32 rows (greedy sampling); first index wins ties, like torch
// ----------------------------------------------------------------------------------------

namespace tokenmill {

namespace {

int64_t argmax_row(const float* x, int64_t n) {
  int64_t best = 0;
  float best_v = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
#if TM_AVX512
  if (n >= 16) {
    __m512 vmax = _mm512_loadu_ps(x);
    __m512i vidx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i cur = vidx;
    const __m512i step = _mm512_set1_epi32(16);
    for (i = 16; i + 16 <= n && i < (int64_t{1} << 31) - 16; i += 16) {
      cur = _mm512_add_epi32(cur, step);
      const __m512 v = _mm512_loadu_ps(x + i);
      const __mmask16 gt = _mm512_cmp_ps_mask(v, vmax, _CMP_GT_OQ);
      vmax = _mm512_mask_mov_ps(vmax, gt, v);
      vidx = _mm512_mask_mov_epi32(vidx, gt, cur);
    }
    alignas(64) float mv[16];
    alignas(64) int32_t mi[16];
    _mm512_store_ps(mv, vmax);
    _mm512_store_si512(mi, vidx);
    best = mi[0];
    best_v = mv[0];
    for (int j = 1; j < 16; ++j)
      if (mv[j] > best_v || (mv[j] == best_v && mi[j] < best)) best_v = mv[j], best = mi[j];
  }
#endif
  for (; i < n; ++i)
    if (x[i] > best_v) best_v = x[i], best = i;
  return best;
}

}  // namespace

Tensor argmax_rows(const Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat &&
                  x.size(1) > 0,
              "argmax_rows: contiguous float32 [rows, n]");
  const int64_t rows = x.size(0), n = x.size(1);
  Tensor out = at::empty({rows}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  const int nt = rows > 1 && rows * n >= (1 << 18) ? num_threads() : 1;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t r = 0; r < rows; ++r) op[r] = argmax_row(xp + r * n, n);
  return out;
}

}  // namespace tokenmill
