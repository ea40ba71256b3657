"""``tokenmill sim validate --pd P:D`` (or ``--replicas N``): the same workload on a real cluster and in the twin.

One run (prefill/decode, the path with most parts: two pools, routers,
KV transfers priced from the run) keeps the suite short; ``--replicas``
takes the same path with one pool.
"""

from __future__ import annotations

import json
from typing import Any

from tokenmill.cli import main


def test_validate_a_cluster_against_the_twin(ray_session: Any, cluster_model_dir: Any, tmp_path: Any) -> None:
    model = str(cluster_model_dir)
    table = tmp_path / "p.json"
    assert main(["profile", "--model", model, "-o", str(table), "--dtype", "float32", "--max-num-batched-tokens", "128",
                 "--max-num-seqs", "8", "--kv-cache-memory", "16", "--repeats", "1", "--threads", "1",
                 "--grid", "quick"]) == 0  # fmt: skip
    rep = tmp_path / "v.json"
    assert main(["sim", "validate", "--model", model, "--profile", str(table), "--num-requests", "10", "--rate", "40",
                 "--prompt-len", "fixed:40", "--output-len", "fixed:8", "--kv-cache-memory", "16",
                 "--max-num-batched-tokens", "128", "--max-num-seqs", "8", "--pd", "1:1", "--router",
                 "least_outstanding_tokens", "--real-runs", "1", "--twin-runs", "1", "-o", str(rep)]) == 0  # fmt: skip
    v = json.loads(rep.read_text())
    for key in ("ttft_mean_ms", "tpot_mean_ms", "output_throughput"):
        assert v["real"][key] > 0 and v["twin"][key] > 0 and key in v["error_pct"]
    assert v["kv_transfer"]["transfers"] == 10 and v["kv_transfer"]["mean_s"] > 0
    assert v["deployment"] == "1 prefill (least_outstanding_tokens) : 1 decode (least_outstanding_tokens)"
