"""``tokenmill model-path`` prints the bundled model's folder, whose tokenizer other tools can load by path."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenmill.cli import main
from tokenmill.models import DEFAULT_MODEL_PATH


def test_prints_the_bundled_model_folder(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model-path"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == DEFAULT_MODEL_PATH
    # What guidellm (--processor) and aiperf (--tokenizer) do with it: load the tokenizer by path.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert tok.decode(tok("In the beginning")["input_ids"]).endswith("In the beginning")
