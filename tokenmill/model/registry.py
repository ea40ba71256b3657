"""Which file runs which architecture: ``config.json``'s ``architectures`` -> a family module.

A family module is small: it reads the config fields its models add
(``parse``), refuses what tokenmill cannot run, and names its checkpoint
tensors (``layer_tensors``, and ``expert_tensors`` for mixture-of-experts
models). The network itself is shared (``decoder.DecoderModel``); adding a
family is adding a module here.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# architecture name in config.json -> the module that describes it
FAMILIES: dict[str, str] = {
    "LlamaForCausalLM": "tokenmill.model.llama",
    "MistralForCausalLM": "tokenmill.model.llama",
    "Qwen2ForCausalLM": "tokenmill.model.llama",
    "Qwen3ForCausalLM": "tokenmill.model.qwen3",
    "Gemma2ForCausalLM": "tokenmill.model.gemma",
    "Gemma3ForCausalLM": "tokenmill.model.gemma",
    "Phi3ForCausalLM": "tokenmill.model.phi3",
    "MixtralForCausalLM": "tokenmill.model.mixtral",
    "Qwen3MoeForCausalLM": "tokenmill.model.qwen3_moe",
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(FAMILIES)


def family(architecture: str) -> ModuleType:
    """The family module of a supported architecture."""
    return importlib.import_module(FAMILIES[architecture])
