"""``tokenmill sim``: bad policy options are one-line errors; KV sizes take units (a bare number is MiB)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenmill.cli import main

RUN = ["sim", "run", "--model", "llama-3-8b", "--cost-model", "roofline", "--num-requests", "20", "--rate", "5",
       "--no-progress"]  # fmt: skip


@pytest.mark.parametrize("sub", [RUN, ["sim", "search", "--max-replicas", "1"]])
def test_policy_option_the_policy_does_not_take(sub: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*sub, "--policy", "vtc", "--policy-option", "quantum=5"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines() == [
        "error: --policy-option quantum: policy 'vtc' has no option 'quantum' (it takes input_weight, output_weight)"
    ]


def test_kv_cache_memory_units(tmp_path: Path) -> None:
    import argparse

    from tokenmill.commands.sim import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    for text, expected in (("2048", 2 << 30), ("2GiB", 2 << 30), ("512MiB", 512 << 20)):
        assert parser.parse_args(["sim", "run", "--kv-cache-memory", text]).kv_cache_memory == expected
    assert parser.parse_args(["sim", "run"]).kv_cache_memory == 1 << 30
    out = tmp_path / "r.json"
    assert main([*RUN, "--kv-cache-memory", "2GiB", "-o", str(out)]) == 0
    assert json.loads(out.read_text())["summary"]["completed"] == 20
