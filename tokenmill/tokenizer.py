"""Loading a checkpoint's tokenizer from local files only, never remote code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Files that hold a vocabulary, one of which any tokenizer transformers can load needs.
_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "*.tiktoken")


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer (with its chat template) of a local Hugging Face directory.

    A plain ``PreTrainedTokenizerFast`` is built directly: ``AutoTokenizer``
    would first import the auto-config machinery, about two seconds of cold
    start on a small CPU for the same object.
    """
    path = Path(path)
    if path.is_dir() and not any(any(path.glob(pattern)) for pattern in _VOCAB_FILES):
        # Without this, transformers falls through to converting a slow tokenizer and
        # complains that sentencepiece is not installed, which is not the problem.
        raise FileNotFoundError(
            f"no tokenizer files in {path} (looked for {', '.join(_VOCAB_FILES)}); "
            "copy them from the checkpoint the weights come from"
        )
    cfg_file = path / "tokenizer_config.json"
    if (path / "tokenizer.json").exists() and cfg_file.exists():
        cls = json.loads(cfg_file.read_text()).get("tokenizer_class")
        if cls == "PreTrainedTokenizerFast":
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
