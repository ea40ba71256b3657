"""What the new families cannot run is refused by name, before any weight is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenmill.model import read_model_config
from tokenmill.model.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("refusals")
    return {arch: make_tiny_checkpoint(root / arch, arch) for arch in ("phi3", "gemma3", "qwen3", "mixtral")}


def with_config(src: Path, dst: Path, **changes) -> Path:
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(
    ("arch", "changes", "named"),
    [
        ("phi3", {"partial_rotary_factor": 0.75}, "partial_rotary_factor"),
        ("phi3", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "yarn"),
        ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "short_factor"),
        ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ("gemma3", {"hidden_activation": "gelu"}, "'gelu'"),
        ("qwen3", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0,
                   "layer_types": ["chunked_attention", "full_attention"]}, "chunked_attention"),
        ("mixtral", {"architectures": ["Qwen2MoeForCausalLM"]}, "Qwen2MoeForCausalLM"),
        ("mixtral", {"architectures": ["Qwen3MoeForCausalLM"], "num_experts": 4, "moe_intermediate_size": 32,
                     "shared_expert_intermediate_size": 64}, "shared expert"),
    ],
)  # fmt: skip
def test_unsupported_options_are_named(dirs, tmp_path: Path, arch: str, changes: dict, named: str) -> None:
    path = with_config(dirs[arch], tmp_path / "m", **changes)
    with pytest.raises(ValueError, match=named):
        read_model_config(path)


def test_qwen3_sliding_window_only_with_use_sliding_window(dirs, tmp_path: Path) -> None:
    off = with_config(dirs["qwen3"], tmp_path / "off", sliding_window=8, layer_types=["sliding_attention"] * 2)
    assert read_model_config(off).layer_windows == ()
    on = with_config(dirs["qwen3"], tmp_path / "on", sliding_window=8, use_sliding_window=True,
                     max_window_layers=1, layer_types=None)  # fmt: skip
    assert read_model_config(on).layer_windows == (0, 8)
