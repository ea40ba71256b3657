"""Reading PEFT adapter directories: what loads, and a clear refusal for everything else."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.lora.conftest import make_peft_adapter
from tokenmill.lora.adapter import load_adapter
from tokenmill.lora.errors import LoraError
from tokenmill.model.loader import read_model_config


@pytest.fixture(scope="module")
def config(lora_base: Path):
    return read_model_config(lora_base, "float32")


def load(path: Path, config, max_rank: int = 16):
    return load_adapter(path, config, max_rank=max_rank, dtype=torch.float32, name="x")


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_loads_peft_layout(peft_adapters, config) -> None:
    w = load(peft_adapters["attn"], config)
    assert w.rank == 4 and w.targets == ("q_proj", "v_proj")
    assert set(w.modules) == {(i, "qkv") for i in range(config.num_layers)}
    qkv = w.modules[(0, "qkv")]
    # q and v adapted, k not: A stacks q's then v's ranks; v's outputs start after q and k
    assert qkv.a.shape == (8, config.hidden_size)
    assert [(p.out_offset, p.out_features, p.h_offset, p.rank) for p in qkv.parts] == [
        (0, config.q_size, 0, 4), (config.q_size + config.kv_size, config.kv_size, 4, 4)
    ]
    # B carries the scale lora_alpha / r = 2
    raw = load_file(peft_adapters["attn"] / "adapter_model.safetensors")
    b = raw["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    torch.testing.assert_close(qkv.parts[0].b, 2.0 * b)
    mlp = load(peft_adapters["mlp"], config)
    assert mlp.modules[(0, "down")].rank == 2  # rank_pattern
    assert set(mlp.targets) == {"o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "adapter_config.json").unlink(), "no adapter_config.json"),
        (lambda d: (d / "adapter_config.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
        (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}"),
         "cannot be read"),
        (lambda d: _edit_config(d, use_dora=True), "DoRA adapters are not supported"),
        (lambda d: _edit_config(d, modules_to_save=["lm_head"]), "modules_to_save"),
        (lambda d: _edit_config(d, bias="all"), "bias='all' is not supported"),
        (lambda d: _edit_config(d, peft_type="IA3"), "only LORA adapters"),
        (lambda d: _edit_config(d, r=8), "has rank 4 but adapter_config.json says r=8"),
        (lambda d: _edit_tensors(d, drop="lora_B"), "has no lora_B weight"),
        (lambda d: _edit_tensors(d, extra="base_model.model.lm_head.lora_A.weight"), "not a linear layer"),
        (lambda d: _edit_tensors(d, extra="base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"),
         "not a linear layer"),
        (lambda d: _edit_tensors(d, extra="base_model.model.model.embed_tokens.lora_embedding_A"),
         "not a LoRA A or B weight"),
        (lambda d: _edit_tensors(d, nan=True), "NaN or infinite"),
    ],
)  # fmt: skip
def test_malformed_directories_are_refused_by_name(peft_adapters, config, tmp_path, damage, message) -> None:
    d = copy(peft_adapters["attn"], tmp_path / "broken")
    damage(d)
    with pytest.raises(LoraError, match=message) as err:
        load(d, config)
    assert "'x'" in str(err.value)  # the adapter is named


def test_pickle_only_and_missing_directory(peft_adapters, config, tmp_path) -> None:
    d = copy(peft_adapters["attn"], tmp_path / "bin")
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    with pytest.raises(LoraError, match="pickle"):
        load(d, config)
    with pytest.raises(LoraError, match="is not a directory"):
        load(tmp_path / "nope", config)


def test_rank_over_the_maximum(peft_adapters, config) -> None:
    with pytest.raises(LoraError, match="rank 16, over the maximum LoRA rank 8"):
        load(peft_adapters["full"], config, max_rank=8)


def test_adapter_for_another_base_shape(lora_base, config, tmp_path) -> None:
    """An adapter made for a wider model names the tensor and says it is for another base."""
    from tests.conftest import make_tiny_model

    other = tmp_path / "other-base"
    make_tiny_model(other)
    cfg = json.loads((other / "config.json").read_text())
    cfg.update(hidden_size=96, intermediate_size=160)
    (other / "config.json").write_text(json.dumps(cfg))
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(other)).save_pretrained(other)
    adapter = make_peft_adapter(other, tmp_path / "wide", seed=0, r=4, lora_alpha=4, target_modules=["q_proj"])
    with pytest.raises(LoraError, match=r"has shape \[4, 96\] but .*q_proj of this model takes 64 inputs: "
                                        r"the adapter was made for a different base model"):  # fmt: skip
        load(adapter, config)


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def _edit_tensors(d: Path, drop: str | None = None, extra: str | None = None, nan: bool = False) -> None:
    path = d / "adapter_model.safetensors"
    tensors = load_file(path)
    if drop:
        tensors = {k: v for k, v in tensors.items() if drop not in k or ".layers.1." not in k}
    if extra:
        tensors[extra] = torch.zeros(4, 64)
    if nan:
        key = next(iter(tensors))
        tensors[key][0, 0] = float("nan")
    save_file(tensors, str(path))
