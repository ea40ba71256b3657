// Layer ops some model families add: per-head q/k RMSNorm (Qwen3, Gemma 3) and the GeGLU
// activation (Gemma).

#include "ops.h"
#include "simd.h"

namespace tokenmill {

// ----------------------------------------------------------------------------------------
// per-head RMSNorm of the q and k heads of a fused qkv [T, (H + 2 KVH) * D], in place
// (before RoPE), rounding like rms_norm: normalise in fp32, round, scale by the weight
// ----------------------------------------------------------------------------------------

template <typename T>
void qk_rms_norm_impl(T* base, int64_t rows, int64_t row_stride, const T* qw, const T* kw,
                      int64_t heads, int64_t kv_heads, int64_t D, float eps) {
  const int nt = rows >= 16 ? num_threads() : 1;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t h = 0; h < heads + kv_heads; ++h) {
      T* x = base + t * row_stride + h * D;
      const T* w = h < heads ? qw : kw;
      float ss = 0.f;
      for (int64_t d = 0; d < D; ++d) ss += to_f(x[d]) * to_f(x[d]);
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
      for (int64_t d = 0; d < D; ++d)
        x[d] = from_f<T>(to_f(w[d]) * to_f(from_f<T>(to_f(x[d]) * inv)));
    }
  }
}

void qk_rms_norm(Tensor qkv, const Tensor& q_weight, const Tensor& k_weight, int64_t num_heads,
                 int64_t num_kv_heads, double eps) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1, "qk_rms_norm: qkv [T, (H + 2 KVH) * D]");
  const int64_t D = q_weight.numel();
  TORCH_CHECK(q_weight.is_contiguous() && k_weight.is_contiguous() && k_weight.numel() == D &&
                  qkv.size(1) == (num_heads + 2 * num_kv_heads) * D,
              "qk_rms_norm: weights [head_dim] matching qkv");
  TORCH_CHECK(q_weight.scalar_type() == qkv.scalar_type() &&
                  k_weight.scalar_type() == qkv.scalar_type(),
              "qk_rms_norm: weights and qkv dtypes differ");
  if (qkv.scalar_type() == at::kFloat) {
    qk_rms_norm_impl<float>(qkv.data_ptr<float>(), qkv.size(0), qkv.stride(0),
                            q_weight.data_ptr<float>(), k_weight.data_ptr<float>(), num_heads,
                            num_kv_heads, D, static_cast<float>(eps));
  } else if (qkv.scalar_type() == at::kBFloat16) {
    qk_rms_norm_impl<BFloat16>(qkv.data_ptr<BFloat16>(), qkv.size(0), qkv.stride(0),
                               q_weight.data_ptr<BFloat16>(), k_weight.data_ptr<BFloat16>(),
                               num_heads, num_kv_heads, D, static_cast<float>(eps));
  } else {
    TORCH_CHECK(false, "qk_rms_norm: only float32 and bfloat16");
  }
}

// ----------------------------------------------------------------------------------------
// GeGLU: x [T, 2I] (gate | up) -> gelu_tanh(gate) * up  [T, I], with
// gelu_tanh(g) = g / 2 * (1 + tanh(sqrt(2 / pi) * (g + 0.044715 g^3)))
// ----------------------------------------------------------------------------------------

#if TM_AVX512
template <typename T>
inline __m512 gelu_mul16(__m512 g, __m512 u) {
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 inner = _mm512_mul_ps(
      _mm512_set1_ps(0.7978845608028654f),
      _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), _mm512_mul_ps(g, g)), g, g));
  // tanh(y) = 1 - 2 / (exp(2y) + 1): exp16 saturates, so large |y| give exactly +-1
  const __m512 e = exp16(_mm512_add_ps(inner, inner));
  const __m512 th = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.f), _mm512_add_ps(e, one)));
  __m512 act = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), g), _mm512_add_ps(one, th));
  if constexpr (std::is_same_v<T, BFloat16>) act = round_bf16(act);  // a bf16 tensor unfused
  return _mm512_mul_ps(act, u);
}
#endif

template <typename T>
void gelu_tanh_mul_impl(const T* x, T* out, int64_t rows, int64_t inter) {
  gated_rows(
      x, out, rows, inter,
#if TM_AVX512
      [](__m512 g, __m512 u) { return gelu_mul16<T>(g, u); },
#else
      nullptr,
#endif
      [](float g, float u) {
        const float act = 0.5f * g * (1.f + std::tanh(0.7978845608028654f * (g + 0.044715f * g * g * g)));
        return from_f<T>(to_f(from_f<T>(act)) * u);
      });
}

Tensor gelu_tanh_mul(const Tensor& x) {
  return gated_product(x, "gelu_tanh_mul", [](auto* in, auto* out, int64_t rows, int64_t inter) {
    gelu_tanh_mul_impl(in, out, rows, inter);
  });
}

}  // namespace tokenmill
