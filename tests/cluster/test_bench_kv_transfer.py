"""Smoke run of ``tokenmill bench kv-transfer`` at a tiny size, on the tests' Ray instance, so that it never rots.

The benchmark checks itself that the destination's blocks equal the
source's after a transfer; here it must report both sides of its
comparison (the transfer and the memcpy of the same bytes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenmill.cli import main


def test_kv_transfer_bench(ray_session: Any, cluster_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "kv.json"
    assert main(["bench", "kv-transfer", "--model", str(cluster_model_dir), "--sizes-mb", "0.1", "--repeats", "1",
                 "--in-flight", "2", "--result-file", str(out)]) == 0  # fmt: skip
    res = json.loads(out.read_text())
    (row,) = res["results"]
    assert row["blocks"] >= 1 and row["size_mb"] == row["blocks"] * res["block_bytes"] / 1e6
    for key in ("transfer_gbps", "memcpy_gbps", "overlapped_gbps", "gather_scatter_gbps", "ratio"):
        assert row[key] > 0
    assert ray_session.is_initialized()  # it used the running instance and left it running
