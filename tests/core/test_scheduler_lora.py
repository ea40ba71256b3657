"""The scheduler's LoRA share: at most ``max_loras`` distinct adapters run at once, a request
whose adapter would be one too many waits without holding up others, and adapters are
prefix-cache namespaces. Plans carry each sequence's adapter."""

from __future__ import annotations

from tests.core.fake_executor import FakeKVExecutor
from tests.core.test_scheduler import make_config, run_all
from tokenmill.core import Request, SamplingParams
from tokenmill.core.lora import LoRARequest, cache_namespace
from tokenmill.core.scheduler import Scheduler

A, B, C = (LoRARequest(n, i, f"/adapters/{n}") for i, n in enumerate("abc", start=1))


def req(rid: str, lora: LoRARequest | None, max_tokens: int = 6, t: float = 0.0, prompt=None) -> Request:
    return Request(rid, prompt or [1, 2, 3, 4, 5], SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                   arrival_time=t, lora=lora, cache_namespace=cache_namespace("", lora))  # fmt: skip


def test_at_most_max_loras_adapters_run_and_the_rest_wait_without_blocking() -> None:
    sched = Scheduler(make_config(max_loras=2))
    for r in (req("a", A, 3), req("b", B, 8), req("c", C, 2, t=1), req("base", None, 2, t=2), req("a2", A, 2, t=3)):
        sched.add_request(r)
    plan = sched.schedule(0.0)
    admitted = {s.request_id for s in plan.seqs}
    assert admitted == {"a", "b", "base", "a2"}  # c waits; base and a2 (a running adapter) pass it
    assert {s.request_id: s.lora_id for s in plan.seqs} == {"a": 1, "b": 2, "base": 0, "a2": 1}
    assert {s.request_id: s.setup.lora for s in plan.seqs if s.setup} == {"a": A, "b": B, "base": None, "a2": A}
    ex = FakeKVExecutor(sched.config.num_blocks, sched.config.block_size)
    seen_c_with = set()
    now = 0.0
    while sched.has_unfinished():
        running = {r.lora_id for r in sched.running if r.lora_id}
        assert len(running) <= 2
        if any(r.request_id == "c" for r in sched.running):
            seen_c_with |= running
        sched.update(plan, ex.execute(plan))
        now += 1
        plan = sched.schedule(now)
    assert seen_c_with and 1 not in seen_c_with  # c ran once adapter a had no request left
    assert sched.kv.pool.num_used == 0


def test_adapters_do_not_share_cached_prefixes() -> None:
    sched = Scheduler(make_config(max_loras=4))
    ex = FakeKVExecutor(sched.config.num_blocks, sched.config.block_size)
    prompt = list(range(1, 13))  # three full blocks
    sched.add_request(req("first", A, 2, prompt=prompt))
    run_all(sched, ex)
    for rid, lora in (("same", A), ("other", B), ("base", None)):
        r = req(rid, lora, 2, prompt=prompt)
        sched.add_request(r)
        run_all(sched, ex)
        assert (r.num_cached_tokens > 0) == (lora is A), rid


def test_no_salt_names_an_adapter_namespace() -> None:
    """Client cache salts map to namespaces that are never an adapter's (nor each other's)."""
    salts = ["", "x", "\x00", "\x00lora\x001\x00", "\x00\x00lora", "lora:1"]
    base = [cache_namespace(s, None) for s in salts]
    assert len(set(base)) == len(salts)
    adapters = {cache_namespace(s, lora) for s in salts for lora in (A, B)}
    assert not adapters & set(base) and len(adapters) == 2 * len(salts)
