"""``tokenmill bench spec`` at tiny sizes, so that it never rots: both parts run and report
tokens/s, speedups and acceptance for every configuration."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenmill.cli import main


def test_bench_spec_smoke(tiny_model_dir: Any, tmp_path: Path) -> None:
    out = tmp_path / "spec.json"
    assert main(["bench", "spec", "--model", str(tiny_model_dir("llama")), "--batch-sizes", "1,4",
                 "--output-len", "8", "--prompts", "2", "--repeats", "1", "--kjv-prompts", "2",
                 "--kjv-output-len", "12", "--output", str(out)]) == 0  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 4, 1]
    assert set(rows[0]["configs"]) == {"plain", "self-int8"}
    assert set(rows[2]["configs"]) == {"plain", "draft:default", "ngram"}
    for row in rows:
        assert row["configs"]["plain"]["speedup"] == 1.0 and row["load_average"]
        for name, c in row["configs"].items():
            assert c["tokens_per_s"] > 0
            if name != "plain":
                assert 0.0 <= c["acceptance_rate"] <= 1.0 and 0.0 <= c["draft_time_share"] < 1.0
    assert rows[2]["configs"]["draft:default"]["mean_accepted_length"] > 1.0
