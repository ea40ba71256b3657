"""``sim run --trace-file`` and ``sim compare``: twin timelines on disk, two of them side by side, divergence named."""

from __future__ import annotations

import json
from pathlib import Path

from tests.core.test_timeline import check_trace
from tokenmill.cli import main
from tokenmill.core.scheduler import SchedulerConfig
from tokenmill.sim import workload as W
from tokenmill.sim.compare import describe, divergence
from tokenmill.sim.config import PoolConfig, SimConfig
from tokenmill.sim.cost_model import ConstantCostModel
from tokenmill.sim.simulator import simulate
from tokenmill.sim.trace_file import read_trace, write_trace


def _twin(tmp_path: Path, name: str, per_step: float) -> Path:
    wl = W.synthetic(30, 25.0, "lognormal:60,0.5", "lognormal:16,0.5", vocab_size=1000, seed=1)
    cfg = SchedulerConfig(num_blocks=30, block_size=16, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=512,
                          max_decode_steps=4)  # fmt: skip
    res = simulate(wl, SimConfig(PoolConfig(cfg, ConstantCostModel(per_step, 1e-4)), mode="engine",
                                 timeline_requests=1000))  # fmt: skip
    path = tmp_path / name
    write_trace(path, res.timelines, origin=0.0)
    return path


def test_same_run_twice_does_not_diverge(tmp_path: Path) -> None:
    a = read_trace(_twin(tmp_path, "a.json", 0.01))
    b = read_trace(_twin(tmp_path, "b.json", 0.01))
    rep = divergence(a, b)
    assert rep["matched"] == 30 and rep["first_decision_divergence"] is None and rep["first_timing_divergence"] is None
    r = a["0"]
    assert r.arrival == 0.0 and r.chunks[0][0] == 0 and r.output_tokens > 0 and r.finish >= r.first_token


def test_slower_steps_diverge_and_compare_draws_both(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    fast, slow = _twin(tmp_path, "fast.json", 0.01), _twin(tmp_path, "slow.json", 0.02)
    rep = divergence(read_trace(fast), read_trace(slow))
    t = rep["first_timing_divergence"]
    assert t is not None and t["twin"]["latency_s"] > t["engine"]["latency_s"]
    png, out = tmp_path / "c.png", tmp_path / "c.json"
    assert main(["sim", "compare", str(fast), str(slow), "--plot", str(png), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"first timing divergence: request {t['request_id']}" in printed
    assert png.stat().st_size > 10_000
    assert json.loads(out.read_text())["first_timing_divergence"]["request_id"] == t["request_id"]


def test_decision_divergence_names_the_request() -> None:
    from tokenmill.sim.trace_file import RequestTimeline

    def rt(rid: str, t: float, chunks: list[tuple[int, int]]) -> RequestTimeline:
        r = RequestTimeline(rid, arrival=t, first_token=t + 0.1, finish=t + 0.2, output_tokens=4)
        r.prefill = [(t, t + 0.05, s, n) for s, n in chunks]
        return r

    engine = {"0": rt("0", 0.0, [(0, 16)]), "1": rt("1", 0.01, [(0, 8), (8, 8)]), "2": rt("2", 0.02, [(0, 4)])}
    twin = {"0": rt("0", 0.0, [(0, 16)]), "1": rt("1", 0.01, [(0, 16)]), "2": rt("2", 0.02, [(0, 2), (2, 2)])}
    rep = divergence(engine, twin)
    d = rep["first_decision_divergence"]
    assert d["request_id"] == "1" and d["differs_in"] == ["prefill chunks"] and rep["decision_divergences"] == 2
    assert "request 1" in " ".join(describe(rep))


def test_sim_run_writes_a_trace_per_replica(tmp_path: Path) -> None:
    trace, out = tmp_path / "t.json", tmp_path / "r.json"
    assert main(["sim", "run", "--model", "llama-3-8b", "--num-requests", "40", "--rate", "8", "--replicas", "2",
                 "--prompt-len", "lognormal:300,0.5", "--output-len", "lognormal:40,0.5", "--no-progress",
                 "-o", str(out), "--trace-file", str(trace)]) == 0  # fmt: skip
    data = json.loads(trace.read_text())
    check_trace(data)
    procs = {e["args"]["name"] for e in data["traceEvents"] if e["name"] == "process_name"}
    assert procs == {"twin replica 0", "twin replica 1"}
    assert len(read_trace(trace)) == 40
    assert main(["sim", "compare", str(trace), str(tmp_path / "missing.json")]) == 2


def test_disaggregated_twin_traces_both_pools(tmp_path: Path) -> None:
    trace = tmp_path / "pd.json"
    assert main(["sim", "run", "--model", "llama-3-8b", "--num-requests", "20", "--rate", "8", "--disagg", "1:1",
                 "--prompt-len", "lognormal:300,0.5", "--output-len", "lognormal:20,0.5", "--no-progress",
                 "-o", str(tmp_path / "r.json"), "--trace-file", str(trace)]) == 0  # fmt: skip
    data = json.loads(trace.read_text())
    check_trace(data)
    procs = {e["pid"]: e["args"]["name"] for e in data["traceEvents"] if e["name"] == "process_name"}
    assert procs == {0: "twin decode replica 0", 1: "twin prefill replica 1"}
    # Each request's prompt runs on the prefill replica, its decodes on the decode replica.
    by_pid: dict[int, set[str]] = {0: set(), 1: set()}
    for e in data["traceEvents"]:
        if e["name"] in ("prefill", "decode"):
            by_pid[e["pid"]].add(e["name"])
    assert by_pid[1] == {"prefill"} and "decode" in by_pid[0]
