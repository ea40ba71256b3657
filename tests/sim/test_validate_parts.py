"""``sim validate``'s parts: the engine's spread, the target, held-out workloads (trace CSV), thread pinning."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from tokenmill.sim.build import WorkloadSpec
from tokenmill.sim.pinning import parse_cpus, pinned
from tokenmill.sim.validate import mean_metrics, run_spread, validation_workload, within_target


def test_spread_is_the_largest_distance_of_a_run_from_the_mean() -> None:
    runs = [{"ttft_mean_ms": 90.0, "tpot_mean_ms": 10.0}, {"ttft_mean_ms": 100.0, "tpot_mean_ms": 10.0},
            {"ttft_mean_ms": 110.0, "tpot_mean_ms": 10.0}]  # fmt: skip
    assert mean_metrics(runs) == {"ttft_mean_ms": 100.0, "tpot_mean_ms": 10.0}
    assert run_spread(runs) == {"ttft_mean_ms": pytest.approx(10.0), "tpot_mean_ms": 0.0}
    assert run_spread(runs[:1]) == {"ttft_mean_ms": 0.0, "tpot_mean_ms": 0.0}


def test_target_is_five_percent_or_the_engines_spread() -> None:
    error = {"ttft_mean_ms": 8.0, "ttft_p90_ms": -4.0, "tpot_mean_ms": 12.0, "tpot_p90_ms": -6.0, "duration_s": 50.0}
    spread = {"ttft_mean_ms": 9.0, "ttft_p90_ms": 1.0, "tpot_mean_ms": 3.0, "tpot_p90_ms": 2.0}
    assert within_target(error, spread) == {"ttft_mean_ms": True, "ttft_p90_ms": True, "tpot_mean_ms": False,
                                            "tpot_p90_ms": False}  # fmt: skip


def test_trace_csv_workload_scaled_to_a_small_model(tmp_path: Path) -> None:
    csv = tmp_path / "t.csv"
    csv.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                   "2023-11-16 18:15:46.5000000,1000,200\n2023-11-16 18:15:47.0000000,3000,10\n"
                   "2023-11-16 18:15:48.2500000,40,4\n")  # fmt: skip
    ws = WorkloadSpec(kind="azure", num_requests=3, arrival="trace", path=str(csv), time_scale=0.5)
    wl = validation_workload(ws, vocab_size=500, max_model_len=1024, length_scale=0.1)
    assert [r.arrival for r in wl.requests] == pytest.approx([0.0, 0.25, 0.875])
    assert [(r.prompt_len, r.output_len) for r in wl.requests][0] == (100, 20)
    assert wl.requests[1].prompt_len + wl.requests[1].output_len <= 1023  # 300 + 1 fits; clipped only if too long
    assert wl.description["length_scale"] == 0.1
    with pytest.raises(ValueError):
        validation_workload(ws, 500, 1024, length_scale=0.0)
    bad = tmp_path / "bad.csv"
    bad.write_text("time,prompt,output\n1,2,3\n")
    with pytest.raises(ValueError, match="not an Azure"):
        validation_workload(WorkloadSpec(kind="azure", num_requests=1, arrival="trace", path=str(bad)), 500, 1024)


def test_synthetic_held_out_workloads_bursts_and_shared_prefixes() -> None:
    burst = validation_workload(WorkloadSpec(num_requests=200, rate=5.0, arrival="gamma", cv=4.0, prompt_len="fixed:30",
                                             output_len="fixed:5"), 500, 1024)  # fmt: skip
    gaps = [b.arrival - a.arrival for a, b in itertools.pairwise(burst.requests)]
    small = sum(1 for g in gaps if g < 0.02)
    assert small > len(gaps) / 2  # most requests come in bursts
    groups = validation_workload(WorkloadSpec(num_requests=20, rate=5.0, prompt_len="fixed:10", output_len="fixed:5",
                                              shared_prefix_groups=2, shared_prefix_len=32), 500, 1024)  # fmt: skip
    prompts = [tuple(groups.prompt_tokens(i, r)[:32]) for i, r in enumerate(groups.requests)]
    assert len(set(prompts)) == 2


def test_parse_cpus() -> None:
    assert parse_cpus("0") == {0} and parse_cpus("0-2,5") == {0, 1, 2, 5}
    for bad in ("", "a", "1-x"):
        with pytest.raises(ValueError):
            parse_cpus(bad)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_pinned_sets_threads_and_affinity_of_every_thread_and_restores() -> None:
    import threading

    import torch

    before_threads, before_cpus = torch.get_num_threads(), os.sched_getaffinity(0)
    one = {min(before_cpus)}
    seen: list[set[int]] = []
    ready, done = threading.Event(), threading.Event()

    def worker() -> None:  # a thread that exists before pinning, as torch's pool does
        ready.set()
        done.wait(5)
        seen.append(os.sched_getaffinity(0))

    t = threading.Thread(target=worker)
    t.start()
    ready.wait(5)
    with pinned(threads=1, cpus=one) as pin:
        assert pin == {"threads": 1, "cpus": sorted(one)} and torch.get_num_threads() == 1
        done.set()
        t.join(5)
    assert seen == [one]
    assert torch.get_num_threads() == before_threads and os.sched_getaffinity(0) == before_cpus
    with pytest.raises(ValueError, match="not available"), pinned(cpus={10_000}):
        pass


def test_step_time_check_prices_the_recorded_plans() -> None:
    from tokenmill.engine import StepRecord
    from tokenmill.sim.cost_model import ConstantCostModel
    from tokenmill.sim.validate import step_time_check

    cm = ConstantCostModel(per_step=0.01, per_token=0.001)
    # A 20-token prefill chunk (0.01 + 0.02 s priced) and a 4-step decode plan of two sequences (4 x 0.012 s).
    log = [StepRecord(0, ["a"], (1, (("a", 0, 20, True),), ()), 0.06),
           StepRecord(1, [], (4, (("a", 20, 1, True), ("b", 7, 1, True)), ()), 0.048)]  # fmt: skip
    c = step_time_check(log, cm)
    assert c["plans"] == 2 and c["ratio_p10"] == pytest.approx(1.1) and c["ratio_p90"] == pytest.approx(1.9)
    assert c["measured_over_priced"] == pytest.approx(0.108 / 0.078) and c["priced_s"] == pytest.approx(0.078)
    assert step_time_check([], cm) == {}


PROFILE = Path(__file__).resolve().parents[2] / "docs" / "sim" / "profile-default-validate.json"


def test_validate_refuses_bad_input_with_one_line(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from tokenmill.cli import main

    for flags, words in ((["--trace", str(tmp_path / "missing.csv")], "missing.csv"),
                         (["--real-runs", "0"], "real_runs"), (["--cpus", "x"], "CPU list"),
                         (["--shared-prefix", "4"], "GROUPS:LEN")):  # fmt: skip
        assert main(["sim", "validate", "--profile", str(PROFILE), *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and "Traceback" not in err
