"""``tokenmill bench serve`` against a tokenmill server: a short run that writes complete JSON."""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest

from tests.server.helpers import API_KEY, ServerProcess
from tokenmill.bench import serve as bench_serve
from tokenmill.bench.serve_report import parse_slos, summarize
from tokenmill.bench.serve_workloads import arrival_times, make_workload
from tokenmill.sim.azure_trace import AZURE_CONV_TRACE

LATENCIES = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")
STATS = ("mean", "p50", "p90", "p99")


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_serve.add_arguments(parser)
    return parser.parse_args(list(argv))


def _check_report(report: dict[str, Any], num_prompts: int) -> None:
    assert report["completed"] == num_prompts, report["errors"]
    assert report["failed"] == 0
    for key in ("request_throughput", "output_throughput", "total_token_throughput", "duration_s"):
        assert report[key] > 0, key
    assert report["total_input_tokens"] > 0 and report["total_output_tokens"] > 0
    for name in LATENCIES:
        for stat in STATS:
            value = report[name][stat]
            assert isinstance(value, float) and math.isfinite(value) and value >= 0, (name, stat, value)
        assert report[name]["p50"] <= report[name]["p90"] <= report[name]["p99"]
    good = report["goodput"]
    assert good is not None and good["requests_per_s"] >= 0 and 0 <= good["fraction"] <= 1
    assert len(report["requests"]) == num_prompts


def test_bench_serve_fixed_workload_with_plots(server: ServerProcess, server_model_dir: Path, tmp_path: Path) -> None:
    result = tmp_path / "result.json"
    plots = tmp_path / "plots"
    # tokenmill's /v1/models names the model, not its directory: the tokenizer is given
    args = _args(
        "--base-url", server.base_url, "--api-key", API_KEY, "--workload", "fixed", "--tokenizer", str(server_model_dir),
        "--num-prompts", "8", "--input-len", "24", "--output-len", "8", "--request-rate", "40",
        "--goodput", "ttft:60000", "tpot:60000", "--result-file", str(result), "--plot", str(plots),
        "--no-progress",
    )  # fmt: skip
    assert bench_serve.run(args) == 0
    report = json.loads(result.read_text())
    _check_report(report, 8)
    assert report["goodput"]["fraction"] == 1.0  # a minute per token is met
    assert report["exact_prompt_lengths"]
    assert report["total_output_tokens"] == 8 * 8  # ignore_eos: every answer is as long as asked
    assert all(r["prompt_tokens"] == 24 for r in report["requests"])
    for name in ("latency_cdf.png", "throughput.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_serve_shared_prefix_chat_with_concurrency(
    server: ServerProcess, server_model_dir: Path, tmp_path: Path
) -> None:
    result = tmp_path / "result.json"
    args = _args(
        "--base-url", f"{server.base_url}/v1", "--api-key", API_KEY, "--endpoint", "chat",
        "--tokenizer", str(server_model_dir),
        "--workload", "shared-prefix", "--num-prefixes", "2", "--questions-per-prefix", "4", "--prefix-len", "48",
        "--input-len", "8", "--output-len", "6", "--num-prompts", "8", "--max-concurrency", "3",
        "--request-rate", "100", "--burstiness", "0.5", "--goodput", "e2e:1", "--result-file", str(result),
        "--no-progress",
    )  # fmt: skip
    assert bench_serve.run(args) == 0
    report = json.loads(result.read_text())
    _check_report(report, 8)
    assert report["total_cached_tokens"] > 0  # the shared system prompts hit the prefix cache
    assert report["goodput"]["fraction"] < 1.0  # nobody answers in 1 ms


def test_bench_serve_reports_failures(tmp_path: Path) -> None:
    """A server that is not there: the run fails cleanly (no model to discover)."""
    args = _args("--base-url", "http://127.0.0.1:9", "--num-prompts", "2", "--no-progress")
    assert bench_serve.run(args) == 2


def test_workloads_and_arrivals() -> None:
    chat = make_workload(_args("--workload", "chat", "--num-prompts", "200", "--input-len", "100", "--output-len", "50"), None, 512)
    assert len(chat) == 200
    assert all(r.prompt_len + r.output_len <= 512 for r in chat)
    assert len({r.prompt_len for r in chat}) > 20  # a spread, not one length
    prefix = make_workload(_args("--workload", "shared-prefix", "--num-prefixes", "3", "--questions-per-prefix", "5", "--num-prompts", "15"))
    assert len({r.system for r in prefix}) == 3 and len(prefix) == 15
    times = arrival_times(2000, rate=50.0, burstiness=1.0, rng=random.Random(0))
    assert times == sorted(times)
    assert 2000 / times[-1] == pytest.approx(50.0, rel=0.1)
    assert arrival_times(3, math.inf, 1.0, random.Random(0)) == [0.0, 0.0, 0.0]
    assert parse_slos(["ttft:500", "tpot:50"]) == {"ttft": 500.0, "tpot": 50.0}
    with pytest.raises(ValueError):
        parse_slos(["latency:5"])
    s = summarize([0.001, 0.002, 0.003, 0.004])
    assert s["mean"] == pytest.approx(2.5) and s["p50"] == pytest.approx(2.5)


@pytest.mark.skipif(not AZURE_CONV_TRACE.is_file(), reason="the Azure trace is not on this machine")
def test_azure_trace_workload() -> None:
    reqs = make_workload(_args("--workload", "azure", "--num-prompts", "50", "--trace-timestamps", "--trace-speedup", "2"), None, 256)
    assert len(reqs) == 50
    assert reqs[0].arrival == 0.0 and all(r.arrival is not None for r in reqs)
    assert [r.arrival for r in reqs] == sorted(r.arrival for r in reqs)  # type: ignore[type-var]
    assert all(r.prompt_len + r.output_len <= 256 for r in reqs)
