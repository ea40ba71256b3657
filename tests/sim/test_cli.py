"""The command line: ``tokenmill sim run | search | validate`` and ``tokenmill profile`` end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.core.test_timeline import check_trace
from tokenmill.cli import main


def test_sim_run_synthetic_writes_json_and_plot(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["sim", "run", "--model", "llama-3-8b", "--hardware", "a100", "--num-requests", "300", "--rate", "6",
               "--shared-prefix", "4:256", "--slo-ttft", "0.5", "--slo-tpot", "0.05", "--no-progress",
               "-o", str(out), "--plot", str(png)])  # fmt: skip
    assert rc == 0
    data = json.loads(out.read_text())
    s = data["summary"]
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(s[key]) == {"mean", "p50", "p90", "p99"}
    for key in ("request_throughput", "output_throughput", "total_token_throughput", "goodput", "slo_attainment"):
        assert s[key] >= 0
    assert s["completed"] == 300
    assert data["series"]["kv_usage"] and data["series"]["waiting"]
    assert data["config"]["pool"]["cost_model"]["hardware"] == "a100"
    assert png.stat().st_size > 10_000


def test_sim_run_azure_cluster_and_disagg(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "a.json"
    assert main(["sim", "run", "--workload", "azure", "--num-requests", "400", "--time-scale", "0.25",
                 "--model", "llama-2-70b", "--tp", "8", "--replicas", "4", "--router", "least_outstanding_tokens",
                 "--no-progress", "-o", str(out)]) == 0  # fmt: skip
    s = json.loads(out.read_text())["summary"]
    assert s["completed"] == 400 and s["num_gpus"] == 32
    assert main(["sim", "run", "--workload", "azure", "--arrival", "poisson", "--rate", "10", "--num-requests", "200",
                 "--model", "llama-3-8b", "--disagg", "1:2", "--no-progress", "-o", str(out)]) == 0  # fmt: skip
    s = json.loads(out.read_text())["summary"]
    assert s["completed"] == 200 and s["kv_transfers"] > 0 and s["num_gpus"] == 3


def test_sim_search_picks_a_best_split(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "s.json"
    assert main(["sim", "search", "--model", "llama-3-8b", "--max-replicas", "2", "--num-requests", "50",
                 "--duration", "3", "--confirm", "2", "--max-num-seqs", "32", "--prompt-len", "lognormal:512,0.8",
                 "--output-len", "lognormal:128,0.8", "--slo-ttft", "1.0", "--slo-tpot", "0.05",
                 "-o", str(out)]) == 0  # fmt: skip
    rep = json.loads(out.read_text())
    assert {(r["prefill"], r["decode"]) for r in rep["results"]} == {(0, 1), (0, 2), (1, 1)}
    assert rep["best"]["goodput_per_gpu"] == max(r.get("goodput_per_gpu", 0) for r in rep["results"]) > 0
    assert rep["steady_state"]["duration_s"] == 3 and rep["best"]["confirmed"]["arrival_s"] >= 4


def test_profile_and_validate_on_tiny_model(tiny_model_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = str(tiny_model_dir("llama"))
    table = tmp_path / "p.json"
    assert main(["profile", "--model", model, "-o", str(table), "--dtype", "float32", "--max-num-batched-tokens", "128",
                 "--max-num-seqs", "8", "--kv-cache-memory", "16", "--repeats", "1", "--threads", "1",
                 "--jitter-samples", "30"]) == 0  # fmt: skip
    prof = json.loads(table.read_text())
    assert prof["format"] == "tokenmill-profile/1" and prof["statistic"] == "robust"
    assert len(prof["jitter"]["ratio_quantiles"]) == 101 and prof["jitter"]["median_s"] > 0
    rep, traces = tmp_path / "v.json", tmp_path / "traces"
    assert main(["sim", "validate", "--model", model, "--profile", str(table), "--num-requests", "12", "--rate", "20",
                 "--prompt-len", "fixed:40", "--output-len", "fixed:12", "--kv-cache-memory", "16",
                 "--max-num-batched-tokens", "128", "--max-num-seqs", "8", "--real-runs", "2", "--twin-runs", "2",
                 "--shared-prefix", "2:16", "--cpus", str(min(os.sched_getaffinity(0))), "--trace-dir", str(traces),
                 "-o", str(rep)]) == 0  # fmt: skip
    v = json.loads(rep.read_text())
    for key in ("ttft_mean_ms", "ttft_p90_ms", "tpot_mean_ms", "tpot_p90_ms", "output_throughput"):
        assert v["real"][key] > 0 and v["twin"][key] > 0 and key in v["error_pct"]
        assert key in v["error_pct_drift_corrected"] and v["real_spread_pct"][key] >= 0
    assert len(v["real_runs"]) == 2 and v["twin_runs"] == 2 and v["twin_jitter"]
    assert v["drift_factor"] > 0 and all(c["plans"] > 0 and c["priced_s"] > 0 for c in v["step_time_check"])
    assert set(v["within_target"]) == {"ttft_mean_ms", "ttft_p90_ms", "tpot_mean_ms", "tpot_p90_ms"}
    assert v["engine"]["cpus"] == [min(os.sched_getaffinity(0))] and v["engine"]["threads"] == 1
    # The twin ran the requests the engine ran; both timelines are on disk, with their comparison.
    assert v["workload"]["num_requests"] == 12 and v["workload"]["shared_prefix_groups"] == 2
    for f in [*v["timelines"]["engine"], v["timelines"]["twin"]]:
        check_trace(json.loads(Path(f).read_text()))
    assert v["timelines"]["divergence"]["matched"] == 12 and (traces / "compare.png").stat().st_size > 10_000
    out = tmp_path / "pr.json"
    assert main(["sim", "run", "--cost-model", "profiled", "--profile", str(table), "--num-requests", "50",
                 "--rate", "20", "--prompt-len", "fixed:40", "--output-len", "fixed:12", "--max-num-batched-tokens",
                 "128", "--no-progress", "-o", str(out)]) == 0  # fmt: skip
    assert json.loads(out.read_text())["summary"]["completed"] == 50


def test_sim_speed_benchmark_smoke(capsys) -> None:  # type: ignore[no-untyped-def]
    from tokenmill.bench.sim_speed import main as bench

    assert bench(["--replicas", "1", "4", "--single-requests", "200", "--requests", "400"]) == 0
    out = capsys.readouterr().out
    assert "req/s" in out and "steps/s" in out and "  4 replica(s)" in out


def test_sim_speed_benchmark_reports_both_targets(capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from tokenmill.bench import sim_speed

    monkeypatch.setattr(sim_speed, "TARGET_RUNS", [(2, 120), (3, 150)])
    assert sim_speed.main(["--targets"]) == 0
    out = capsys.readouterr().out
    assert "target 1: >= 5,000 req per wall s at 2 replicas: " in out
    assert "target 2: 150 requests on 3 replicas in < 600 s wall: " in out
    assert out.count("load average") >= 2
