"""Smoke run of ``tokenmill bench lora`` on the tiny shape, so that it never rots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenmill.bench import lora


def test_lora_bench_runs_both_modes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lora.json"
    code = lora.main(["--shape", "tiny", "--work-dir", str(tmp_path), "--batch", "4", "--adapters", "2",
                      "--rank", "4", "--prompt-len", "8", "--output-len", "4", "--repeats", "2", "--threads", "1",
                      "--result-file", str(out)])  # fmt: skip
    assert code == 0
    res = json.loads(out.read_text())
    assert set(res["runs"]) == {"base", "lora"}
    assert all(len(v) == 2 and min(v) > 0 for v in res["runs"].values())
    assert res["ratio"] == pytest.approx(res["median"]["lora"] / res["median"]["base"])
    assert len(res["pair_ratios"]) == 2 and res["cpu_ratio"] > 0
    assert res["differ_from_base"] > 0  # the adapters changed what the model says
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == ["tiny"]
    assert len(list((tmp_path / "lora" / "tiny").iterdir())) == 2
    assert "lora / base (medians)" in capsys.readouterr().out
