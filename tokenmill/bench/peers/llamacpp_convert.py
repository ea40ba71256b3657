"""Convert an HF checkpoint to GGUF with llama.cpp's own converter; runs in the llamacpp venv.

Job on stdin: ``{"converter", "model_dir", "outfile", "outtype"}``. Prints
``TOKENMILL_RESULT {"outfile": ...}`` when the file is written.

The converter names a BPE tokenizer's pre-tokenizer by hashing how it splits a
fixed probe text, and only knows the hashes of published tokenizers. A
checkpoint with its own (e.g. synthetic) vocabulary but GPT-2's exact
pre-tokenization (one ``ByteLevel`` step with GPT-2's regex, no normalizer)
is declared as ``gpt-2`` here, which is what the hash would have said had its
vocabulary been published; anything else still fails as it does upstream.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULT_PREFIX = "TOKENMILL_RESULT "


def _is_gpt2_pretokenizer(model_dir: Path) -> bool:
    try:
        tok = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    pre = tok.get("pre_tokenizer") or {}
    return (
        tok.get("normalizer") is None
        and tok.get("model", {}).get("type") == "BPE"
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space", False)
    )


def main() -> None:
    job = json.loads(sys.stdin.read())
    converter = Path(job["converter"])
    model_dir = Path(job["model_dir"])
    # The converter is a script importing its sibling ``conversion`` package.
    sys.path.insert(0, str(converter.parent))
    import convert_hf_to_gguf
    from conversion.base import TextModel

    original = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self: TextModel, tokenizer: object) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            if _is_gpt2_pretokenizer(model_dir):
                return "gpt-2"
            raise

    TextModel.get_vocab_base_pre = get_vocab_base_pre  # type: ignore[method-assign]
    sys.argv = [str(converter), str(model_dir), "--outfile", job["outfile"], "--outtype", job["outtype"]]
    convert_hf_to_gguf.main()
    print(RESULT_PREFIX + json.dumps({"outfile": job["outfile"]}), flush=True)


if __name__ == "__main__":
    main()
