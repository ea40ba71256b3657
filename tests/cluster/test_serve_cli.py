"""``tokenmill serve --replicas N | --pd P:D``: flags checked before anything starts, and a real run.

The real run joins the test session's Ray cluster with ``--ray-address``
(as a second machine would join a head node), serves a completion through
its replica, shows the replica in ``/metrics``, and on SIGTERM drains,
stops its replica and exits 0.
"""

from __future__ import annotations

import sys
from typing import Any

import httpx
import pytest

from tests.server.helpers import MODEL_NAME, ServerProcess, metric, parse_metrics
from tokenmill.cli import main


@pytest.mark.parametrize(("flags", "words"), [
    (["--pd", "1"], ["--pd", "P:D"]),
    (["--pd", "0:2"], ["--pd", "at least one"]),
    (["--replicas", "3", "--pd", "1:1"], ["--replicas 3", "--pd 1:1"]),
    (["--replicas", "2", "--router", "random"], ["--router", "prefix_aware"]),
])  # fmt: skip
def test_bad_cluster_flags_are_one_line_errors(tiny_model_dir: Any, capsys: pytest.CaptureFixture[str],
                                               flags: list[str], words: list[str]) -> None:  # fmt: skip
    assert main(["serve", str(tiny_model_dir("llama")), *flags]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: "), err
    for w in words:
        assert w in err, err


def test_serving_one_engine_does_not_import_ray() -> None:
    import subprocess

    code = ("import sys, tokenmill.commands.serve, tokenmill.server.app, tokenmill.cluster; "
            "sys.exit('ray' in sys.modules)")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_serve_joins_a_ray_cluster(ray_session: Any, cluster_model_dir: Any, tmp_path: Any) -> None:
    address = ray_session.get_runtime_context().gcs_address
    proc = ServerProcess(cluster_model_dir, tmp_path / "serve.log", "--replicas", "1", "--ray-address", address,
                         "--router", "least_outstanding_tokens")  # fmt: skip
    try:
        proc.wait_ready(timeout=240)
        r = httpx.post(f"{proc.base_url}/v1/completions", headers=proc.headers, timeout=60,
                       json={"model": MODEL_NAME, "prompt": "In the beginning", "max_tokens": 5, "temperature": 0})  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 5
        m = parse_metrics(httpx.get(f"{proc.base_url}/metrics", timeout=10).text)
        assert metric(m, "tokenmill_request_finished_total", replica="0") == 1
        assert metric(m, "tokenmill_replica_up", replica="0") == 1
    finally:
        code = proc.stop()
    assert code == 0, proc.log()
