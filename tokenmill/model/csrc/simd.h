// Shared helpers of tokenmill's CPU kernels: fp32/bf16 loads and stores, AVX-512 exp.
//
// Everything here is inline; each kernel file includes it. AVX-512 paths are used when
// the compiler targets it (-march=native on a CPU that has it); scalar code otherwise.

#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#define TM_AVX512 1
#else
#define TM_AVX512 0
#endif

using at::BFloat16;
using at::Tensor;

namespace tokenmill {
// ----------------------------------------------------------------------------------------
// small vector helpers
// ----------------------------------------------------------------------------------------

inline float to_f(float x) { return x; }
inline float to_f(BFloat16 x) { return static_cast<float>(x); }
inline float to_f(int8_t x) { return static_cast<float>(x); }
template <typename T>
inline T from_f(float x) { return static_cast<T>(x); }

// A limit below torch's thread count that the kernels' parallel regions obey (0: none). The
// thread controller (tokenmill/model/threads.py) lowers it when the process's threads wait for
// CPUs that other processes hold: a thread descheduled mid-region stalls every thread that
// waits for it at the region's end, so on shared cores fewer threads run faster.
inline std::atomic<int>& thread_limit() {
  static std::atomic<int> limit{0};
  return limit;
}
inline int num_threads() {
  const int n = at::get_num_threads();
  const int limit = thread_limit().load(std::memory_order_relaxed);
  return limit > 0 && limit < n ? limit : n;
}

#if TM_AVX512
inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const BFloat16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
// int8 weights: sign-extend 16 bytes to int32, convert to fp32 (the caller applies the scale)
inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
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
// v rounded to bf16 precision, kept as fp32 (what a bf16 tensor between two ops would hold)
inline __m512 round_bf16(__m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16(v)), 16));
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

// SiLU(g) * u, the gated MLP's activation. For bf16 tensors the model rounds g, u and
// SiLU(g) to bf16 before the product (each is a bf16 tensor in the unfused graph).
template <typename T>
inline __m512 silu_mul16(__m512 g, __m512 u) {
  if constexpr (std::is_same_v<T, BFloat16>) {
    g = round_bf16(g);
    u = round_bf16(u);
  }
  const __m512 one = _mm512_set1_ps(1.f);
  __m512 act = _mm512_mul_ps(
      g, _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)))));
  if constexpr (std::is_same_v<T, BFloat16>) act = round_bf16(act);
  return _mm512_mul_ps(act, u);
}
#endif

// ----------------------------------------------------------------------------------------
// gated products: x [T, 2I] (gate | up) -> act(gate) * up  [T, I] (SiLU, tanh-GELU)
// ----------------------------------------------------------------------------------------

// Each row's act(gate) * up: ``vec(g, u)`` on 16 lanes (AVX-512), ``scalar(g, u)`` else.
template <typename T, typename Vec, typename Scalar>
void gated_rows(const T* x, T* out, int64_t rows, int64_t inter, [[maybe_unused]] Vec vec,
                [[maybe_unused]] Scalar scalar) {
  const int nt = rows * inter >= 65536 ? num_threads() : 1;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T* g = x + r * 2 * inter;
    const T* u = g + inter;
    T* o = out + r * inter;
#if TM_AVX512
    for (int64_t i = 0; i < inter; i += 16) {
      const __mmask16 m = tail_mask(inter - i);
      store16(o + i, vec(load16(g + i, m), load16(u + i, m)), m);
    }
#else
    for (int64_t i = 0; i < inter; ++i) o[i] = scalar(to_f(g[i]), to_f(u[i]));
#endif
  }
}

// The op's checks and fp32/bf16 dispatch; ``rows(x, out, rows, inter)`` takes either type.
template <typename Rows>
Tensor gated_product(const Tensor& x, const char* name, Rows rows) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % 2 == 0, name, ": x [T, 2I]");
  const int64_t inter = x.size(1) / 2;
  Tensor out = at::empty({x.size(0), inter}, x.options());
  if (x.scalar_type() == at::kFloat) {
    rows(x.data_ptr<float>(), out.data_ptr<float>(), x.size(0), inter);
  } else if (x.scalar_type() == at::kBFloat16) {
    rows(x.data_ptr<BFloat16>(), out.data_ptr<BFloat16>(), x.size(0), inter);
  } else {
    TORCH_CHECK(false, name, ": only float32 and bfloat16");
  }
  return out;
}

}  // namespace tokenmill
