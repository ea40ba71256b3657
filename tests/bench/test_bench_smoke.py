"""Smoke runs of the scheduling benchmarks at tiny sizes, so that they never rot.

Each runs the benchmark's ``main`` on the sim backend (a few hundred
milliseconds), checks the JSON it writes and that it reports both sides of
its comparison; one runs through the real engine with a tiny checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenmill.bench import bins, fairness, prefix_cache, slo


def run_main(module, tmp_path: Path, *args: str) -> dict:
    assert module.main([*args, "--out", str(tmp_path)]) == 0
    return json.loads((tmp_path / f"{module.NAME}.json").read_text())


def test_prefix_cache(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    res = run_main(prefix_cache, tmp_path, "--prefixes", "3", "--questions", "4", "--prefix-len", "64",
                   "--question-len", "8", "--output-len", "4", "--max-num-seqs", "4")  # fmt: skip
    assert set(res["runs"]) == {"cache off", "cache on", "fcfs small", "lpm small"}
    assert res["runs"]["cache off"]["token_hit_rate"] == 0.0
    assert res["runs"]["cache on"]["token_hit_rate"] > 0.3
    assert res["runs"]["lpm small"]["token_hit_rate"] >= res["runs"]["fcfs small"]["token_hit_rate"]
    assert res["runs"]["cache on"]["prefill_tokens_computed"] < res["runs"]["cache off"]["prefill_tokens_computed"]
    assert res["ratios"]["ttft_p50_off_over_on"] > 1
    assert (tmp_path / "prefix_cache.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "backend: sim" in out and "TTFT p50 off/on" in out


def test_fairness(tmp_path: Path) -> None:
    res = run_main(fairness, tmp_path, "--light-users", "3", "--requests-per-user", "2", "--prefix-len", "32",
                   "--question-len", "8", "--output-len", "8", "--max-num-seqs", "4", "--no-plot")  # fmt: skip
    runs = res["runs"]
    assert set(runs) == {"fcfs", "vtc", "dlpm"}
    assert runs["vtc"]["light_share"] > runs["fcfs"]["light_share"]
    assert runs["dlpm"]["light_share"] > runs["fcfs"]["light_share"]


def test_slo(tmp_path: Path) -> None:
    res = run_main(slo, tmp_path, "--requests", "80", "--calib-requests", "20", "--prompt-len", "16", "64",
                   "--output-len", "4", "16", "--max-num-seqs", "8", "--no-plot")  # fmt: skip
    assert set(res["runs"]) == {"fcfs", "slo"}
    assert res["runs"]["slo"]["goodput_requests"] >= res["runs"]["fcfs"]["goodput_requests"]


def test_bins(tmp_path: Path) -> None:
    res = run_main(bins, tmp_path, "--requests", "24", "--prompt-len", "16", "--short", "2", "4",
                   "--long", "24", "32", "--max-num-seqs", "4", "--no-plot")  # fmt: skip
    assert len(res["runs"]) == 4
    assert res["ratios"]["static_bins_over_fcfs"] > 1


def test_prefix_cache_through_the_engine(tmp_path: Path, tiny_model_dir) -> None:
    model = tiny_model_dir("llama")
    res = run_main(prefix_cache, tmp_path, "--backend", "engine", "--model", str(model), "--vocab", "300",
                   "--prefixes", "2", "--questions", "3", "--prefix-len", "48", "--question-len", "8",
                   "--output-len", "3", "--rate", "50", "--skip-lpm", "--no-plot")  # fmt: skip
    assert res["backend"].startswith("engine")
    on, off = res["runs"]["cache on"], res["runs"]["cache off"]
    assert on["requests"] == off["requests"] == 6
    assert off["token_hit_rate"] == 0.0 and on["token_hit_rate"] > 0.3


def test_structured(tmp_path: Path, tiny_model_dir) -> None:
    from tokenmill.bench import structured

    res = run_main(structured, tmp_path, "--model", str(tiny_model_dir("llama")), "--batch-sizes", "1,3",
                   "--output-len", "6", "--repeats", "1", "--compile-schemas", "1", "--validity-requests", "3",
                   "--validity-max-tokens", "48")  # fmt: skip
    assert [r["schema"] for r in res["compile"]] == ["bench", "random 0"]
    assert all(r["cached_ms"] < r["first_ms"] for r in res["compile"])
    assert [r["batch"] for r in res["speed"]] == [1, 3]
    for row in res["speed"]:
        assert row["median"]["unconstrained"] > 0 and row["median"]["json schema"] > 0
    assert set(res["validity"]) == {"json schema", "regex", "choice"}
    assert all(v["requests"] == 3 and v["invalid"] == 0 for v in res["validity"].values())
