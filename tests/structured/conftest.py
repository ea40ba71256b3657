"""Fixtures for the structured-output tests: the bundled model's tokenizer and a compiler for it."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session")
def bundled_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from tokenmill.models import DEFAULT_MODEL_PATH

    return AutoTokenizer.from_pretrained(DEFAULT_MODEL_PATH)


@pytest.fixture(scope="session")
def compiler(bundled_tokenizer: Any) -> Any:
    from tokenmill.structured.compiler import GrammarCompiler

    return GrammarCompiler(bundled_tokenizer, 4096, [0, 4])
