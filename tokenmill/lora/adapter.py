"""Read a PEFT LoRA adapter directory and check it against the model it is meant for.

A PEFT adapter is ``adapter_config.json`` (``peft_type`` "LORA", ``r``,
``lora_alpha``, ``target_modules``, optional ``rank_pattern`` /
``alpha_pattern`` / ``use_rslora``) and ``adapter_model.safetensors`` with one
``lora_A`` ``[r, in]`` and one ``lora_B`` ``[out, r]`` per adapted module,
named after the module (``base_model.model.model.layers.3.self_attn.q_proj
.lora_A.weight``). tokenmill adapts the decoder's linear layers that its
family names in the checkpoint (q/k/v/o and gate/up/down; Phi-3's fused
qkv_proj and gate_up_proj): every tensor of the file must be one of those,
fit the model's shapes and have a rank of at most ``max_rank``, or loading
fails with ``LoraError`` naming the adapter and what does not fit. Shapes are
checked from the safetensors header before a tensor is read, so a file can
never make tokenmill read more than ``max_rank`` allows. Safetensors only (no
pickle); DoRA, LoRA biases, embedding or LM-head adapters and
``modules_to_save`` are refused, not ignored.

``load_adapter`` returns, per layer and fused linear layer (``qkv``, ``o``,
``gate_up``, ``down``), one ``LoraModule``: the A matrices of its adapted parts
stacked (``[R, in]``) and each part's B, scaled by ``lora_alpha / r``
(``/ sqrt(r)`` with rsLoRA), so that ``y += (x @ A^T)[part] @ B^T`` on each
part's output columns equals PEFT's forward and its merged weight.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tokenmill.lora.errors import LoraError
from tokenmill.model.config import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LINEAR_KEYS = ("qkv", "o", "gate_up", "down")

# base_model.model.<module>.lora_A[.<adapter name>].weight
_TENSOR = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(slots=True)
class LoraPart:
    """One adapted checkpoint module inside a fused linear layer (q_proj inside qkv)."""

    out_offset: int  # its first output column in the fused layer ([q; k; v], [gate; up])
    out_features: int
    h_offset: int  # its rows in the module's stacked A (and columns of x @ A^T)
    rank: int
    b: torch.Tensor  # [out_features, rank], scaled


@dataclass(slots=True)
class LoraModule:
    """An adapter's share of one fused linear layer of one decoder layer."""

    in_features: int
    a: torch.Tensor  # [sum of the parts' ranks, in_features]
    parts: list[LoraPart] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(slots=True)
class AdapterWeights:
    """A loaded adapter: ``modules[(layer, key)]`` for every adapted fused layer."""

    name: str
    path: str
    rank: int  # the largest rank of any of its modules
    modules: dict[tuple[int, str], LoraModule]
    targets: tuple[str, ...]  # the checkpoint modules it adapts, e.g. ("q_proj", "v_proj")

    @property
    def nbytes(self) -> int:
        return sum(
            m.a.numel() * m.a.element_size() + sum(p.b.numel() * p.b.element_size() for p in m.parts)
            for m in self.modules.values()
        )


@dataclass(frozen=True, slots=True)
class _Slot:
    """Where a checkpoint module sits in the fused layers: layer, key, part, sizes."""

    layer: int
    key: str
    part: int
    out_offset: int
    out_features: int
    in_features: int


def adapter_slots(config: ModelConfig) -> dict[str, _Slot]:
    """Checkpoint module name ("model.layers.0.self_attn.q_proj") -> its place in the model."""
    from tokenmill.model.registry import family

    names_of = family(config.architecture).layer_tensors
    h, inter = config.hidden_size, config.intermediate_size
    ins = {"qkv": h, "o": config.q_size, "gate_up": h, "down": inter}
    outs = {
        "qkv": [config.q_size, config.kv_size, config.kv_size],
        "o": [h],
        "gate_up": [inter, inter],
        "down": [h],
    }
    slots: dict[str, _Slot] = {}
    for i in range(config.num_layers):
        names = names_of(config, i)
        for key in LINEAR_KEYS:
            parts = names.get(key)
            if parts is None:
                continue  # a sparse (mixture-of-experts) layer has no dense MLP
            sizes = outs[key] if len(parts) == len(outs[key]) else [sum(outs[key])]  # fused in the checkpoint
            offset = 0
            for j, (name, size) in enumerate(zip(parts, sizes, strict=True)):
                module = name.removesuffix(".weight")
                slots[module] = _Slot(i, key, j, offset, size, ins[key])
                offset += size
    return slots


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: a key matches a module whose name
    is it or ends with ``.`` + it (keys may be regular expressions)."""
    for key, value in pattern.items():
        if module == key or module.endswith("." + key) or re.fullmatch(rf"(?:.*\.)?{key}", module):
            return value
    return default


def _read_config(root: Path, name: str) -> dict[str, Any]:
    path = root / CONFIG_FILE
    if not path.is_file():
        raise LoraError(f"LoRA adapter {name!r}: no {CONFIG_FILE} in {root}")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoraError(f"LoRA adapter {name!r}: {CONFIG_FILE} is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise LoraError(f"LoRA adapter {name!r}: {CONFIG_FILE} is not a JSON object")
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise LoraError(f"LoRA adapter {name!r}: peft_type is {peft_type!r}; only LORA adapters are supported")
    refused = {
        "use_dora": "DoRA adapters",
        "lora_bias": "LoRA biases",
        "modules_to_save": "modules_to_save (fully trained copies of base modules)",
        "target_parameters": "target_parameters (LoRA on raw parameters)",
    }
    for key, what in refused.items():
        if cfg.get(key):
            raise LoraError(f"LoRA adapter {name!r}: {what} are not supported ({key} is set)")
    if cfg.get("bias", "none") != "none":
        raise LoraError(f"LoRA adapter {name!r}: bias={cfg['bias']!r} is not supported (only 'none')")
    if cfg.get("fan_in_fan_out"):
        raise LoraError(f"LoRA adapter {name!r}: fan_in_fan_out (Conv1D layers) is not supported")
    for key in ("r", "lora_alpha"):
        value = cfg.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise LoraError(f"LoRA adapter {name!r}: {CONFIG_FILE} needs a positive {key!r}, got {value!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise LoraError(f"LoRA adapter {name!r}: {key} must be an object")
    return cfg


def load_adapter(
    path: str | Path,
    config: ModelConfig,
    *,
    max_rank: int,
    dtype: torch.dtype,
    name: str | None = None,
) -> AdapterWeights:
    """Read and check the adapter at ``path`` for a model of ``config``; tensors in ``dtype``.

    Raises ``LoraError`` naming the adapter (``name``, else the directory) for a missing or
    malformed directory, a module the model does not have or tokenmill does not adapt, a
    shape that does not fit the model, or a rank over ``max_rank``.
    """
    from safetensors import SafetensorError, safe_open

    root = Path(path)
    name = name or root.name
    if not root.is_dir():
        raise LoraError(f"LoRA adapter {name!r}: {root} is not a directory")
    cfg = _read_config(root, name)
    weights = root / WEIGHTS_FILE
    if not weights.is_file():
        if (root / "adapter_model.bin").is_file():
            raise LoraError(
                f"LoRA adapter {name!r}: only adapter_model.bin (pickle) in {root}; tokenmill loads "
                f"{WEIGHTS_FILE} only"
            )
        raise LoraError(f"LoRA adapter {name!r}: no {WEIGHTS_FILE} in {root}")
    slots = adapter_slots(config)
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    found: dict[str, dict[str, str]] = {}  # module -> "A"/"B" -> tensor name
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            names = list(f.keys())
            # every check on shapes happens before any tensor is read
            for key in names:
                m = _TENSOR.match(key)
                if m is None:
                    raise LoraError(f"LoRA adapter {name!r}: tensor {key!r} is not a LoRA A or B weight")
                module, ab = m.group("module"), m.group("ab")
                slot = slots.get(module)
                if slot is None:
                    raise LoraError(
                        f"LoRA adapter {name!r}: tensor {key!r} adapts {module!r}, which is not a "
                        f"linear layer tokenmill adapts in this {config.architecture} "
                        f"({config.num_layers} layers; q/k/v/o and gate/up/down projections)"
                    )
                shape = list(f.get_slice(key).get_shape())
                r = (shape[0] if ab == "A" else shape[1]) if len(shape) == 2 else -1
                want = [r, slot.in_features] if ab == "A" else [slot.out_features, r]
                if len(shape) != 2 or shape != want:
                    side = f"takes {slot.in_features} inputs" if ab == "A" else f"has {slot.out_features} outputs"
                    raise LoraError(
                        f"LoRA adapter {name!r}: tensor {key!r} has shape {shape} but {module} of this "
                        f"model {side}: the adapter was made for a different base model"
                    )
                if r < 1 or r > max_rank:
                    raise LoraError(
                        f"LoRA adapter {name!r}: {module} has rank {r}, over the maximum LoRA rank "
                        f"{max_rank} (--max-lora-rank)"
                    )
                if ab in found.get(module, {}):
                    raise LoraError(f"LoRA adapter {name!r}: two lora_{ab} tensors for {module}")
                found.setdefault(module, {})[ab] = key
            for module, pair in found.items():
                if set(pair) != {"A", "B"}:
                    missing = "B" if "A" in pair else "A"
                    raise LoraError(f"LoRA adapter {name!r}: {module} has no lora_{missing} weight")
            tensors = {
                module: {ab: f.get_tensor(key).to(torch.float32) for ab, key in pair.items()}
                for module, pair in found.items()
            }
    except LoraError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise LoraError(f"LoRA adapter {name!r}: {WEIGHTS_FILE} cannot be read ({exc})") from None
    if not tensors:
        raise LoraError(f"LoRA adapter {name!r}: {WEIGHTS_FILE} holds no LoRA weights")

    by_layer_key: dict[tuple[int, str], list[tuple[_Slot, str, dict[str, torch.Tensor]]]] = {}
    for module, pair in tensors.items():
        slot = slots[module]
        if pair["A"].shape[0] != pair["B"].shape[1]:
            raise LoraError(
                f"LoRA adapter {name!r}: {module} has lora_A of rank {pair['A'].shape[0]} and lora_B of "
                f"rank {pair['B'].shape[1]}"
            )
        by_layer_key.setdefault((slot.layer, slot.key), []).append((slot, module, pair))
    modules: dict[tuple[int, str], LoraModule] = {}
    max_r = 0
    for (layer, key), items in sorted(by_layer_key.items()):
        items.sort(key=lambda it: it[0].part)
        parts: list[LoraPart] = []
        a_rows: list[torch.Tensor] = []
        h = 0
        for slot, module, pair in items:
            r = pair["A"].shape[0]
            config_r = _pattern_value(rank_pattern, module, cfg["r"])
            if config_r != r:
                raise LoraError(
                    f"LoRA adapter {name!r}: {module} has rank {r} but {CONFIG_FILE} says r={config_r}"
                )
            alpha = float(_pattern_value(alpha_pattern, module, cfg["lora_alpha"]))
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            a_rows.append(pair["A"])
            b = (pair["B"] * scale).to(dtype).contiguous()
            parts.append(LoraPart(slot.out_offset, slot.out_features, h, r, b))
            h += r
            max_r = max(max_r, r)
        a = torch.cat(a_rows).to(dtype).contiguous()
        if not (torch.isfinite(a).all() and all(torch.isfinite(p.b).all() for p in parts)):
            raise LoraError(f"LoRA adapter {name!r}: layer {layer} {key} holds NaN or infinite weights")
        modules[(layer, key)] = LoraModule(items[0][0].in_features, a, parts)
    targets = tuple(sorted({m.rsplit(".", 1)[-1] for m in tensors}))
    return AdapterWeights(name, str(root), max_r, modules, targets)
