"""Fixtures for the LoRA tests: the tiny Llama and three PEFT adapters made with peft itself.

The adapters differ in rank and in what they adapt, and use PEFT's per-module
``rank_pattern`` / ``alpha_pattern`` and rsLoRA scaling, so loading them right
is checked against peft's own merge: ``attn`` (rank 4 on q/v), ``full``
(rank 16 on all seven projections, rsLoRA), ``mlp`` (rank 8 on o and the MLP,
down_proj at rank 2 and o_proj with its own alpha). Their weights are seeded
normals large enough that every adapter changes the greedy output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

ADAPTERS: dict[str, dict[str, Any]] = {
    "attn": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "full": dict(r=16, lora_alpha=16, use_rslora=True,
                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "mlp": dict(r=8, lora_alpha=32, target_modules=["o_proj", "gate_proj", "up_proj", "down_proj"],
                rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 4}),
}  # fmt: skip


def make_peft_adapter(base: Path, out: Path, seed: int, std: float = 0.15, **lora_config: Any) -> Path:
    """Save a peft LoRA of ``base`` with seeded N(0, std) A and B weights to ``out``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(lora_dropout=0.0, bias="none", **lora_config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    peft_model.save_pretrained(out)
    return out


def merged_model(base: Path, adapter: Path | None) -> Any:
    """transformers' model of ``base`` with ``adapter`` merged by peft (None: the base)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval()


@pytest.fixture(scope="session")
def lora_base(tiny_model_dir: Any) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="session")
def peft_adapters(lora_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peft-adapters")
    return {
        name: make_peft_adapter(lora_base, root / name, seed=i + 1, **cfg)
        for i, (name, cfg) in enumerate(ADAPTERS.items())
    }
