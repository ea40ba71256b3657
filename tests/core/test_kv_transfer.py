"""KV export and import between two schedulers (prefill/decode disaggregation), with fake KV.

A prefill scheduler runs a prompt to its first token and holds the blocks;
a decode scheduler reserves blocks (taking what its prefix cache has), the
KV of the other blocks is copied across, and the request continues there
with no prompt token computed: its output must equal a single scheduler's.
"""

from __future__ import annotations

from tests.core.fake_executor import FakeKVExecutor, reference_output
from tests.core.test_scheduler import make_config, req, run_all
from tokenmill.core import Request, SamplingParams
from tokenmill.core.scheduler import Scheduler

BS = 4


def prefill(sched: Scheduler, ex: FakeKVExecutor, r: Request) -> None:
    r.hold_kv = True
    sched.add_request(r, 0.0)
    now = 0.0
    while sched.has_unfinished():
        plan = sched.schedule(now)
        sched.update(plan, ex.execute(plan))
        now += 1.0


def copy_blocks(src: FakeKVExecutor, src_blocks: list[int], dst: FakeKVExecutor, dst_blocks: list[int]) -> None:
    assert len(src_blocks) == len(dst_blocks)
    for a, b in zip(src_blocks, dst_blocks, strict=True):
        dst.slots[b * BS : (b + 1) * BS] = src.slots[a * BS : (a + 1) * BS]


def transfer(p_sched: Scheduler, p_ex: FakeKVExecutor, d_sched: Scheduler, d_ex: FakeKVExecutor,
             prompt: list[int], max_tokens: int, rid: str) -> tuple[Request, int, int]:  # fmt: skip
    """Prefill ``prompt`` on P, move its KV to D; returns D's request, tokens D had cached, blocks moved."""
    p_req = req(rid, prompt, max_tokens=1)
    prefill(p_sched, p_ex, p_req)
    assert p_req.output_token_ids and rid in p_sched.kv.held
    d_req = Request(rid, prompt + p_req.output_token_ids, SamplingParams(max_tokens=max_tokens - 1, ignore_eos=True))
    got = d_sched.reserve_import(d_req, len(prompt))
    assert got is not None
    cached, fresh = got
    copy_blocks(p_ex, p_sched.kv.export_blocks(rid, cached, len(prompt)), d_ex, fresh)
    assert p_sched.release_kv(rid)
    d_sched.add_request(d_req, 0.0)
    return d_req, cached, len(fresh)


def test_prefill_holds_its_blocks_until_released() -> None:
    sched = Scheduler(make_config())
    ex = FakeKVExecutor(64, BS)
    r = req("a", list(range(1, 11)), max_tokens=1)
    prefill(sched, ex, r)
    assert not sched.has_unfinished()
    held = sched.kv.held["a"]
    assert len(held) == 3 and sched.kv.pool.num_used == 3  # 10 prompt tokens: 3 blocks, still owned
    assert sched.kv.export_blocks("a", 4, 10) == held[1:]
    assert sched.release_kv("a") and not sched.release_kv("a")
    assert sched.kv.pool.num_used == 0
    sched.kv.check_invariants()


def test_decode_side_computes_no_prompt_token_and_matches_one_scheduler() -> None:
    p_sched, d_sched = Scheduler(make_config()), Scheduler(make_config(max_decode_steps=4))
    p_ex, d_ex = FakeKVExecutor(64, BS), FakeKVExecutor(64, BS)
    prompts = {"a": list(range(1, 12)), "b": list(range(20, 29)), "c": list(range(40, 56))}
    reqs = {}
    for rid, prompt in prompts.items():
        reqs[rid], cached, moved = transfer(p_sched, p_ex, d_sched, d_ex, prompt, 9, rid)
        assert cached == 0 and moved == -(-len(prompt) // BS)
    first = d_sched.schedule(0.0)
    # Every request enters with its prompt's KV in place: one token each, sampling.
    assert {(s.request_id, s.start_pos, s.num_new_tokens, s.samples) for s in first.seqs} == {
        (rid, len(p), 1, True) for rid, p in prompts.items()
    }
    d_sched.update(first, d_ex.execute(first))
    run_all(d_sched, d_ex)
    for rid, prompt in prompts.items():
        r = reqs[rid]
        assert r.prompt_token_ids[len(prompt):] + r.output_token_ids == reference_output(prompt, 9)
    assert p_sched.kv.pool.num_used == 0 and d_sched.kv.pool.num_used == 0


def test_blocks_the_decode_cache_holds_are_not_moved() -> None:
    p_sched, d_sched = Scheduler(make_config()), Scheduler(make_config())
    p_ex, d_ex = FakeKVExecutor(64, BS), FakeKVExecutor(64, BS)
    shared = list(range(1, 13))  # three full blocks
    first, _, moved = transfer(p_sched, p_ex, d_sched, d_ex, shared + [50, 51], 4, "a")
    assert moved == 4
    run_all(d_sched, d_ex)
    second, cached, moved = transfer(p_sched, p_ex, d_sched, d_ex, shared + [60, 61, 62], 4, "b")
    assert cached == 12 and moved == 1  # only the last, partial block travels
    run_all(d_sched, d_ex)
    assert second.prompt_token_ids[15:] + second.output_token_ids == reference_output(shared + [60, 61, 62], 4)


def test_a_reservation_is_given_back_on_abort_and_cancel() -> None:
    sched = Scheduler(make_config(num_blocks=8))
    r = Request("a", list(range(1, 14)), SamplingParams(max_tokens=2, ignore_eos=True))
    assert sched.reserve_import(r, 13) is not None
    assert sched.kv.pool.num_used == 4
    sched.add_request(r, 0.0)
    sched.abort_request("a")
    assert sched.kv.pool.num_used == 0 and not sched.kv.imports
    r2 = Request("b", list(range(1, 14)), SamplingParams(max_tokens=2, ignore_eos=True))
    assert sched.reserve_import(r2, 13) is not None
    assert sched.cancel_import("b") and sched.kv.pool.num_used == 0
    sched.kv.check_invariants()


def test_no_room_to_reserve_changes_nothing() -> None:
    sched = Scheduler(make_config(num_blocks=3))
    before = sched.kv.pool.free_ids()
    assert sched.reserve_import(Request("a", list(range(1, 17)), SamplingParams(max_tokens=2)), 16) is None
    assert sched.kv.pool.free_ids() == before and not sched.kv.imports
