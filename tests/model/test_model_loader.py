"""Checkpoint loading: errors that say what is wrong, sharded weights, dtypes, EOS ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tokenmill.model import load_model, read_model_config
from tokenmill.model.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("loader") / "llama", "llama")


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_model(missing)


def test_missing_config_and_missing_weights(tmp_path: Path, llama_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="pickle"):
        load_model(tmp_path)


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(tmp_path / "m", "llama")
    edit_config(path, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as info:
        load_model(path)
    for supported in ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"):
        assert supported in str(info.value)


def test_mistral_sliding_window_applies_to_every_layer(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(tmp_path / "m", "mistral", sliding_window=64)
    cfg = read_model_config(path)
    assert cfg.layer_windows == (64, 64) and cfg.window(1) == 64
    # a window that covers the whole context is plain causal attention
    edit_config(path, sliding_window=512)
    cfg = read_model_config(path)
    assert cfg.architecture == "MistralForCausalLM" and cfg.layer_windows == ()


def test_unsupported_rope_type_is_refused(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(tmp_path / "m", "llama")
    edit_config(path, rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match="yarn"):
        read_model_config(path)


def test_old_rope_scaling_spelling(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(tmp_path / "m", "llama")
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = 5e5
    cfg["rope_scaling"] = {"type": "linear", "factor": 2.0}
    (path / "config.json").write_text(json.dumps(cfg))
    rope = read_model_config(path).rope
    assert (rope.rope_type, rope.theta, rope.factor) == ("linear", 5e5, 2.0)


def test_sharded_checkpoint_loads_same_weights(tmp_path: Path, llama_dir: Path) -> None:
    sharded = make_tiny_checkpoint(tmp_path / "sharded", "llama", max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert not (sharded / "model.safetensors").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    a, _ = load_model(sharded)
    b, _ = load_model(llama_dir)
    wa, wb = a.dense_weights(), b.dense_weights()
    assert wa.keys() == wb.keys() and "lm_head" in wa
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_dtypes_and_config_fields(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(
        tmp_path / "m", "qwen2", dtype=torch.bfloat16, tie_word_embeddings=True
    )
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    model, cfg = load_model(path)  # "auto" takes the checkpoint's bf16
    assert cfg.dtype == torch.bfloat16 and model.embed_tokens.dtype == torch.bfloat16
    assert cfg.eos_token_ids == (2, 7)
    assert cfg.tie_word_embeddings and "lm_head" not in model.dense_weights()
    assert cfg.attention_bias and not cfg.o_proj_bias
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        2,
        64,
        4,
        2,
        16,
    )
    assert cfg.vocab_size == 512 and cfg.max_model_len == 512
    model32, cfg32 = load_model(path, dtype="float32")
    assert cfg32.dtype == torch.float32 and model32.embed_tokens.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        load_model(path, dtype="int4")
