"""Load a Hugging Face checkpoint directory into a tokenmill model.

Safetensors only (one file or a sharded ``model.safetensors.index.json``): no
pickle, no remote code. The directory's ``config.json`` decides the
architecture; anything tokenmill cannot run is refused with a ``ValueError``
that says what and why.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from tokenmill.model.config import ModelConfig, parse_config
from tokenmill.model.llama import LlamaModel

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_model_config(path: str | Path, dtype: str | torch.dtype = "auto") -> ModelConfig:
    """Parse ``config.json`` of a checkpoint directory without loading weights."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"model path does not exist: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"model path is not a directory: {root}")
    config_path = root / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in model directory {root}")
    return parse_config(json.loads(config_path.read_text()), root, dtype)


def _weight_files(root: Path) -> list[Path]:
    if (root / SINGLE_FILE).is_file():
        return [root / SINGLE_FILE]
    index_path = root / INDEX_FILE
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text()).get("weight_map", {})
        files = [root / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index_path} names missing shard(s): {', '.join(missing)}")
        return files
    if any(root.glob("*.bin")) or any(root.glob("*.pt")):
        raise FileNotFoundError(
            f"no safetensors weights in {root} (found pickle .bin/.pt files, which tokenmill "
            "does not load; convert them to safetensors)"
        )
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in model directory {root}")


def load_state_dict(path: str | Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, cast to ``dtype`` (CPU)."""
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(Path(path)):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                state[name] = f.get_tensor(name).to(dtype)
    return state


def load_model(
    path: str | Path, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu"
) -> tuple[LlamaModel, ModelConfig]:
    """Load ``path`` (a checkpoint directory) and return ``(model, model_config)``."""
    config = read_model_config(path, dtype)
    # quantized weights are rounded from fp32, not from the (already rounded) bf16 copy;
    # the model casts everything that stays unquantized to ``config.dtype``
    state = load_state_dict(path, torch.float32 if config.quantization else config.dtype)
    model = LlamaModel.from_state_dict(config, state, device=torch.device(device))
    return model, config
