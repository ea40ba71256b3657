"""Smoke run of ``tokenmill bench throughput`` so that the benchmark never rots."""

from __future__ import annotations

import json

from tokenmill.cli import main


def test_bench_throughput_smoke(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TOKENMILL_CACHE", str(tmp_path))
    out = tmp_path / "result.json"
    rc = main([
        "bench", "throughput", "--model", str(_tiny(tmp_path)), "--dtypes", "float32", "--batch-sizes", "1,2",
        "--prompt-len", "8", "--output-len", "4", "--peers", "hf", "--result-file", str(out),
    ])  # fmt: skip
    assert rc == 0
    data = json.loads(out.read_text())
    assert [r["batch"] for r in data["results"]] == [1, 2]
    for r in data["results"]:
        assert r["tokenmill"] > 0 and r["hf"] > 0 and r["roofline"] > 0
        assert r["ratio_to_best_peer"] == r["tokenmill"] / r["hf"]
        # each system ran in its own process, and its memory was sampled
        assert r["peak_memory_mb"]["tokenmill"] > 0 and r["peak_memory_mb"]["hf"] > 0
        assert 0 < r["cold_start_s"] < r["process_start_s"]
    assert data["cold_start_s"] > 0 and data["limits"]["bandwidth_gbs"] > 0


def _tiny(tmp_path):
    from tokenmill.bench.synthetic_model import make_model

    return make_model(tmp_path / "tiny", "tiny")
