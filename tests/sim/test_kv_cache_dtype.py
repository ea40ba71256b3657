"""The twin prices ``--kv-cache-dtype`` as the engine stores it: codes plus per-token scales."""

from __future__ import annotations

import pytest
import torch

from tests.sim.test_roofline import LLAMA3_8B_CONFIG, decode_features
from tokenmill.model.kv_format import kv_format
from tokenmill.sim.hardware import get_hardware
from tokenmill.sim.model_spec import ModelShape, kv_value_bytes
from tokenmill.sim.roofline import RooflineCostModel


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_kv_bytes_per_token_are_the_executors(name: str) -> None:
    shape = ModelShape.from_hf_config(LLAMA3_8B_CONFIG, "llama-3-8b")
    engine = kv_format(name).bytes_per_token(shape.num_layers, shape.num_kv_heads, shape.head_dim, torch.bfloat16)
    assert shape.kv_bytes_per_token(kv_value_bytes(name, shape.head_dim)) == engine
    with pytest.raises(ValueError, match="unknown KV dtype 'int3'"):
        kv_value_bytes("int3", 128)


def test_quantized_kv_holds_more_blocks_and_decodes_long_contexts_faster() -> None:
    shape = ModelShape.from_hf_config(LLAMA3_8B_CONFIG, "llama-3-8b")
    h100 = get_hardware("h100")
    models = {kv: RooflineCostModel(shape, h100, dtype="bf16", kv_dtype=kv) for kv in ("bf16", "int8", "int4")}
    blocks = {kv: cm.num_kv_blocks(16) for kv, cm in models.items()}
    assert 1.9 < blocks["int8"] / blocks["bf16"] < 2.0  # 2 bytes vs 1 + 2/128
    assert 3.5 < blocks["int4"] / blocks["bf16"] < 3.8  # vs 0.5 + 4/128
    t = {kv: cm.step_time(decode_features(64, 64 * 8192)) for kv, cm in models.items()}
    assert t["bf16"] > t["int8"] > t["int4"]
