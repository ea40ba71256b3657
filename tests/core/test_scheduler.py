"""Scheduler behaviour with a fake executor that verifies KV bookkeeping."""

from __future__ import annotations

import random

import pytest

from tests.core.fake_executor import FakeKVExecutor, reference_output
from tokenmill.core import Request, RequestStatus, SamplingParams, StepResult
from tokenmill.core.request import FinishReason
from tokenmill.core.scheduler import QueueFullError, Scheduler, SchedulerConfig


def make_config(**kw) -> SchedulerConfig:
    base = dict(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=32, max_model_len=128, debug_checks=True)
    base.update(kw)
    return SchedulerConfig(**base)


def req(rid: str, prompt: list[int], max_tokens: int = 8, t: float = 0.0, **kw) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True, **kw), arrival_time=t)


def run_all(sched: Scheduler, ex: FakeKVExecutor | None = None, max_steps: int = 10_000) -> tuple[dict[str, list[int]], list]:
    ex = ex or FakeKVExecutor(sched.config.num_blocks, sched.config.block_size)
    plans = []
    reqs = {r.request_id: r for r in list(sched.waiting) + list(sched.running)}
    now = 0.0
    for _ in range(max_steps):
        if not sched.has_unfinished():
            break
        plan = sched.schedule(now)
        plans.append(plan)
        sched.update(plan, ex.execute(plan))
        now += 1.0
    assert not sched.has_unfinished(), "requests got stuck"
    assert sched.kv.pool.num_used == 0, "finished requests still own blocks"
    return {rid: r.output_token_ids for rid, r in reqs.items()}, plans


def random_workload(seed: int, n: int = 12, shared_prefix: bool = True) -> list[Request]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(97) for _ in range(rng.randint(4, 20))] for _ in range(3)]
    out = []
    for i in range(n):
        p = (rng.choice(prefixes) if shared_prefix else []) + [rng.randrange(97) for _ in range(rng.randint(1, 20))]
        out.append(req(f"r{i}", p, max_tokens=rng.randint(1, 16), t=float(i)))
    return out


def test_one_step_mixes_decode_and_prefill_chunks() -> None:
    s = Scheduler(make_config(max_num_batched_tokens=10))
    s.add_request(req("a", list(range(6)), max_tokens=4))
    plan = s.schedule(0.0)
    assert [(q.request_id, q.num_new_tokens, q.samples) for q in plan.seqs] == [("a", 6, True)]
    s.update(plan, StepResult({"a": [1]}))
    s.add_request(req("b", list(range(20, 40)), max_tokens=4))
    plan = s.schedule(1.0)
    # a decodes one token; b's 20-token prompt gets the remaining 9 of the budget, as a chunk.
    assert [(q.request_id, q.start_pos, q.num_new_tokens, q.samples) for q in plan.seqs] == [
        ("a", 6, 1, True),
        ("b", 0, 9, False),
    ]
    assert plan.num_batched_tokens == 10


def test_chunked_prefill_samples_only_after_the_last_chunk() -> None:
    s = Scheduler(make_config(max_num_batched_tokens=8))
    s.add_request(req("a", list(range(20)), max_tokens=2))
    _, plans = run_all(s)
    chunks = [(p.seqs[0].start_pos, p.seqs[0].num_new_tokens, p.seqs[0].samples) for p in plans]
    assert chunks[:3] == [(0, 8, False), (8, 8, False), (16, 4, True)]


def test_running_cap_is_respected() -> None:
    s = Scheduler(make_config(max_num_seqs=2))
    for i in range(5):
        s.add_request(req(f"r{i}", [i + 1] * 3, max_tokens=3, t=float(i)))
    _, plans = run_all(s)
    assert max(len(p.seqs) for p in plans) == 2
    assert all(p.num_running <= 2 for p in plans)


@pytest.mark.parametrize("seed", range(6))
def test_outputs_do_not_depend_on_batching_chunking_preemption_or_caching(seed: int) -> None:
    expected = {r.request_id: reference_output(r.prompt_token_ids, r.sampling_params.max_tokens) for r in random_workload(seed)}
    variants = [
        make_config(),
        make_config(max_num_batched_tokens=3),  # tiny chunks
        make_config(max_num_seqs=1),
        make_config(enable_prefix_caching=False),
        make_config(num_blocks=14),  # forces preemption
        make_config(max_decode_steps=5),
        make_config(num_blocks=14, max_decode_steps=4, max_num_batched_tokens=5),
    ]
    preempted_somewhere = False
    for cfg in variants:
        s = Scheduler(cfg)
        for r in random_workload(seed):
            s.add_request(r)
        outs, plans = run_all(s)
        assert outs == expected, cfg
        preempted_somewhere |= any(p.preempted_ids for p in plans)
    assert preempted_somewhere


def test_preemption_happens_and_is_recovered() -> None:
    s = Scheduler(make_config(num_blocks=10, max_num_batched_tokens=64))
    for i in range(4):
        s.add_request(req(f"r{i}", [i + 1] * 9, max_tokens=20, t=float(i)))
    outs, plans = run_all(s)
    assert s.num_preemptions > 0
    victims = [v for p in plans for v in p.preempted_ids]
    # r3 never fit at first (3 blocks each, 10 blocks); FCFS preempts the latest running arrival.
    assert plans[0].num_running == 3
    assert victims[0] == "r2"
    for i in range(4):
        assert outs[f"r{i}"] == reference_output([i + 1] * 9, 20)


def test_multi_step_plans_only_when_nothing_can_change() -> None:
    s = Scheduler(make_config(max_decode_steps=6))
    s.add_request(req("a", [1, 2, 3], max_tokens=10))
    s.add_request(req("b", [4, 5], max_tokens=4))
    _, plans = run_all(s)
    steps = [p.num_steps for p in plans]
    assert steps[0] == 1  # prefill
    assert max(steps) > 1
    # No plan runs a request past its max_tokens.
    assert sum(steps) <= 1 + 10


def test_max_steps_caps_a_plan() -> None:
    s = Scheduler(make_config(max_decode_steps=8))
    s.add_request(req("a", [1, 2, 3], max_tokens=20))
    ex = FakeKVExecutor(64, 4)
    p = s.schedule(0.0)
    s.update(p, ex.execute(p))
    p = s.schedule(1.0, max_steps=3)
    assert p.num_steps == 3


def test_prefix_cache_serves_a_repeated_prompt() -> None:
    s = Scheduler(make_config())
    ex = FakeKVExecutor(64, 4)
    prompt = list(range(1, 18))
    s.add_request(req("a", prompt, max_tokens=2))
    run_all(s, ex)
    b = req("b", prompt, max_tokens=2)
    s.add_request(b)
    outs, _ = run_all(s, ex)
    assert b.num_cached_tokens == 16  # four full blocks; the last token is always computed
    assert outs["b"] == reference_output(prompt, 2)
    st = s.stats()
    assert st.prefix_hit_tokens == 16 and st.prefix_query_tokens == 34


def test_namespaces_do_not_share_prefixes() -> None:
    s = Scheduler(make_config())
    prompt = list(range(1, 18))
    s.add_request(req("a", prompt, max_tokens=2))
    run_all(s)
    b = req("b", prompt, max_tokens=2)
    b.cache_namespace = "tenant-2"
    s.add_request(b)
    run_all(s)
    assert b.num_cached_tokens == 0


def test_stop_conditions() -> None:
    s = Scheduler(make_config())
    a = Request("a", [1, 2], SamplingParams(max_tokens=50), eos_token_ids=(7,))
    s.add_request(a)
    p = s.schedule(0.0)
    ups = s.update(p, StepResult({"a": [3]}))
    assert not ups[0].finished
    p = s.schedule(1.0)
    ups = s.update(p, StepResult({"a": [7]}))
    assert ups[0].finished and a.finish_reason is FinishReason.STOP and a.stop_reason is None
    assert a.output_token_ids == [3, 7]

    b = Request("b", [1], SamplingParams(max_tokens=50, stop_token_ids=[9], min_tokens=2), eos_token_ids=(7,))
    s.add_request(b)
    p = s.schedule(2.0)
    assert not s.update(p, StepResult({"b": [9]}))[0].finished  # below min_tokens
    p = s.schedule(3.0)
    assert s.update(p, StepResult({"b": [9]}))[0].finished
    assert b.stop_reason == 9

    c = Request("c", [1], SamplingParams(max_tokens=2, ignore_eos=True), eos_token_ids=(7,))
    s.add_request(c)
    p = s.schedule(4.0)
    s.update(p, StepResult({"c": [7]}))
    p = s.schedule(5.0)
    s.update(p, StepResult({"c": [7]}))
    assert c.finish_reason is FinishReason.LENGTH and c.output_token_ids == [7, 7]


def test_multi_step_result_is_truncated_at_a_stop_token() -> None:
    s = Scheduler(make_config(max_decode_steps=4))
    a = Request("a", [1, 2], SamplingParams(max_tokens=50), eos_token_ids=(7,))
    s.add_request(a)
    p = s.schedule(0.0)
    s.update(p, StepResult({"a": [3]}))
    p = s.schedule(1.0)
    assert p.num_steps == 4
    ups = s.update(p, StepResult({"a": [4, 7, 5, 6]}))
    assert ups[0].new_token_ids == [4, 7] and ups[0].finished
    assert a.output_token_ids == [3, 4, 7]
    assert s.kv.pool.num_used == 0


def test_context_length_ends_generation() -> None:
    s = Scheduler(make_config(max_model_len=10))
    a = Request("a", [1] * 8, SamplingParams(max_tokens=None, ignore_eos=True))
    s.add_request(a)
    outs, _ = run_all(s)
    assert len(outs["a"]) == 2 and a.finish_reason is FinishReason.LENGTH


def test_bad_requests_are_refused_with_a_reason() -> None:
    s = Scheduler(make_config(num_blocks=4, max_model_len=64, max_waiting=1))
    with pytest.raises(ValueError, match="empty"):
        s.add_request(req("e", []))
    with pytest.raises(ValueError, match="context length"):
        s.add_request(req("long", [1] * 64))
    with pytest.raises(ValueError, match="cache holds only"):
        s.add_request(req("big", [1] * 10, max_tokens=20))
    s.add_request(req("ok", [1, 2], max_tokens=2))
    with pytest.raises(ValueError, match="already in use"):
        s.add_request(req("ok", [1, 2], max_tokens=2))
    with pytest.raises(QueueFullError):
        s.add_request(req("second", [1, 2], max_tokens=2))
    outs, _ = run_all(s)
    assert outs["ok"] == reference_output([1, 2], 2)


def test_sampling_params_are_validated() -> None:
    for bad in [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(max_tokens=0), dict(n=0), dict(top_k=-2)]:
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_abort_frees_blocks_at_once() -> None:
    s = Scheduler(make_config())
    s.add_request(req("a", list(range(10)), max_tokens=20))
    s.add_request(req("b", list(range(30, 40)), max_tokens=20))
    ex = FakeKVExecutor(64, 4)
    p = s.schedule(0.0)
    s.update(p, ex.execute(p))
    used = s.kv.pool.num_used
    assert used > 0
    a = s.abort_request("a")
    assert a is not None and a.status is RequestStatus.FINISHED and a.finish_reason is FinishReason.ABORT
    assert s.kv.pool.num_used < used
    assert "a" not in s.kv.tables
    s.abort_request("b")
    assert s.kv.pool.num_used == 0 and not s.has_unfinished()
    s.kv.check_invariants()
