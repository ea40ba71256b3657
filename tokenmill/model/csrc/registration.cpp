// Registers tokenmill's CPU kernels as torch.ops.tokenmill.* (no pybind: loads fast).

#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(tokenmill, m) {
  m.def(
      "paged_attention(Tensor q, Tensor kv_cache, Tensor block_tables, Tensor query_start_loc, "
      "Tensor seq_lens, float scale, int sliding_window=0, float softcap=0.0, int kv_format=0, "
      "Tensor(a!)? attn_mass=None) -> Tensor",
      &tokenmill::paged_attention);
  m.def(
      "rope_write_kv(Tensor(a!) qkv, Tensor positions, Tensor cos_sin, Tensor(b!) kv_cache, "
      "Tensor slot_mapping, int num_heads, int num_kv_heads, int kv_format=0) -> ()",
      &tokenmill::rope_write_kv);
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor", &tokenmill::rms_norm);
  m.def("add_rms_norm(Tensor x, Tensor(a!) residual, Tensor w, float eps) -> Tensor",
        &tokenmill::add_rms_norm);
  m.def("silu_mul(Tensor x) -> Tensor", &tokenmill::silu_mul);
  m.def("pack_weight(Tensor w) -> Tensor", &tokenmill::pack_weight);
  m.def(
      "packed_linear(Tensor x, Tensor packed, int out_features, Tensor? b, bool silu_gate=False) "
      "-> Tensor",
      &tokenmill::packed_linear);
  m.def(
      "packed_linear_int8(Tensor x, Tensor packed, Tensor scale, int out_features, Tensor? b, "
      "bool silu_gate=False) -> Tensor",
      &tokenmill::packed_linear_int8);
  m.def("argmax_rows(Tensor x) -> Tensor", &tokenmill::argmax_rows);
  m.def(
      "sample_rows(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p, "
      "Tensor u, Tensor? bitmask=None) -> Tensor",
      &tokenmill::sample_rows);
  m.def("has_avx512() -> bool", &tokenmill::has_avx512);
  m.def(
      "qk_rms_norm(Tensor(a!) qkv, Tensor q_weight, Tensor k_weight, int num_heads, "
      "int num_kv_heads, float eps) -> ()",
      &tokenmill::qk_rms_norm);
  m.def("gelu_tanh_mul(Tensor x) -> Tensor", &tokenmill::gelu_tanh_mul);
  m.def(
      "moe_experts(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor[] w13, Tensor[] w2, "
      "Tensor[] s13, Tensor[] s2, int inter) -> Tensor",
      &tokenmill::moe_experts);
  m.def(
      "lora_apply(Tensor(a!) y, Tensor x, Tensor table, Tensor rows, Tensor offsets, int inter=0) "
      "-> ()",
      &tokenmill::lora_apply);
  m.def("silu_mul_panels(Tensor x) -> Tensor", &tokenmill::silu_mul_panels);
}
