"""Models bundled with tokenmill as package data.

``DEFAULT_MODEL_PATH`` is the one place that names the default model: every
command and API uses it when no ``--model`` / ``model=`` is given (the package
root re-exports it as ``tokenmill.DEFAULT_MODEL``). The folder is a standard
Hugging Face checkpoint (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json with a chat template, generation_config.json) plus a model
card (README.md) and ``heldout_sample.txt``, a held-out slice of the training
corpus for tests. It is a 5.4M-parameter Llama trained from scratch on the King
James Bible by ``scripts/train_default_model.py``; it loads with
``transformers.AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_PATH)``.

``BUNDLED_ADAPTERS`` are LoRA adapters for the default model (PEFT format), by
the name ``tokenmill serve --lora-modules NAME`` takes alone: ``psalms``, trained
on the Book of Psalms by ``scripts/train_psalms_lora.py`` (its card is its README.md).
"""

from __future__ import annotations

from pathlib import Path

MODELS_DIR: Path = Path(__file__).resolve().parent
"""The folder that holds the bundled models, one sub-folder each."""

DEFAULT_MODEL_NAME: str = "tokenmill-default"
"""The name the default model is served under (e.g. the OpenAI ``model`` field)."""

DEFAULT_MODEL_PATH: Path = MODELS_DIR / "default"
"""The folder of the default model checkpoint."""

HELDOUT_SAMPLE_PATH: Path = DEFAULT_MODEL_PATH / "heldout_sample.txt"
"""Held-out text (three KJV chapters never seen in training), for tests."""

DEFAULT_DRAFT_PATH: Path = MODELS_DIR / "default_draft"
"""The draft model for speculative decoding of the default model (``--speculative draft:default``):
a 1M-parameter Llama with the default model's vocabulary, distilled from it by
``scripts/train_default_model.py --draft``; no tokenizer of its own."""

BUNDLED_ADAPTERS: dict[str, Path] = {"psalms": MODELS_DIR / "psalms-lora"}
"""LoRA adapters of the default model shipped with tokenmill, by name."""

__all__ = ["BUNDLED_ADAPTERS", "DEFAULT_DRAFT_PATH", "DEFAULT_MODEL_NAME", "DEFAULT_MODEL_PATH", "HELDOUT_SAMPLE_PATH", "MODELS_DIR"]
