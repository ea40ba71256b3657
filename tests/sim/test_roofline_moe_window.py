"""The roofline for mixture-of-experts models (active parameters, experts touched) and for
sliding-window layers (their KV reads stop growing at the window)."""

from __future__ import annotations

import dataclasses

import pytest

from tests.sim.test_roofline import decode_features, prefill_features
from tokenmill.sim.hardware import get_hardware
from tokenmill.sim.model_spec import ModelShape
from tokenmill.sim.roofline import RooflineCostModel

QWEN3_MOE_CONFIG = {  # config.json fields of a Qwen3-30B-A3B-shaped model, 4 dense layers
    "model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
    "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
    "vocab_size": 151936, "num_experts": 128, "num_experts_per_tok": 8, "mlp_only_layers": [0, 1, 2, 3],
}  # fmt: skip


def test_mixtral_8x7b_counts_active_parameters() -> None:
    shape = ModelShape.load("mixtral-8x7b")
    assert 46.5e9 < shape.num_params < 46.9e9 and 12.7e9 < shape.num_active_params < 13.0e9
    h100 = get_hardware("h100")
    cm = RooflineCostModel(shape, h100, tp=2)
    assert cm.weight_bytes_per_device() == pytest.approx(shape.num_params * 2 / 2, rel=0.01)
    assert cm.num_kv_blocks(16) > 1000  # 47 GB of weights per GPU leave room for KV
    one = RooflineCostModel(shape, h100, tp=1)
    # batch-1 decode reads the two experts it routes to, not all eight
    floor = shape.num_active_params * 2 / h100.mem_bandwidth
    t1 = one.step_time(decode_features(1, 512))
    assert floor <= t1 <= 2 * floor, (t1, floor)
    assert t1 < shape.num_params * 2 / h100.mem_bandwidth / 2
    # a batch of 64 touches every expert: it reads about all the weights
    t64 = one.step_time(decode_features(64, 64 * 512))
    assert t64 >= shape.num_params * 2 / h100.mem_bandwidth
    experts = [one.breakdown(decode_features(n, n * 512))["experts"]["memory"] for n in (1, 64)]
    assert 3.9 < experts[1] / experts[0] < 4.2  # all 8 experts against 2
    # a long prefill is compute bound at ~2 FLOPs per active parameter per token
    t = one.step_time(prefill_features(4096))
    dense = 2 * shape.num_active_params * 4096 / one.F
    assert dense < t < 1.5 * dense


def test_qwen3_moe_dense_layers_and_multistep_closed_form() -> None:
    shape = ModelShape.from_hf_config(QWEN3_MOE_CONFIG)
    assert (shape.num_moe_layers, shape.num_dense_layers) == (44, 4)
    assert 3.0e9 < shape.num_active_params < 4.0e9 < 25e9 < shape.num_params
    cm = RooflineCostModel(shape, get_hardware("h100"))
    for n, ctx, k in ((1, 100, 1), (8, 8 * 900, 37), (64, 64 * 300, 120)):
        loop = sum(cm.step_time(decode_features(n, ctx + j * n)) for j in range(k))
        assert cm.decode_time(n, ctx, k) == pytest.approx(loop, rel=1e-9)


def test_sliding_layers_stop_reading_kv_at_the_window() -> None:
    gemma = ModelShape.load("gemma-2-9b")
    assert (gemma.sliding_window, gemma.num_sliding_layers, gemma.num_layers) == (4096, 21, 42)
    full = dataclasses.replace(gemma, sliding_window=0, num_sliding_layers=0)
    hw = get_hardware("h100")
    slide_cm, full_cm = RooflineCostModel(gemma, hw), RooflineCostModel(full, hw)
    short, long = decode_features(4, 4 * 2000), decode_features(4, 4 * 8000)
    att = "attention_decode"
    # within the window nothing changes; past it the sliding half reads 4096 tokens, not 8000
    assert slide_cm.breakdown(short)[att]["memory"] == pytest.approx(full_cm.breakdown(short)[att]["memory"])
    ratio = slide_cm.breakdown(long)[att]["memory"] / full_cm.breakdown(long)[att]["memory"]
    assert ratio == pytest.approx((21 * 8000 + 21 * 4096) / (42 * 8000), rel=0.01)
    prefill = prefill_features(8192)
    causal, windowed = 8192 * 8193 / 2, 4096 * 4097 / 2 + 4096 * 4096  # query-key pairs
    ratio = slide_cm.breakdown(prefill)["attention_prefill"]["compute"] / full_cm.breakdown(prefill)[
        "attention_prefill"
    ]["compute"]
    assert ratio == pytest.approx((21 * causal + 21 * windowed) / (42 * causal), rel=1e-6)
    # the multi-step closed form follows the context across the window
    for n, ctx, k in ((2, 2 * 4000, 300), (3, 3 * 100, 50), (1, 9000, 7)):
        loop = sum(slide_cm.step_time(decode_features(n, ctx + j * n)) for j in range(k))
        assert slide_cm.decode_time(n, ctx, k) == pytest.approx(loop, rel=1e-9)
    # configs say which layers slide the way transformers reads them
    mistral = {"model_type": "mistral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
               "num_attention_heads": 4, "vocab_size": 100, "max_position_embeddings": 4096}  # fmt: skip
    assert ModelShape.from_hf_config({**mistral, "sliding_window": 512}).num_sliding_layers == 4
    assert ModelShape.from_hf_config({**mistral, "sliding_window": 8192}).num_sliding_layers == 0
    qwen = {**mistral, "model_type": "qwen2", "sliding_window": 512, "max_window_layers": 3}
    assert ModelShape.from_hf_config(qwen).num_sliding_layers == 0
    assert ModelShape.from_hf_config({**qwen, "use_sliding_window": True}).num_sliding_layers == 1
