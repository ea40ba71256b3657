"""``--speculative`` / ``--num-speculative-tokens`` on serve and generate: bad values end in one
line (exit code 2) before any weight is loaded; good ones reach the engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.commands.test_serve import no_server, one_line_error  # noqa: F401 - the fixture
from tokenmill.cli import main


@pytest.mark.parametrize("command", ["serve", "generate"])
@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--speculative", "eagle"], ["--speculative", "unknown speculative method 'eagle'", "ngram"]),
        (["--speculative", "ngram", "--num-speculative-tokens", "0"], ["--num-speculative-tokens", ">= 1"]),
        (["--speculative", "ngram", "--num-speculative-tokens", "lots"], ["--num-speculative-tokens", "'lots'"]),
        (["--num-speculative-tokens", "3"], ["--num-speculative-tokens needs --speculative"]),
        (["--speculative", "draft:/no/such/dir"], ["cannot load the draft model", "does not exist"]),
    ],
)
def test_bad_speculative_flags(tiny_model_dir: Any, capsys: pytest.CaptureFixture[str], command: str,
                               flags: list[str], words: list[str]) -> None:  # fmt: skip
    model = str(tiny_model_dir("llama"))
    args = ["serve", model] if command == "serve" else ["generate", "hi", "--model", model]
    assert main([*args, *flags]) == 2
    one_line_error(capsys, *words)


def test_a_draft_with_another_vocabulary_is_refused(tiny_model_dir: Any, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from tests.conftest import make_tiny_model

    draft = make_tiny_model(tmp_path / "d", "llama", vocab_size=400)
    assert main(["serve", str(tiny_model_dir("llama")), "--speculative", f"draft:{draft}"]) == 2
    one_line_error(capsys, "400", "320", "tokenizer")


def test_generate_with_speculation_prints_the_same_greedy_text(tiny_model_dir: Any,
                                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    model = str(tiny_model_dir("llama"))
    base = ["generate", "the scheduler moved", "--model", model, "--max-tokens", "12", "--kv-cache-memory", "4MiB"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    assert main([*base, "--speculative", "self-int8", "--num-speculative-tokens", "auto"]) == 0
    assert capsys.readouterr().out == plain
