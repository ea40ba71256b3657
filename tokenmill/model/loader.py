"""Load a Hugging Face checkpoint directory into a tokenmill model.

Safetensors only (one file or a sharded ``model.safetensors.index.json``): no
pickle, no remote code. The directory's ``config.json`` decides the
architecture; anything tokenmill cannot run is refused with a ``ValueError``
that says what and why.

Mixture-of-experts checkpoints load their experts either all into memory, or
with ``expert_cache_memory`` (bytes) left memory-mapped in the safetensors
files and served through a cache of that size (``expert_cache``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from tokenmill.model.config import ModelConfig, parse_config
from tokenmill.model.decoder import DecoderModel
from tokenmill.model.moe import ExpertSource, ResidentExperts

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


def load_state_dict(
    path: str | Path, dtype: torch.dtype, mapped: Callable[[str], bool] | None = None
) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, cast to ``dtype`` (CPU).

    Tensors whose name ``mapped`` accepts are returned as they are stored: views of
    the memory-mapped file, in the checkpoint's dtype, read from disk only when used.
    """
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(Path(path)):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                t = f.get_tensor(name)  # a view of safetensors' mmap of the file
                state[name] = t if mapped is not None and mapped(name) else t.to(dtype)
    return state


def expert_tensor_names(config: ModelConfig) -> dict[tuple[int, int], dict[str, tuple[str, ...]]]:
    """(layer, expert) -> {"gate_up": (gate, up), "down": (down,)} checkpoint names."""
    from tokenmill.model.registry import family

    if config.moe is None:
        return {}
    names = family(config.architecture).expert_tensors
    return {
        (i, e): names(config, i, e)
        for i, sparse in enumerate(config.moe.sparse_layers)
        if sparse
        for e in range(config.moe.num_experts)
    }


def _take(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in state:
        raise KeyError(f"checkpoint is missing tensor {name!r}")
    return state.pop(name)


def load_model(
    path: str | Path,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    expert_cache_memory: int | None = None,
    expert_prefetch: bool = True,
) -> tuple[DecoderModel, ModelConfig]:
    """Load ``path`` (a checkpoint directory) and return ``(model, model_config)``.

    ``expert_cache_memory``: bytes of RAM for experts of a mixture-of-experts model;
    the rest stay memory-mapped in the checkpoint (None: every expert in memory).
    ``expert_prefetch``: with a cache, read the next layer's predicted experts ahead.
    """
    config = read_model_config(path, dtype)
    if expert_cache_memory is not None and config.moe is None:
        raise ValueError(
            f"expert_cache_memory applies to mixture-of-experts models; {config.architecture} "
            "has no experts"
        )
    if expert_cache_memory is not None and torch.device(device).type != "cpu":
        raise ValueError("expert offloading (expert_cache_memory) runs on CPU only")
    experts = expert_tensor_names(config)
    expert_names = {n for per in experts.values() for names in per.values() for n in names}
    offload = expert_cache_memory is not None
    # quantized weights are rounded from fp32, not from the (already rounded) bf16 copy;
    # the model casts everything that stays unquantized to ``config.dtype``
    load_dtype = torch.float32 if config.quantization else config.dtype
    # experts stay views of the mapped file: they are cast / packed once, straight into place
    state = load_state_dict(path, load_dtype, mapped=expert_names.__contains__)
    source: ExpertSource | None = None
    if offload:
        from tokenmill.model.expert_cache import OffloadedExperts

        mapped = {
            key: tuple(_take(state, n) for n in (*names["gate_up"], *names["down"]))
            for key, names in experts.items()
        }
        assert expert_cache_memory is not None
        source = OffloadedExperts(config, mapped, expert_cache_memory, load_dtype, expert_prefetch)
    elif experts:
        source = ResidentExperts(
            {
                key: tuple(_take(state, n).to(device) for n in (*names["gate_up"], *names["down"]))
                for key, names in experts.items()
            },
            load_dtype,
        )
    model = DecoderModel.from_state_dict(
        config, state, device=torch.device(device), experts=source
    )
    return model, config
