"""``tokenmill profile``: the grid stays within what the model and its KV cache can hold, and says so."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tokenmill.cli import main


def test_quick_grid_is_clamped_to_the_model_context(tiny_model_dir: Any, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    # The tiny model has a 256-token context; the quick grid goes to 2048-token prefills and
    # 4096-token contexts, and the prefill budget asked for is past the context too.
    out = tmp_path / "p.json"
    assert main(["profile", "--model", str(tiny_model_dir("llama")), "-o", str(out), "--grid", "quick",
                 "--dtype", "float32", "--max-num-batched-tokens", "512", "--max-num-seqs", "4",
                 "--kv-cache-memory", "4", "--repeats", "1", "--multistep", "2", "--threads", "1",
                 "--no-overhead"]) == 0  # fmt: skip
    table = json.loads(out.read_text())
    axes = table["axes"]
    assert max(axes["prefill_tokens"]) == 255 and max(axes["context_tokens"]) == 255
    assert axes["decode_seqs"] == [0, 1, 4]
    printed = capsys.readouterr().out
    assert "prefill_tokens" in printed and "context_tokens" in printed and "256" in printed
    assert any("context" in note for note in table["clamped"])


def test_fit_axes_clamps_to_context_and_kv_cache() -> None:
    from tokenmill.sim.profiler import GRIDS, fit_axes

    axes, notes = fit_axes(GRIDS["quick"], max_num_batched_tokens=2048, max_num_seqs=64, max_model_len=1024,
                           kv_tokens=16 * 1000, num_blocks=1000)  # fmt: skip
    assert axes["prefill_tokens"] == [0, 32, 128, 512, 1023]
    assert axes["context_tokens"] == [16, 256, 1023]
    assert axes["decode_seqs"] == [0, 1, 4, 16, 64]
    assert len(notes) == 2 and all("1024" in n for n in notes)
    # A KV cache of 40 blocks (640 tokens) binds before the context does.
    axes, notes = fit_axes(GRIDS["quick"], max_num_batched_tokens=2048, max_num_seqs=64, max_model_len=1024,
                           kv_tokens=640, num_blocks=40)  # fmt: skip
    assert max(axes["prefill_tokens"]) == 639 and max(axes["context_tokens"]) == 639
    assert axes["decode_seqs"] == [0, 1, 4, 16, 40]
    assert any("KV cache" in n for n in notes)
    # Within every limit nothing is clamped and nothing is said.
    axes, notes = fit_axes(GRIDS["quick"], max_num_batched_tokens=256, max_num_seqs=8, max_model_len=8192,
                           kv_tokens=1 << 20, num_blocks=1 << 16)  # fmt: skip
    assert axes["prefill_tokens"] == [0, 32, 128, 256] and axes["context_tokens"] == [16, 256, 1024, 4096]
    assert notes == []
