// The GEMM micro-kernels: one tile of MR rows x NP 16-output panels each, accumulators in
// registers, plus the tile's store (scale, bias, fused SiLU gate). gemm.cpp splits a GEMM into
// tiles and picks the kernel; this file holds only the inner loops.
//
//   micro_kernel            fp32 x, [P, K, 16] panels of fp32 / bf16 / int8 weights
//   micro_kernel_pairs      bf16 x as stored, bf16 k-pair panels [P, K / 2, 32] (vdpbf16ps)
//   micro_kernel_pairs_fma  fp32 x, bf16 k-pair panels widened in registers

#pragma once

#include "simd.h"

namespace tokenmill {
namespace {

constexpr int PANEL = 16;  // output features per packed panel (one fp32 vector)

#if TM_AVX512
// Spreads ``lines`` cache-line prefetches (into L2) of ``pf`` evenly over ``steps`` loop steps.
struct StreamPrefetch {
  const char* pf;
  int64_t lines, per_step;
  StreamPrefetch(const char* p, int64_t n, int64_t steps)
      : pf(p), lines(p ? n : 0), per_step(p ? (n + steps - 1) / steps : 0) {}
  void at(int64_t step) const {
    for (int64_t i = 0, line = step * per_step; i < per_step && line < lines; ++i, ++line)
      _mm_prefetch(pf + line * 64, _MM_HINT_T1);
  }
};

// Writes a tile of MR x NP accumulators: per-channel scale (int8), bias, and either the
// plain [M, N] output or, with ``silu``, SiLU(gate) * up into [M, N / 2].
template <int MR, int NP, typename T>
inline void store_tile(__m512 (&acc)[MR][NP], const float* scale, const T* bias, T* y, int64_t N,
                       int64_t n0, bool silu) {
  if (silu) {
    // panels come in (gate, up) pairs of the same 16 features (packed so at load time);
    // y is [M, N / 2] and gets SiLU(gate) * up: the [M, N] product never reaches memory
    for (int j = 0; j + 1 < NP; j += 2) {
      const int64_t col = n0 + j * PANEL, out_col = col / 2;
      const __m512 bg = bias ? load16(bias + col) : _mm512_setzero_ps();
      const __m512 bu = bias ? load16(bias + col + PANEL) : _mm512_setzero_ps();
      const __m512 sg = scale ? load16(scale + col) : _mm512_set1_ps(1.f);
      const __m512 su = scale ? load16(scale + col + PANEL) : _mm512_set1_ps(1.f);
      for (int m = 0; m < MR; ++m) {
        const __m512 g = _mm512_fmadd_ps(acc[m][j], sg, bg);
        const __m512 u = _mm512_fmadd_ps(acc[m][j + 1], su, bu);
        store16(y + m * (N / 2) + out_col, silu_mul16<T>(g, u), static_cast<__mmask16>(0xFFFF));
      }
    }
    return;
  }
  for (int j = 0; j < NP; ++j) {
    const int64_t col = n0 + j * PANEL;
    if (col >= N) break;
    const __mmask16 mask = tail_mask(N - col);
    const __m512 bv = bias ? load16(bias + col, mask) : _mm512_setzero_ps();
    if (scale) {
      const __m512 sv = load16(scale + col, mask);
      for (int m = 0; m < MR; ++m) store16(y + m * N + col, _mm512_fmadd_ps(acc[m][j], sv, bv), mask);
    } else {
      for (int m = 0; m < MR; ++m) store16(y + m * N + col, _mm512_add_ps(acc[m][j], bv), mask);
    }
  }
}

// int8 weights load through load16(const int8_t*) (simd.h); the per-channel scale is
// applied once to the accumulators at the end (it is constant along k).
// ``pf`` / ``pf_lines``: cache lines of the *next* task's weights to pull into L2 while this
// block computes on weights already there (see packed_linear_impl); none when null.
template <int MR, int NP, typename W, typename T>
inline void micro_kernel(const float* x, int64_t K, const W* w, const float* scale,
                         const T* bias, T* y, int64_t N, int64_t n0, const char* pf,
                         int64_t pf_lines, bool silu) {
  __m512 acc[MR][NP];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NP; ++j) acc[m][j] = _mm512_setzero_ps();
  const int64_t pstride = K * PANEL;
  int64_t k = 0;
  if constexpr (MR == 1) {
    // one row is latency bound on NP FMA chains: a second set of accumulators doubles them
    __m512 acc2[NP];
    for (int j = 0; j < NP; ++j) acc2[j] = _mm512_setzero_ps();
    for (; k + 2 <= K; k += 2) {
      const __m512 x0 = _mm512_set1_ps(x[k]), x1 = _mm512_set1_ps(x[k + 1]);
      if constexpr (sizeof(W) == 1) {
        // int8 panels: 32 bytes per k pair and panel, one cache line per two pairs; fetch
        // 1 KiB ahead in each of the NP streams (the hardware prefetcher ramps up slowly)
        if ((k & 3) == 0)
          for (int j = 0; j < NP; ++j)
            _mm_prefetch(reinterpret_cast<const char*>(w + j * pstride + (k + 64) * PANEL),
                         _MM_HINT_T0);
      }
      for (int j = 0; j < NP; ++j) {
        acc[0][j] = _mm512_fmadd_ps(x0, load16(w + j * pstride + k * PANEL), acc[0][j]);
        acc2[j] = _mm512_fmadd_ps(x1, load16(w + j * pstride + (k + 1) * PANEL), acc2[j]);
      }
    }
    for (int j = 0; j < NP; ++j) acc[0][j] = _mm512_add_ps(acc[0][j], acc2[j]);
  }
  const StreamPrefetch next(pf, pf_lines, K);
  for (; k < K; ++k) {
    next.at(k);
    __m512 wv[NP];
    for (int j = 0; j < NP; ++j) wv[j] = load16(w + j * pstride + k * PANEL);
    for (int m = 0; m < MR; ++m) {
      const __m512 xb = _mm512_set1_ps(x[m * K + k]);
      for (int j = 0; j < NP; ++j) acc[m][j] = _mm512_fmadd_ps(xb, wv[j], acc[m][j]);
    }
  }
  store_tile<MR, NP, T>(acc, scale, bias, y, N, n0, silu);
}

#if defined(__AVX512BF16__)
// bf16 weights on CPUs with AVX-512-BF16 are packed as k pairs, [ceil(N / 16), K / 2, 16, 2]:
// one 64-byte load holds 16 outputs x 2 k. Two kernels read that layout.
//
// One row (batch-1 decode, memory bound): ``vdpbf16ps`` multiplies the load by a broadcast
// (x[k], x[k + 1]) bf16 pair and adds both products into fp32 accumulators, one instruction
// per 32 weights with x used as stored. Fewer instructions per byte let the core keep more
// loads in flight: measured 11% faster than widening each weight to fp32 for an FMA.
// ``x`` is [M, K / 2] bf16 pairs as uint32.
template <int MR, int NP, typename T>
inline void micro_kernel_pairs(const uint32_t* x, int64_t K, const BFloat16* w, const T* bias,
                               T* y, int64_t N, int64_t n0, const char* pf, int64_t pf_lines,
                               bool silu) {
  const int64_t K2 = K / 2, pstride = K * PANEL;
  __m512 acc[MR][NP];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NP; ++j) acc[m][j] = _mm512_setzero_ps();
  int64_t k2 = 0;
  if constexpr (MR == 1) {
    // one row is latency bound on NP dot-product chains: a second set doubles them
    __m512 acc2[NP];
    for (int j = 0; j < NP; ++j) acc2[j] = _mm512_setzero_ps();
    for (; k2 + 2 <= K2; k2 += 2) {
      const __m512bh x0 = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[k2]));
      const __m512bh x1 = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[k2 + 1]));
      for (int j = 0; j < NP; ++j) {
        const BFloat16* wj = w + j * pstride + k2 * 32;
        acc[0][j] = _mm512_dpbf16_ps(acc[0][j], x0, (__m512bh)_mm512_loadu_si512(wj));
        acc2[j] = _mm512_dpbf16_ps(acc2[j], x1, (__m512bh)_mm512_loadu_si512(wj + 32));
      }
    }
    for (int j = 0; j < NP; ++j) acc[0][j] = _mm512_add_ps(acc[0][j], acc2[j]);
  }
  const StreamPrefetch next(pf, pf_lines, K2);
  for (; k2 < K2; ++k2) {
    next.at(k2);
    __m512bh wv[NP];
    for (int j = 0; j < NP; ++j)
      wv[j] = (__m512bh)_mm512_loadu_si512(w + j * pstride + k2 * 32);
    for (int m = 0; m < MR; ++m) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[m * K2 + k2]));
      for (int j = 0; j < NP; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], xb, wv[j]);
    }
  }
  store_tile<MR, NP, T>(acc, nullptr, bias, y, N, n0, silu);
}

// Several rows (compute bound): ``vdpbf16ps`` ran at 0.75x the FMA rate here, so the pair
// layout is widened instead, two cheap ops per 64-byte load (k even: shift the low halves
// up; k odd: mask the high halves), and fed to fp32 FMAs with fp32 x like micro_kernel.
template <int MR, int NP, typename T>
inline void micro_kernel_pairs_fma(const float* x, int64_t K, const BFloat16* w, const T* bias,
                                   T* y, int64_t N, int64_t n0, const char* pf,
                                   int64_t pf_lines, bool silu) {
  const int64_t K2 = K / 2, pstride = K * PANEL;
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m512 acc[MR][NP];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NP; ++j) acc[m][j] = _mm512_setzero_ps();
  const StreamPrefetch next(pf, pf_lines, K2);
  for (int64_t k2 = 0; k2 < K2; ++k2) {
    next.at(k2);
    for (int j = 0; j < NP; ++j) {
      const __m512i raw = _mm512_loadu_si512(w + j * pstride + k2 * 32);
      const __m512 w_even = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
      const __m512 w_odd = _mm512_castsi512_ps(_mm512_and_si512(raw, high));
      for (int m = 0; m < MR; ++m) {
        const float* xm = x + m * K + 2 * k2;
        acc[m][j] = _mm512_fmadd_ps(_mm512_set1_ps(xm[0]), w_even, acc[m][j]);
        acc[m][j] = _mm512_fmadd_ps(_mm512_set1_ps(xm[1]), w_odd, acc[m][j]);
      }
    }
  }
  store_tile<MR, NP, T>(acc, nullptr, bias, y, N, n0, silu);
}
#define TM_BF16_PAIRS 1
#else
#define TM_BF16_PAIRS 0
#endif

#else
#define TM_BF16_PAIRS 0
template <int MR, int NP, typename W, typename T>
inline void micro_kernel(const float* x, int64_t K, const W* w, const float* scale,
                         const T* bias, T* y, int64_t N, int64_t n0, const char*, int64_t,
                         bool silu) {
  float acc[MR][NP * PANEL] = {};
  const int64_t pstride = K * PANEL;
  for (int64_t k = 0; k < K; ++k)
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < NP; ++j)
        for (int c = 0; c < PANEL; ++c)
          acc[m][j * PANEL + c] += x[m * K + k] * to_f(w[j * pstride + k * PANEL + c]);
  auto value = [&](int m, int c) {
    return acc[m][c] * (scale ? scale[n0 + c] : 1.f) + (bias ? to_f(bias[n0 + c]) : 0.f);
  };
  if (silu) {
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j + 1 < NP; j += 2)
        for (int c = 0; c < PANEL; ++c) {
          const float g = to_f(from_f<T>(value(m, j * PANEL + c)));
          const float u = to_f(from_f<T>(value(m, (j + 1) * PANEL + c)));
          const float act = to_f(from_f<T>(g / (1.f + std::exp(-g))));
          y[m * (N / 2) + (n0 + j * PANEL) / 2 + c] = from_f<T>(act * u);
        }
    return;
  }
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < NP * PANEL && n0 + c < N; ++c) y[m * N + n0 + c] = from_f<T>(value(m, c));
}
#endif

}  // namespace
}  // namespace tokenmill
