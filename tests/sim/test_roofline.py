"""Roofline cost model: sanity against first principles, and its closed forms against loops."""

from __future__ import annotations

import random

import pytest

from tokenmill.sim.cost_model import StepFeatures
from tokenmill.sim.hardware import HARDWARE, get_hardware
from tokenmill.sim.model_spec import KNOWN_MODELS, ModelShape
from tokenmill.sim.roofline import RooflineCostModel, sum_max_affine

LLAMA3_8B_CONFIG = {  # config.json of a Llama-3-8B-shaped model (the fields that matter)
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 8192, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}  # fmt: skip


def decode_features(n: int, context: int) -> StepFeatures:
    return StepFeatures(num_seqs=n, num_tokens=n, num_samples=n, num_decode=n, decode_context=context)


def prefill_features(q: int) -> StepFeatures:
    return StepFeatures(num_seqs=1, num_tokens=q, num_samples=1, prefill_tokens=q,
                        prefill_pairs=q * (q + 1) // 2, prefill_kv=q)  # fmt: skip


def test_llama3_8b_batch1_decode_within_2x_of_weight_bytes_over_bandwidth() -> None:
    shape = ModelShape.from_hf_config(LLAMA3_8B_CONFIG, "llama-3-8b")
    assert 7.9e9 < shape.num_params < 8.1e9
    h100 = get_hardware("h100")
    cm = RooflineCostModel(shape, h100, tp=1, dtype="bf16")
    floor = shape.num_params * 2 / h100.mem_bandwidth  # every weight read once at peak bandwidth
    t = cm.step_time(decode_features(1, 512))
    assert floor <= t <= 2 * floor, (t, floor)
    # And it is memory-bound: each GEMM's memory time exceeds its compute time.
    b = cm.breakdown(decode_features(1, 512))
    for op in ("qkv", "o_proj", "gate_up", "down", "attention_decode", "lm_head"):
        assert b[op]["memory"] >= b[op]["compute"], op


def test_4096_token_prefill_is_compute_bound() -> None:
    cm = RooflineCostModel(ModelShape.from_hf_config(LLAMA3_8B_CONFIG), get_hardware("h100"))
    b = cm.breakdown(prefill_features(4096))
    compute = sum(v["compute"] for v in b.values())
    memory = sum(v["memory"] for v in b.values())
    assert compute > 3 * memory
    for op in ("qkv", "o_proj", "gate_up", "down", "attention_prefill"):
        assert b[op]["compute"] > b[op]["memory"], op
    # About 2 FLOPs per parameter per token at the achievable FLOP/s, plus attention.
    t = cm.step_time(prefill_features(4096))
    dense = 2 * cm.model.num_params * 4096 / cm.F
    assert dense < t < 1.5 * dense


def test_tensor_parallelism_splits_work_and_adds_allreduce() -> None:
    shape = ModelShape.load("llama-2-70b")
    h100 = get_hardware("h100")
    t1 = RooflineCostModel(shape, h100, tp=1).step_time(prefill_features(2048))
    t8 = RooflineCostModel(shape, h100, tp=8)
    assert t1 / 8 < t8.step_time(prefill_features(2048)) < t1 / 4
    assert t8.breakdown(decode_features(8, 8000))["allreduce"]["time"] > 0
    with pytest.raises(ValueError, match="heads"):
        RooflineCostModel(shape, h100, tp=3)


def test_named_hardware_order() -> None:
    shape = ModelShape.load("llama-3-8b")
    times = {hw: RooflineCostModel(shape, HARDWARE[hw]).step_time(decode_features(16, 16 * 1024)) for hw in HARDWARE}
    assert times["h200"] < times["h100"] < times["a100"] < times["l40s"]


def test_multistep_decode_equals_sum_of_steps() -> None:
    cm = RooflineCostModel(ModelShape.load("llama-3-8b"), get_hardware("h100"))
    for n, ctx, k in ((1, 100, 1), (4, 4000, 37), (64, 64 * 3000, 200), (256, 256 * 10, 5)):
        loop = sum(cm.step_time(decode_features(n, ctx + j * n)) for j in range(k))
        assert cm.decode_time(n, ctx, k) == pytest.approx(loop, rel=1e-9)


def test_sum_max_affine_matches_loop() -> None:
    rng = random.Random(0)
    for _ in range(3000):
        p, q, r, s = (rng.uniform(-3, 3) for _ in range(4))
        k = rng.randint(0, 40)
        want = sum(max(p + q * j, r + s * j) for j in range(k))
        assert sum_max_affine(p, q, r, s, k) == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_kv_capacity_and_shapes() -> None:
    cm = RooflineCostModel(ModelShape.load("llama-2-70b"), get_hardware("h100"), tp=8)
    # 80 GiB x 0.88 - 17 GiB of weights per GPU, 40 KiB of KV per token per GPU.
    blocks = cm.num_kv_blocks(16)
    assert 80_000 < blocks < 95_000
    with pytest.raises(ValueError, match="does not fit"):
        RooflineCostModel(ModelShape.load("llama-2-70b"), get_hardware("l40s"), tp=1).num_kv_blocks(16)
    for name in KNOWN_MODELS:
        assert ModelShape.load(name).num_params > 1e8
    with pytest.raises(ValueError, match="shared experts"):
        ModelShape.from_hf_config({**LLAMA3_8B_CONFIG, "num_experts": 60, "shared_expert_intermediate_size": 5632})
    with pytest.raises(ValueError, match="lacks"):
        ModelShape.from_hf_config({"hidden_size": 8})
