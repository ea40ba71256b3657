"""``tokenmill bench slo|fairness|bins|prefix-cache`` end to end through the command line, at tiny sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenmill.cli import main

# Each benchmark at a size that runs in well under a second on the sim backend.
CASES = {
    "slo": ["--requests", "40", "--calib-requests", "12", "--prompt-len", "16", "48", "--output-len", "4", "12",
            "--max-num-seqs", "4"],
    "fairness": ["--light-users", "2", "--requests-per-user", "2", "--prefix-len", "32", "--question-len", "8",
                 "--output-len", "6", "--max-num-seqs", "4"],
    "bins": ["--requests", "16", "--prompt-len", "16", "--short", "2", "4", "--long", "16", "24",
             "--max-num-seqs", "4"],
    "prefix-cache": ["--prefixes", "2", "--questions", "3", "--prefix-len", "48", "--question-len", "8",
                     "--output-len", "3", "--max-num-seqs", "4"],
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CASES))
def test_bench_subcommand_writes_its_json(name: str, tmp_path: Path) -> None:
    assert main(["bench", name, *CASES[name], "--no-plot", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / f"{name.replace('-', '_')}.json").read_text())
    assert result["benchmark"] == name.replace("-", "_")
    assert result["runs"]
    # The run's settings are recorded as plain data, without the command's internals.
    args = result["args"]
    assert "func" not in args
    assert args["max_num_seqs"] == 4 and args["no_plot"] is True
