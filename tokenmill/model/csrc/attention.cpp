// Paged attention over block tables, straight from the KV-cache blocks (fp32 / bf16).

#include "ops.h"
#include "simd.h"

namespace tokenmill {
namespace {
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

}  // namespace

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

}  // namespace tokenmill
