// Linear layers: a GEMM over weights pre-packed into 16-wide panels (fp32 / bf16 weights, or
// int8 weights with one fp32 scale per output channel, dequantized in registers).

#include "gemm_kernels.h"
#include "ops.h"
#include "simd.h"

namespace tokenmill {

// ----------------------------------------------------------------------------------------
// packed-weight GEMM: y [M, N] = x [M, K] @ W^T (+ b) with W pre-packed at load time into
// panels of 16 output features, [ceil(N / 16), K, 16] (zero padded). A micro-kernel keeps
// MR x NP accumulators of 16 outputs in registers and, per k, loads NP panel vectors and
// broadcasts MR x-values: W streams sequentially (memory bound at 1 row) and each W vector
// feeds MR FMAs (compute bound from ~6 rows). Threads split the output columns. The
// micro-kernels themselves are in gemm_kernels.h.
// ----------------------------------------------------------------------------------------

namespace {

constexpr int MAX_MR = 6;
constexpr int64_t M_CHUNK = 96;  // rows per task: keeps the x rows of a task in L2

template <typename T>
void pack_impl(const T* w, T* out, int64_t N, int64_t K) {
  const int64_t P = (N + PANEL - 1) / PANEL;
  for (int64_t p = 0; p < P; ++p)
    for (int64_t k = 0; k < K; ++k)
      for (int j = 0; j < PANEL; ++j) {
        const int64_t n = p * PANEL + j;
        out[(p * K + k) * PANEL + j] = n < N ? w[n * K + k] : from_f<T>(0.f);
      }
}

// How x and W are read: PLAIN (fp32 x, [P, K, 16] panels), PAIRS_DOT (bf16 x as stored,
// k-pair panels, micro_kernel_pairs), PAIRS_FMA (fp32 x, k-pair panels).
enum Mode { PLAIN, PAIRS_DOT, PAIRS_FMA };

template <int MR, int NP, typename W, typename T, int MODE>
inline void kernel(const void* x, int64_t K, const W* w, const float* scale, const T* bias, T* y,
                   int64_t N, int64_t n0, const char* pf, int64_t pf_lines, bool silu) {
#if TM_BF16_PAIRS
  if constexpr (MODE == PAIRS_DOT) {
    micro_kernel_pairs<MR, NP, T>(static_cast<const uint32_t*>(x), K, w, bias, y, N, n0, pf,
                                  pf_lines, silu);
    return;
  } else if constexpr (MODE == PAIRS_FMA) {
    micro_kernel_pairs_fma<MR, NP, T>(static_cast<const float*>(x), K, w, bias, y, N, n0, pf,
                                      pf_lines, silu);
    return;
  }
#endif
  if constexpr (MODE == PLAIN)
    micro_kernel<MR, NP, W, T>(static_cast<const float*>(x), K, w, scale, bias, y, N, n0, pf,
                               pf_lines, silu);
}

template <int NP, typename W, typename T, int MODE>
inline void row_block(int mr, const void* x, int64_t K, const W* w, const float* scale,
                      const T* bias, T* y, int64_t N, int64_t n0, const char* pf,
                      int64_t pf_lines, bool silu) {
  switch (mr) {
    case 1: kernel<1, NP, W, T, MODE>(x, K, w, scale, bias, y, N, n0, pf, pf_lines, silu); break;
    case 2: kernel<2, NP, W, T, MODE>(x, K, w, scale, bias, y, N, n0, pf, pf_lines, silu); break;
    case 3: kernel<3, NP, W, T, MODE>(x, K, w, scale, bias, y, N, n0, pf, pf_lines, silu); break;
    case 4: kernel<4, NP, W, T, MODE>(x, K, w, scale, bias, y, N, n0, pf, pf_lines, silu); break;
    case 5: kernel<5, NP, W, T, MODE>(x, K, w, scale, bias, y, N, n0, pf, pf_lines, silu); break;
    default: kernel<6, NP, W, T, MODE>(x, K, w, scale, bias, y, N, n0, pf, pf_lines, silu); break;
  }
}

// x: fp32 [M, K], or with PAIRS_DOT the bf16 [M, K] activations themselves (K even).
template <typename W, typename T, int MODE = PLAIN>
void packed_linear_impl(const void* x, int64_t M, int64_t K, const W* wp, const float* scale,
                        int64_t N, const T* bias, T* y, bool silu) {
  const int64_t P = (N + PANEL - 1) / PANEL;
  const int nt_max = num_threads();
  // columns per task: the widest of 4 / 2 / 1 panels that still spreads evenly over the
  // threads (at one row the GEMM is memory bound and an idle thread is lost bandwidth)
  // (a SiLU-gated product needs whole (gate, up) panel pairs in every task: 2 at least)
  int np = silu ? 2 : 1;
  for (int cand : {4, 2}) {
    const int64_t tasks = (P + cand - 1) / cand;
    const int64_t per_thread = (tasks + nt_max - 1) / nt_max;
    if (tasks >= nt_max && static_cast<double>(tasks) / (per_thread * nt_max) >= 0.9) {
      np = cand;
      break;
    }
  }
  const int64_t col_tasks = (P + np - 1) / np;
  const int64_t row_tasks = (M + M_CHUNK - 1) / M_CHUNK;
  const int64_t tasks = col_tasks * row_tasks;
  const int nt = (M * N * K >= (1 << 16) && tasks > 1) ? nt_max : 1;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t rt = t / col_tasks, ct = t % col_tasks;
    const int64_t p0 = ct * np;
    const int npp = static_cast<int>(std::min<int64_t>(np, P - p0));
    const W* w = wp + p0 * K * PANEL;
    const int64_t n0 = p0 * PANEL;
    const int64_t m_end = std::min(M, (rt + 1) * M_CHUNK);
    // split the chunk's rows evenly into blocks of at most MAX_MR (32 -> 6,6,5,5,5,5, not
    // 6,6,6,6,6,2: a 2-row block runs at a third of the FMA rate)
    const int64_t m_begin = rt * M_CHUNK, rows = m_end - m_begin;
    const int64_t n_blocks = (rows + MAX_MR - 1) / MAX_MR;
    // The first row block streams this task's panels from memory into L2; the later blocks
    // re-read them from L2 and are compute bound. Meanwhile they prefetch the next task's
    // panels (the next task of a static schedule is usually this thread's), so its first
    // block finds them in L2 instead of stalling on memory: compute and memory overlap.
    // (With two blocks, one block cannot hide a whole task's stream: measured slower at 8 rows.)
    const char* pf = nullptr;
    int64_t pf_lines_total = 0;
    if (n_blocks > 2 && t + 1 < tasks) {
      const int64_t pn = ((t + 1) % col_tasks) * np;
      pf = reinterpret_cast<const char*>(wp + pn * K * PANEL);
      pf_lines_total = std::min<int64_t>(np, P - pn) * K * PANEL * sizeof(W) / 64;
    }
    const int64_t pf_per_block = n_blocks > 1 ? (pf_lines_total + n_blocks - 2) / (n_blocks - 1) : 0;
    for (int64_t blk = 0, m0 = m_begin; blk < n_blocks; ++blk) {
      const int mr = static_cast<int>(rows / n_blocks + (blk < rows % n_blocks ? 1 : 0));
      const void* xm = MODE == PAIRS_DOT
                             ? static_cast<const void*>(static_cast<const BFloat16*>(x) + m0 * K)
                             : static_cast<const void*>(static_cast<const float*>(x) + m0 * K);
      T* ym = y + m0 * (silu ? N / 2 : N);
      const int64_t pf_first = blk == 0 ? pf_lines_total : (blk - 1) * pf_per_block;
      const int64_t pf_n = std::max<int64_t>(0, std::min(pf_per_block, pf_lines_total - pf_first));
      const char* pfb = pf_n > 0 ? pf + pf_first * 64 : nullptr;
      switch (npp) {
        case 4: row_block<4, W, T, MODE>(mr, xm, K, w, scale, bias, ym, N, n0, pfb, pf_n, silu); break;
        case 3: row_block<3, W, T, MODE>(mr, xm, K, w, scale, bias, ym, N, n0, pfb, pf_n, silu); break;
        case 2: row_block<2, W, T, MODE>(mr, xm, K, w, scale, bias, ym, N, n0, pfb, pf_n, silu); break;
        default: row_block<1, W, T, MODE>(mr, xm, K, w, scale, bias, ym, N, n0, pfb, pf_n, silu); break;
      }
      m0 += mr;
    }
  }
}

}  // namespace

Tensor pack_weight(const Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "pack_weight: contiguous [N, K] weight");
  const int64_t N = w.size(0), K = w.size(1);
#if TM_BF16_PAIRS
  if (w.scalar_type() == at::kBFloat16 && K % 2 == 0) {
    // k-pair panels for vdpbf16ps: [P, K / 2, 16 outputs x 2 k] (micro_kernel_pairs)
    const int64_t P = (N + PANEL - 1) / PANEL;
    Tensor out = at::empty({P, K / 2, 2 * PANEL}, w.options());
    const BFloat16* src = w.data_ptr<BFloat16>();
    BFloat16* dst = out.data_ptr<BFloat16>();
    for (int64_t p = 0; p < P; ++p)
      for (int64_t k2 = 0; k2 < K / 2; ++k2)
        for (int j = 0; j < PANEL; ++j)
          for (int e = 0; e < 2; ++e) {
            const int64_t n = p * PANEL + j;
            dst[((p * (K / 2) + k2) * PANEL + j) * 2 + e] =
                n < N ? src[n * K + 2 * k2 + e] : BFloat16(0.f);
          }
    return out;
  }
#endif
  Tensor out = at::empty({(N + PANEL - 1) / PANEL, K, PANEL}, w.options());
  if (w.scalar_type() == at::kFloat) {
    pack_impl<float>(w.data_ptr<float>(), out.data_ptr<float>(), N, K);
  } else if (w.scalar_type() == at::kBFloat16) {
    pack_impl<BFloat16>(w.data_ptr<BFloat16>(), out.data_ptr<BFloat16>(), N, K);
  } else if (w.scalar_type() == at::kChar) {
    pack_impl<int8_t>(w.data_ptr<int8_t>(), out.data_ptr<int8_t>(), N, K);
  } else {
    TORCH_CHECK(false, "pack_weight: only float32, bfloat16 and int8");
  }
  return out;
}

namespace {
// With ``silu_gate`` the packed panels alternate (gate, up) over 2I = out_features columns
// and the op returns SiLU(gate) * up, [M, I].
int64_t output_width(int64_t out_features, bool silu_gate) {
  TORCH_CHECK(!silu_gate || out_features % (2 * PANEL) == 0,
              "silu_gate: out_features must be a multiple of 32 (whole gate/up panel pairs)");
  return silu_gate ? out_features / 2 : out_features;
}

// x as contiguous fp32 rows: the kernels broadcast fp32 x-values (a copy for bf16 x only)
const float* x_as_f32(const Tensor& x, std::vector<float>& buf) {
  if (x.scalar_type() == at::kFloat) return x.data_ptr<float>();
  const int64_t n = x.numel();
  buf.resize(static_cast<size_t>(n));
  const BFloat16* xp = x.data_ptr<BFloat16>();
  for (int64_t i = 0; i < n; ++i) buf[i] = to_f(xp[i]);
  return buf.data();
}
}  // namespace

Tensor packed_linear(const Tensor& x, const Tensor& packed, int64_t out_features,
                     const std::optional<Tensor>& b, bool silu_gate) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "packed_linear: contiguous x [M, K]");
  // [P, K, 16] panels, or bf16 k-pair panels [P, K / 2, 32] (see pack_weight)
  const bool pairs = packed.dim() == 3 && packed.size(2) == 2 * PANEL;
  TORCH_CHECK(packed.dim() == 3 && packed.size(0) * PANEL >= out_features && packed.is_contiguous() &&
                  (pairs ? packed.size(1) * 2 == x.size(1) && TM_BF16_PAIRS
                         : packed.size(2) == PANEL && packed.size(1) == x.size(1)),
              "packed_linear: packed weight [ceil(N / 16), K, 16] (or bf16 [ceil(N / 16), K / 2, "
              "32]) matching x");
  TORCH_CHECK(x.scalar_type() == packed.scalar_type(), "packed_linear: dtypes differ");
  TORCH_CHECK(!b || (b->is_contiguous() && b->numel() == out_features &&
                     b->scalar_type() == x.scalar_type()),
              "packed_linear: bias [N] of x's dtype");
  const int64_t M = x.size(0), K = x.size(1);
  Tensor y = at::empty({M, output_width(out_features, silu_gate)}, x.options());
  if (M == 0) return y;
  if (x.scalar_type() == at::kFloat) {
    packed_linear_impl<float, float>(x.data_ptr<float>(), M, K, packed.data_ptr<float>(),
                                     nullptr, out_features,
                              b ? b->data_ptr<float>() : nullptr, y.data_ptr<float>(), silu_gate);
  } else if (x.scalar_type() == at::kBFloat16) {
    const BFloat16* w = packed.data_ptr<BFloat16>();
    const BFloat16* bias = b ? b->data_ptr<BFloat16>() : nullptr;
    BFloat16* yp = y.data_ptr<BFloat16>();
    if (pairs && M == 1) {  // bf16 x as stored
      packed_linear_impl<BFloat16, BFloat16, PAIRS_DOT>(x.data_ptr<BFloat16>(), M, K, w, nullptr,
                                                        out_features, bias, yp, silu_gate);
    } else {
      std::vector<float> buf;
      const float* xf = x_as_f32(x, buf);
      if (pairs)
        packed_linear_impl<BFloat16, BFloat16, PAIRS_FMA>(xf, M, K, w, nullptr, out_features,
                                                          bias, yp, silu_gate);
      else
        packed_linear_impl<BFloat16, BFloat16>(xf, M, K, w, nullptr, out_features, bias, yp,
                                               silu_gate);
    }
  } else {
    TORCH_CHECK(false, "packed_linear: only float32 and bfloat16");
  }
  return y;
}

Tensor packed_linear_int8(const Tensor& x, const Tensor& packed, const Tensor& scale,
                          int64_t out_features, const std::optional<Tensor>& b, bool silu_gate) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "packed_linear_int8: contiguous x [M, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "packed_linear_int8: x must be float32 or bfloat16");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == PANEL && packed.size(1) == x.size(1) &&
                  packed.size(0) * PANEL >= out_features && packed.is_contiguous() &&
                  packed.scalar_type() == at::kChar,
              "packed_linear_int8: int8 packed weight [ceil(N / 16), K, 16] matching x");
  // the scale is read 16 at a time per panel, padding included
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  scale.numel() == packed.size(0) * PANEL,
              "packed_linear_int8: fp32 scale [ceil(N / 16) * 16]");
  TORCH_CHECK(!b || (b->is_contiguous() && b->numel() == out_features &&
                     b->scalar_type() == x.scalar_type()),
              "packed_linear_int8: bias [N] of x's dtype");
  const int64_t M = x.size(0), K = x.size(1);
  Tensor y = at::empty({M, output_width(out_features, silu_gate)}, x.options());
  if (M == 0) return y;
  std::vector<float> buf;
  const float* xf = x_as_f32(x, buf);
  const int8_t* w = packed.data_ptr<int8_t>();
  const float* s = scale.data_ptr<float>();
  if (x.scalar_type() == at::kFloat) {
    packed_linear_impl<int8_t, float>(xf, M, K, w, s, out_features,
                                      b ? b->data_ptr<float>() : nullptr, y.data_ptr<float>(),
                                      silu_gate);
  } else {
    packed_linear_impl<int8_t, BFloat16>(xf, M, K, w, s, out_features,
                                         b ? b->data_ptr<BFloat16>() : nullptr,
                                         y.data_ptr<BFloat16>(), silu_gate);
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

}  // namespace tokenmill
