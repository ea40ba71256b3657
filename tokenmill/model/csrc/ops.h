// Declarations of tokenmill's CPU ops, registered as torch.ops.tokenmill.* in registration.cpp.

#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>

namespace tokenmill {

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& kv_cache,
                           const at::Tensor& block_tables, const at::Tensor& query_start_loc,
                           const at::Tensor& seq_lens, double scale, int64_t sliding_window,
                           double softcap, int64_t kv_format,
                           const std::optional<at::Tensor>& attn_mass);
void rope_write_kv(at::Tensor qkv, const at::Tensor& positions, const at::Tensor& cos_sin,
                   at::Tensor kv_cache, const at::Tensor& slot_mapping, int64_t num_heads,
                   int64_t kv_heads, int64_t kv_format);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
at::Tensor add_rms_norm(const at::Tensor& x, at::Tensor residual, const at::Tensor& w, double eps);
at::Tensor silu_mul(const at::Tensor& x);
at::Tensor pack_weight(const at::Tensor& w);
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                         const std::optional<at::Tensor>& b, bool silu_gate);
at::Tensor packed_linear_int8(const at::Tensor& x, const at::Tensor& packed,
                              const at::Tensor& scale, int64_t out_features,
                              const std::optional<at::Tensor>& b, bool silu_gate);
at::Tensor argmax_rows(const at::Tensor& x);
at::Tensor sample_rows(const at::Tensor& logits, const at::Tensor& temperature,
                       const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& min_p,
                       const at::Tensor& u, const std::optional<at::Tensor>& bitmask);
bool has_avx512();
void qk_rms_norm(at::Tensor qkv, const at::Tensor& q_weight, const at::Tensor& k_weight,
                 int64_t num_heads, int64_t num_kv_heads, double eps);
at::Tensor gelu_tanh_mul(const at::Tensor& x);
at::Tensor moe_experts(const at::Tensor& x, const at::Tensor& topk_ids,
                       const at::Tensor& topk_weights, at::TensorList w13, at::TensorList w2,
                       at::TensorList s13, at::TensorList s2, int64_t inter);
void lora_apply(at::Tensor y, const at::Tensor& x, const at::Tensor& table, const at::Tensor& rows,
                const at::Tensor& offsets, int64_t inter);
at::Tensor silu_mul_panels(const at::Tensor& x);

}  // namespace tokenmill
