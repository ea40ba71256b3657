"""``tokenmill generate`` with LoRA adapters: ``--lora`` for every prompt, a JSONL line's
``lora`` for its own, the bundled adapter by name, and an unknown name refused before
the model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenmill.cli import main
from tokenmill.models import BUNDLED_ADAPTERS

PROMPT = "The LORD is my"


def test_lora_flag_and_per_line_adapters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--max-tokens", "8", "--kv-cache-memory", "4MiB"]
    assert main(["generate", PROMPT, *common]) == 0
    base = capsys.readouterr().out
    assert main(["generate", PROMPT, "--lora", "psalms", *common]) == 0  # bundled: no --lora-modules needed
    psalms = capsys.readouterr().out
    assert psalms.startswith(PROMPT) and psalms != base

    src = tmp_path / "in.jsonl"
    lines = [{"prompt": PROMPT}, {"prompt": PROMPT, "lora": None}, {"prompt": PROMPT, "lora": "ps"}]
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    flags = ["--input", str(src), "--lora-modules", f"ps={BUNDLED_ADAPTERS['psalms']}", "--lora", "ps", *common]
    assert main(["generate", *flags]) == 0
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    texts = [PROMPT + o["outputs"][0]["text"] for o in out]
    assert texts[0] == texts[2] == psalms.rstrip("\n")  # --lora, and the line's own name
    assert texts[1] == base.rstrip("\n")  # null: the base model
    assert out[2]["lora"] == "ps"


def test_unknown_adapter_is_refused_with_its_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": PROMPT}) + "\n" + json.dumps({"prompt": PROMPT, "lora": "hymns"}) + "\n")
    # the model path does not exist: the adapter check comes first, so nothing loads
    assert main(["generate", "--input", str(src), "--model", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert f"{src}:2: unknown LoRA adapter 'hymns'" in err and "psalms" in err
    assert main(["generate", PROMPT, "--lora", "hymns"]) == 2
    assert "unknown LoRA adapter 'hymns'" in capsys.readouterr().err
