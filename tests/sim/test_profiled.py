"""Profiled cost model: interpolation, and profiling the real executor on a tiny checkpoint."""

from __future__ import annotations

import pytest

from tokenmill.sim.cost_model import StepFeatures
from tokenmill.sim.profiled import FORMAT, ProfiledCostModel


def affine_table(per_step: float = 1e-3) -> dict:  # type: ignore[type-arg]
    P, D, C = [0, 64, 512], [0, 1, 8, 32], [16, 256, 1024]

    def f(p: float, d: float, c: float) -> float:  # affine in each axis, with cross terms
        return 2e-3 + 1e-5 * p + 3e-4 * d + 1e-7 * d * c + 1e-8 * p * c

    times = [[[f(p, d, c) for c in C] for d in D] for p in P]
    return {"format": FORMAT, "axes": {"prefill_tokens": P, "decode_seqs": D, "context_tokens": C}, "times": times,
            "engine_overhead": {"per_step_s": per_step, "per_token_s": 1e-4}}, f  # fmt: skip


def test_trilinear_interpolation_is_exact_on_multilinear_data() -> None:
    table, f = affine_table()
    cm = ProfiledCostModel(table)
    for p, d, c in ((10, 3, 100), (300, 20, 700), (64, 1, 16), (0, 5, 900)):
        assert cm.interpolate(p, d, c) == pytest.approx(f(p, d, c), rel=1e-9)
    # Linear extrapolation past the last grid point.
    assert cm.interpolate(1024, 64, 2048) == pytest.approx(f(1024, 64, 2048), rel=1e-9)
    # Engine overhead: once per plan, per sampled token per sub-step.
    feats = StepFeatures(num_seqs=4, num_tokens=4, num_samples=4, num_decode=4, decode_context=400)
    assert cm.step_time(feats) == pytest.approx(f(0, 4, 100) + 1e-3 + 4e-4)
    assert cm.decode_time(4, 400, 10) == pytest.approx(10 * (f(0, 4, 100 + 4.5) + 4e-4) + 1e-3)


def test_rejects_bad_tables() -> None:
    table, _ = affine_table()
    with pytest.raises(ValueError, match="format"):
        ProfiledCostModel({**table, "format": "other"})
    bad = dict(table)
    bad["axes"] = {**table["axes"], "decode_seqs": [0, 8, 1, 32]}
    with pytest.raises(ValueError, match="increasing"):
        ProfiledCostModel(bad)


def test_profile_tiny_model_end_to_end(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    import torch

    from tokenmill.model import threads as thread_control
    from tokenmill.sim.profiler import profile_model

    grid = {"prefill_tokens": [0, 16, 64], "decode_seqs": [0, 1, 4], "context_tokens": [16, 128]}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on a shared two-core machine wait on each other
    try:
        table = profile_model(str(tiny_model_dir("llama")), grid=grid, dtype="float32", max_num_batched_tokens=64,
                              max_num_seqs=8, kv_cache_memory=8 << 20, repeats=2)  # fmt: skip
        # the table is for one fixed thread count: no thread controller adapted it mid-grid
        assert not thread_control.controller().enabled and table["torch_threads"] == 1
    finally:
        torch.set_num_threads(threads)
        thread_control.configure(None)
    assert table["axes"]["prefill_tokens"] == [0, 16, 64]
    t = table["times"]
    # Every measured point is positive; the empty step (0, 0, c) is extrapolated, possibly to 0.
    assert all(v > 0 for i, plane in enumerate(t) for j, row in enumerate(plane) for v in row if i or j)
    assert table["engine_overhead"]["per_step_s"] >= 0
    assert table["hardware"]["peak_flops"]["fp32"] > 1e8
    cm = ProfiledCostModel(table)
    assert cm.interpolate(32, 2, 64) > 0


def test_multistep_decodes_use_their_own_table() -> None:
    table, f = affine_table()
    D, C = table["axes"]["decode_seqs"], table["axes"]["context_tokens"]
    # Sub-steps of multi-step plans cost 1.5x a one-step plan here.
    table["decode_multistep"] = {"num_steps": 8, "times": [[1.5 * f(0, d, c) if d else 0.0 for c in C] for d in D]}
    cm = ProfiledCostModel(table)
    assert cm.decode_time(4, 400, 1) == pytest.approx(f(0, 4, 100) + 4e-4 + 1e-3)
    assert cm.decode_time(4, 400, 10) == pytest.approx(10 * (1.5 * f(0, 4, 104.5) + 4e-4) + 1e-3)
    assert cm.decode_time(1, 16, 3) == pytest.approx(3 * (1.5 * f(0, 1, 17) + 1e-4) + 1e-3)
