"""Smoke run of ``tokenmill bench moe`` on a tiny Mixtral, so that it never rots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenmill.bench import moe


def test_moe_bench_runs_every_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "moe.json"
    code = moe.main(["--shape", "tiny", "--work-dir", str(tmp_path), "--batch-sizes", "2",
                     "--prompt-len", "6", "--output-len", "4", "--threads", "1", "--repeats", "1", "--int8-row",
                     "--result-file", str(out)])  # fmt: skip
    assert code == 0
    res = json.loads(out.read_text())
    rows = {r["system"]: r for r in res["results"]}
    assert set(rows) == {"tokenmill", "transformers", "tokenmill int8", "tokenmill offload"}
    assert rows["tokenmill int8"]["same_tokens_as_tokenmill"] is None
    assert rows["tokenmill offload"]["same_tokens_as_tokenmill"]
    cache = rows["tokenmill offload"]["expert_cache"]
    assert cache["misses"] > 0 and cache["bytes_read"] > 0
    assert res["cache_bytes"] == res["expert_bytes"] // 2
    assert rows["tokenmill"]["vs_transformers"] > 0
    assert "decode tok/s" in capsys.readouterr().out
