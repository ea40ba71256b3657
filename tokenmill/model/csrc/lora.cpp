// LoRA over a mixed batch, grouped by adapter (Punica's SGMV idea, on CPU).
//
// One call adds every adapter's low-rank product to one linear layer's output:
// y[t, part] += (x[t] @ A_s^T)[part's ranks] @ B_s,part^T for each row t whose adapter is s;
// rows of the base model are left alone. The caller groups the batch's adapted rows by
// adapter once per forward (``rows``: row indices, adapter after adapter; ``offsets``: where
// each adapter's rows start), so each adapter's weights stream through the cores once per
// step however many of its requests run, and no Python loop visits adapters or requests.
//
// Two phases share one parallel region: shrink (h = x @ A^T, tasks of adapter x row chunk x
// 16 ranks) and expand (y += h @ B^T, tasks of adapter x part x 16-column panels x row
// chunk). No two tasks write the same output: adapters own disjoint rows, parts and panels
// disjoint columns.
//
// An adapter's weights for one fused layer are described by a row of ``table`` (int64):
//   0 A: [ceil(R / 16), in, 16] panels of its stacked A (R ranks over all its parts)
//   1 R   2 in_features   3 dtype (0 float32, 1 bfloat16)   4 parts (0..3)
//   then per part: B [ceil(out / 16), rank, 16] panels (scale folded in), rank, first rank
//   in h, first output column in the layer ([q; k; v], [gate; up] order), output columns.
// The A and B fields are addresses of tensors the caller keeps alive for the call (as
// Punica's and vLLM's kernels take pointer arrays): one small tensor per adapter and layer
// replaces a list of tensors per call. With ``inter`` > 0, y is a gated MLP's [gate; up]
// product in the fused kernel's layout (alternating 16-column gate and up panels, see
// backend.interleave_gate_up), logical column c of the 2 * inter landing where that layout
// puts it; ``silu_mul_panels`` then applies SiLU(gate) * up.

#include "ops.h"
#include "simd.h"

namespace tokenmill {
namespace {

constexpr int64_t LP = 16;            // outputs per panel
constexpr int LORA_MR = 6;            // rows per micro-kernel block
constexpr int64_t LORA_ROWS = 48;     // rows per task
constexpr int LORA_MAX_PARTS = 3;
constexpr int64_t LORA_FIELDS = 5 + 5 * LORA_MAX_PARTS;

struct LoraPartDesc {
  const void* b;
  int64_t rank, h_off, out_off, out_len;
};

struct LoraSlot {
  const void* a;
  int64_t R, in, dtype, parts;
  LoraPartDesc part[LORA_MAX_PARTS];
  int64_t r0, r1;  // its rows in the grouped order
};

// h[m, 0:16] (masked to ``valid``) = x[m] @ panel^T for MR rows of fp32 x (stride K)
template <int MR, typename W>
inline void shrink_rows(const float* x, int64_t K, const W* a, float* h, int64_t ldh, int64_t valid) {
#if TM_AVX512
  __m512 acc0[MR], acc1[MR];
  for (int m = 0; m < MR; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
  int64_t k = 0;
  // two accumulator sets: half as long a dependency chain per row
  for (; k + 2 <= K; k += 2) {
    const __m512 w0 = load16(a + k * LP), w1 = load16(a + (k + 1) * LP);
    for (int m = 0; m < MR; ++m) {
      acc0[m] = _mm512_fmadd_ps(_mm512_set1_ps(x[m * K + k]), w0, acc0[m]);
      acc1[m] = _mm512_fmadd_ps(_mm512_set1_ps(x[m * K + k + 1]), w1, acc1[m]);
    }
  }
  if (k < K) {
    const __m512 w0 = load16(a + k * LP);
    for (int m = 0; m < MR; ++m) acc0[m] = _mm512_fmadd_ps(_mm512_set1_ps(x[m * K + k]), w0, acc0[m]);
  }
  const __mmask16 mask = tail_mask(valid);
  for (int m = 0; m < MR; ++m) store16(h + m * ldh, _mm512_add_ps(acc0[m], acc1[m]), mask);
#else
  float acc[MR][LP] = {};
  for (int64_t k = 0; k < K; ++k)
    for (int m = 0; m < MR; ++m)
      for (int64_t c = 0; c < LP; ++c) acc[m][c] += x[m * K + k] * to_f(a[k * LP + c]);
  for (int m = 0; m < MR; ++m)
    for (int64_t c = 0; c < valid && c < LP; ++c) h[m * ldh + c] = acc[m][c];
#endif
}

// y[rows[m], col] += h[m, 0:rank] @ panel for MR rows; ``col`` the panel's first physical
// column, ``valid`` how many of its 16 columns exist
template <int MR, typename W, typename T>
inline void expand_rows(const float* h, int64_t ldh, const W* b, int64_t rank, const int64_t* rows,
                        T* y, int64_t ldy, int64_t col, int64_t valid) {
#if TM_AVX512
  const __mmask16 mask = tail_mask(valid);
  __m512 acc[MR];
  for (int m = 0; m < MR; ++m) acc[m] = load16(y + rows[m] * ldy + col, mask);
  for (int64_t k = 0; k < rank; ++k) {
    const __m512 w = load16(b + k * LP);
    for (int m = 0; m < MR; ++m) acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(h[m * ldh + k]), w, acc[m]);
  }
  for (int m = 0; m < MR; ++m) store16(y + rows[m] * ldy + col, acc[m], mask);
#else
  for (int m = 0; m < MR; ++m) {
    float acc[LP];
    T* ym = y + rows[m] * ldy + col;
    for (int64_t c = 0; c < valid; ++c) acc[c] = to_f(ym[c]);
    for (int64_t k = 0; k < rank; ++k)
      for (int64_t c = 0; c < valid; ++c) acc[c] += h[m * ldh + k] * to_f(b[k * LP + c]);
    for (int64_t c = 0; c < valid; ++c) ym[c] = from_f<T>(acc[c]);
  }
#endif
}

struct ShrinkTask {
  int32_t slot;
  int32_t panel;
  int64_t j0, j1;
};

struct ExpandTask {
  int32_t slot, part;
  int64_t panel, j0, j1;
};

// Split rows [j0, j1) into blocks of at most LORA_MR and run ``f(mr, j)`` on each.
template <typename F>
inline void row_blocks(int64_t j0, int64_t j1, F&& f) {
  for (int64_t j = j0; j < j1;) {
    const int mr = static_cast<int>(std::min<int64_t>(LORA_MR, j1 - j));
    f(mr, j);
    j += mr;
  }
}

template <typename W>
inline void shrink_block(int mr, const float* x, int64_t K, const W* a, float* h, int64_t ldh, int64_t valid) {
  switch (mr) {
#define TM_LORA_MR(R) \
  case R: shrink_rows<R, W>(x, K, a, h, ldh, valid); break;
    TM_LORA_MR(1) TM_LORA_MR(2) TM_LORA_MR(3) TM_LORA_MR(4) TM_LORA_MR(5)
#undef TM_LORA_MR
    default: shrink_rows<6, W>(x, K, a, h, ldh, valid); break;
  }
}

template <typename W, typename T>
inline void expand_block(int mr, const float* h, int64_t ldh, const W* b, int64_t rank,
                         const int64_t* rows, T* y, int64_t ldy, int64_t col, int64_t valid) {
  switch (mr) {
#define TM_LORA_MR(R) \
  case R: expand_rows<R, W, T>(h, ldh, b, rank, rows, y, ldy, col, valid); break;
    TM_LORA_MR(1) TM_LORA_MR(2) TM_LORA_MR(3) TM_LORA_MR(4) TM_LORA_MR(5)
#undef TM_LORA_MR
    default: expand_rows<6, W, T>(h, ldh, b, rank, rows, y, ldy, col, valid); break;
  }
}

template <typename W, typename T>
void lora_impl(T* y, int64_t ldy, const T* x, int64_t K, const std::vector<LoraSlot>& slots,
               const int64_t* rows, int64_t n, int64_t inter) {
  int64_t ldh = 0;
  for (const auto& s : slots) ldh = std::max(ldh, s.R);
  std::vector<float> xs(static_cast<size_t>(n * K)), h(static_cast<size_t>(n * ldh));
  std::vector<ShrinkTask> shrink;
  std::vector<ExpandTask> expand;
  int64_t flops = 0;
  for (int32_t si = 0; si < static_cast<int32_t>(slots.size()); ++si) {
    const LoraSlot& s = slots[si];
    if (s.R == 0) continue;
    for (int64_t j0 = s.r0; j0 < s.r1; j0 += LORA_ROWS) {
      const int64_t j1 = std::min(s.r1, j0 + LORA_ROWS);
      for (int32_t p = 0; p * LP < s.R; ++p) shrink.push_back({si, p, j0, j1});
      for (int32_t q = 0; q < s.parts; ++q)
        for (int64_t p = 0; p * LP < s.part[q].out_len; ++p) expand.push_back({si, q, p, j0, j1});
    }
    int64_t per_row = K * s.R;
    for (int32_t q = 0; q < s.parts; ++q) per_row += s.part[q].rank * s.part[q].out_len;
    flops += 2 * per_row * (s.r1 - s.r0);
  }
  const int64_t n_shrink = static_cast<int64_t>(shrink.size());
  const int64_t n_expand = static_cast<int64_t>(expand.size());
  const int nt = flops >= (1 << 17) ? num_threads() : 1;
  // one thread takes every task in one go: handing them out one by one costs a runtime call
  // each, as much as a decode row's expand task itself
  const int64_t chunk = nt > 1 ? 1 : std::max<int64_t>({n_shrink, n_expand, 1});
#pragma omp parallel num_threads(nt)
  {
#pragma omp for schedule(static)
    for (int64_t j = 0; j < n; ++j) {
      const T* src = x + rows[j] * K;
      float* dst = xs.data() + j * K;
      for (int64_t k = 0; k < K; ++k) dst[k] = to_f(src[k]);
    }
#pragma omp for schedule(dynamic, chunk)
    for (int64_t t = 0; t < n_shrink; ++t) {
      const ShrinkTask& task = shrink[t];
      const LoraSlot& s = slots[task.slot];
      const W* a = static_cast<const W*>(s.a) + task.panel * K * LP;
      const int64_t valid = std::min<int64_t>(LP, s.R - task.panel * LP);
      row_blocks(task.j0, task.j1, [&](int mr, int64_t j) {
        shrink_block<W>(mr, xs.data() + j * K, K, a, h.data() + j * ldh + task.panel * LP, ldh, valid);
      });
    }
#pragma omp for schedule(dynamic, chunk)
    for (int64_t t = 0; t < n_expand; ++t) {
      const ExpandTask& task = expand[t];
      const LoraPartDesc& part = slots[task.slot].part[task.part];
      const W* b = static_cast<const W*>(part.b) + task.panel * part.rank * LP;
      const int64_t c = part.out_off + task.panel * LP;  // logical column
      int64_t col = c, valid = std::min<int64_t>(LP, part.out_len - task.panel * LP);
      if (inter > 0) {  // alternating 16-column gate and up panels
        const int64_t g = c / inter, i = c % inter;
        col = (i / LP) * 2 * LP + g * LP;
      }
      row_blocks(task.j0, task.j1, [&](int mr, int64_t j) {
        expand_block<W, T>(mr, h.data() + j * ldh + part.h_off, ldh, b, part.rank, rows + j, y, ldy,
                           col, valid);
      });
    }
  }
}

}  // namespace

void lora_apply(Tensor y, const Tensor& x, const Tensor& table, const Tensor& rows,
                const Tensor& offsets, int64_t inter) {
  TORCH_CHECK(y.dim() == 2 && y.is_contiguous() && x.dim() == 2 && x.is_contiguous() &&
                  x.size(0) == y.size(0) && x.scalar_type() == y.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "lora_apply: contiguous float32 / bfloat16 y [T, N] and x [T, K] of one dtype");
  TORCH_CHECK(table.dim() == 2 && table.size(1) == LORA_FIELDS && table.is_contiguous() &&
                  table.scalar_type() == at::kLong,
              "lora_apply: table int64 [adapters, ", LORA_FIELDS, "]");
  const int64_t S = table.size(0), M = y.size(0), N = y.size(1), K = x.size(1);
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == S + 1 && offsets.is_contiguous() &&
                  offsets.scalar_type() == at::kLong,
              "lora_apply: offsets int64 [adapters + 1]");
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0, "lora_apply: offsets start at 0");
  for (int64_t s = 0; s < S; ++s) TORCH_CHECK(off[s + 1] >= off[s], "lora_apply: offsets decrease");
  const int64_t n = off[S];
  TORCH_CHECK(rows.dim() == 1 && rows.size(0) == n && rows.is_contiguous() &&
                  rows.scalar_type() == at::kLong,
              "lora_apply: rows int64 [offsets[-1]]");
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t j = 0; j < n; ++j) TORCH_CHECK(rp[j] >= 0 && rp[j] < M, "lora_apply: row ", rp[j], " outside [0, ", M, ")");
  TORCH_CHECK(inter == 0 || (inter % LP == 0 && N == 2 * inter),
              "lora_apply: a [gate; up] layout needs N = 2 * inter with inter % 16 == 0");
  const int64_t dtype = x.scalar_type() == at::kFloat ? 0 : 1;
  const int64_t* tb = table.data_ptr<int64_t>();
  std::vector<LoraSlot> slots(static_cast<size_t>(S));
  for (int64_t s = 0; s < S; ++s) {
    const int64_t* f = tb + s * LORA_FIELDS;
    LoraSlot& slot = slots[s];
    slot.a = reinterpret_cast<const void*>(f[0]);
    slot.R = f[1];
    slot.in = f[2];
    slot.dtype = f[3];
    slot.parts = f[4];
    slot.r0 = off[s];
    slot.r1 = off[s + 1];
    if (slot.R == 0) continue;  // this adapter leaves this layer alone
    TORCH_CHECK(slot.a != nullptr && slot.R > 0 && slot.in == K && slot.dtype == dtype &&
                    slot.parts >= 1 && slot.parts <= LORA_MAX_PARTS,
                "lora_apply: adapter ", s, " does not match x (in_features, dtype) or has no parts");
    for (int64_t q = 0; q < slot.parts; ++q) {
      const int64_t* pf = f + 5 + 5 * q;
      LoraPartDesc& p = slot.part[q];
      p = {reinterpret_cast<const void*>(pf[0]), pf[1], pf[2], pf[3], pf[4]};
      TORCH_CHECK(p.b != nullptr && p.rank >= 1 && p.h_off >= 0 && p.h_off + p.rank <= slot.R &&
                      p.out_off >= 0 && p.out_len >= 1 && p.out_off + p.out_len <= N &&
                      (inter == 0 || (p.out_off % LP == 0 && p.out_off % inter + p.out_len <= inter)),
                  "lora_apply: adapter ", s, " part ", q, " does not fit the layer");
    }
  }
  if (n == 0) return;
  if (dtype == 0)
    lora_impl<float, float>(y.data_ptr<float>(), N, x.data_ptr<float>(), K, slots, rp, n, inter);
  else
    lora_impl<BFloat16, BFloat16>(y.data_ptr<BFloat16>(), N, x.data_ptr<BFloat16>(), K, slots, rp, n,
                                  inter);
}

Tensor silu_mul_panels(const Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % (2 * LP) == 0 &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "silu_mul_panels: contiguous float32 / bfloat16 [M, 2I] with I % 16 == 0");
  const int64_t M = x.size(0), I = x.size(1) / 2;
  Tensor out = at::empty({M, I}, x.options());
  auto run = [&](auto* xp, auto* op) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(op)>>;
    const int nt = M * I >= 65536 ? num_threads() : 1;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t p = 0; p < I / LP; ++p) {
        const T* g = xp + m * 2 * I + p * 2 * LP;
        T* o = op + m * I + p * LP;
#if TM_AVX512
        store16(o, silu_mul16<T>(load16(g), load16(g + LP)), static_cast<__mmask16>(0xFFFF));
#else
        for (int64_t c = 0; c < LP; ++c) {
          const float gv = to_f(g[c]), uv = to_f(g[LP + c]);
          const float act = to_f(from_f<T>(gv / (1.f + std::exp(-gv))));
          o[c] = from_f<T>(act * uv);
        }
#endif
      }
    }
  };
  if (x.scalar_type() == at::kFloat)
    run(x.data_ptr<float>(), out.data_ptr<float>());
  else
    run(x.data_ptr<BFloat16>(), out.data_ptr<BFloat16>());
  return out;
}

}  // namespace tokenmill
