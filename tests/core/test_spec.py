"""Speculative decoding in the core: draft lengths, budgets, slot reservations, acceptance, stops.

A fake executor that speculates checks the scheduler's side: its target is
the fake executor's deterministic ``next_token``, its proposer guesses the
true continuation with a wrong token every so often (a pure function of the
history), and it writes the drafts' KV (and a draft model's, at proposal) into
the slots the table names, so a missing reservation or a trimmed block still
in use shows up as a read-back error.
"""

from __future__ import annotations

import zlib

import pytest

from tests.core.fake_executor import FakeKVExecutor, next_token, reference_output
from tests.core.test_scheduler import make_config, random_workload, req, run_all
from tokenmill.core import SamplingParams, StepResult
from tokenmill.core.plan import StepPlan
from tokenmill.core.request import FinishReason, Request
from tokenmill.core.scheduler import Scheduler
from tokenmill.core.spec import SpecConfig, SpecController


def guess(history: list[int], miss_every: int) -> int:
    """The proposer's guess: the true next token, except for a deterministic share of misses."""
    t = next_token(history)
    if miss_every and zlib.crc32(repr(history[-5:]).encode()) % miss_every == 0:
        return (t + 1) % 97
    return t


class SpecFakeExecutor(FakeKVExecutor):
    def __init__(self, num_blocks: int, block_size: int, miss_every: int = 4) -> None:
        super().__init__(num_blocks, block_size)
        self.miss_every = miss_every
        self.verified = 0

    def execute(self, plan: StepPlan, on_substep: object = None) -> StepResult:
        if not any(s.draft_token_ids or s.num_propose for s in plan.seqs):
            return super().execute(plan)
        assert plan.num_steps == 1, "a speculative step is a single step"
        sampled: dict[str, list[int]] = {}
        views = self.state.apply(plan)
        for s, view in zip(plan.seqs, views, strict=True):
            history = view.token_ids()
            assert history[s.start_pos : s.start_pos + s.num_new_tokens] == s.token_ids
            fed = s.token_ids + s.draft_token_ids
            for i, t in enumerate(fed):
                self._write(view.blocks, s.start_pos + i, t)
            if not s.samples:
                continue
            assert s.start_pos + s.num_new_tokens == len(history), "drafts follow the last token"
            out: list[int] = []
            for d in [*s.draft_token_ids, None]:
                tok = next_token(history + out)
                out.append(tok)
                if tok != d:
                    break
            if s.draft_token_ids:
                self.verified += 1
                end = s.start_pos + len(fed)
                assert self._read(view.blocks, end)[: len(history)] == history
            sampled[s.request_id] = out
        self.state.record(sampled)
        drafts: dict[str, list[int]] = {}
        for s, view in zip(plan.seqs, views, strict=True):
            if not s.num_propose:
                continue
            hist = view.token_ids()
            # a draft model writes KV up to position len + p - 2: the table must cover it
            need = -(-(len(hist) + s.num_propose - 1) // self.block_size)
            assert len(view.blocks) >= need, f"{s.request_id}: no slots reserved for the proposal"
            d: list[int] = []
            for _ in range(s.num_propose):
                d.append(guess(hist + d, self.miss_every))
            drafts[s.request_id] = d
        return StepResult(sampled, duration=0.001, draft_token_ids=drafts)


def spec_config(**kw):
    base = dict(num_speculative_tokens=4, speculative_adaptive=False)
    base.update(kw)
    return make_config(**base)


# -- the controller --------------------------------------------------------------------------


def test_fixed_draft_length_is_the_same_for_every_request() -> None:
    c = SpecController(SpecConfig(num_speculative_tokens=3, adaptive=False))
    assert c.plan(["a", "b"]) == [3, 3]
    assert SpecController(SpecConfig()).plan(["a"]) == [0]  # off


def test_adaptive_length_grows_with_acceptance_and_pays_for_the_draft() -> None:
    cfg = SpecConfig(num_speculative_tokens=8, draft_cost=0.25, knee_tokens=16)
    good, bad = SpecController(cfg), SpecController(cfg)
    for _ in range(20):
        good.observe("r", 8, 8)
        bad.observe("r", 8, 0)
    assert good.acceptance("r") > 0.9 and bad.acceptance("r") < 0.1
    k_good, k_bad = good.plan(["r"])[0], bad.plan(["r"])[0]
    assert k_good >= 4
    assert k_bad == 0  # a draft that is never accepted costs more than it wins
    # A draft that costs nothing (prompt lookup) is worth trying at a lower rate.
    free = SpecController(SpecConfig(num_speculative_tokens=8, draft_cost=0.0, knee_tokens=16))
    for _ in range(20):
        free.observe("r", 4, 1)
    assert free.plan(["r"])[0] >= 1


def test_adaptive_length_backs_off_when_the_batch_is_compute_bound() -> None:
    cfg = SpecConfig(num_speculative_tokens=8, draft_cost=0.1, knee_tokens=16, initial_acceptance=0.9)
    c = SpecController(cfg)
    assert c.plan(["a"])[0] >= 3
    small = c.plan([f"r{i}" for i in range(4)])
    assert 0 < sum(small) + 4 <= 16 + 4  # drafts fill the batch up to about the knee
    assert c.plan([f"r{i}" for i in range(32)]) == [0] * 32


def test_acceptance_counts_stats() -> None:
    c = SpecController(SpecConfig(num_speculative_tokens=4))
    c.observe("a", 4, 2)
    c.observe("a", 2, 2)
    s = c.stats
    assert (s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens) == (2, 6, 4)
    assert s.acceptance_rate == pytest.approx(4 / 6) and s.mean_accepted_length == pytest.approx(3.0)


def test_bad_spec_config_is_refused() -> None:
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpecConfig(num_speculative_tokens=-1)
    with pytest.raises(ValueError, match="knee_tokens"):
        SpecConfig(knee_tokens=0)


# -- the scheduler ---------------------------------------------------------------------------


def test_a_decode_verifies_its_drafts_and_update_trims_rejected_slots() -> None:
    s = Scheduler(spec_config(num_blocks=32, block_size=4))
    s.add_request(req("a", [1, 2, 3], max_tokens=20))
    plan = s.schedule(0.0)
    (seq,) = plan.seqs
    assert seq.num_propose == 4 and not seq.draft_token_ids
    # 3 prompt tokens + 4 reserved for the draft model's proposal
    assert len(s.kv.tables["a"]) == 2
    s.update(plan, StepResult({"a": [7]}, draft_token_ids={"a": [8, 9, 10, 11]}))
    r = s.requests["a"]
    assert r.draft_token_ids == [8, 9, 10, 11]
    plan = s.schedule(1.0)
    (seq,) = plan.seqs
    assert (seq.num_new_tokens, seq.draft_token_ids, seq.num_scheduled_tokens) == (1, [8, 9, 10, 11], 5)
    assert plan.num_batched_tokens == 5 and plan.num_steps == 1
    held = len(s.kv.tables["a"])
    assert held * 4 >= 3 + 5 + 4  # verify tokens and the next proposal
    # two drafts accepted, then the target's own token; no new proposal came back
    s.update(plan, StepResult({"a": [8, 9, 5]}))
    assert r.output_token_ids == [7, 8, 9, 5] and r.num_computed_tokens == 6
    assert r.draft_token_ids == []
    assert len(s.kv.tables["a"]) == 2  # trimmed back to the 7 tokens it has
    assert s.spec.stats.num_accepted_tokens == 2 and s.spec.stats.num_draft_tokens == 4


def test_stop_rules_apply_to_accepted_tokens_only() -> None:
    s = Scheduler(spec_config())
    s.add_request(Request("a", [1, 2], SamplingParams(max_tokens=10, stop_token_ids=[9]), eos_token_ids=(0,)))
    plan = s.schedule(0.0)
    s.update(plan, StepResult({"a": [5]}, draft_token_ids={"a": [6, 9, 7, 8]}))
    plan = s.schedule(1.0)
    (u,) = s.update(plan, StepResult({"a": [6, 9, 7]}))
    assert u.finished and u.finish_reason is FinishReason.STOP and u.stop_reason == 9
    assert u.new_token_ids == [6, 9]
    assert s.kv.pool.num_used == 0


def test_drafts_never_run_past_max_tokens_or_the_context() -> None:
    s = Scheduler(spec_config(max_model_len=40))
    s.add_request(req("a", [1, 2, 3], max_tokens=4))
    plan = s.schedule(0.0)
    assert plan.seqs[0].num_propose == 2  # after this token, 3 remain: 2 drafts and the target's own
    s.update(plan, StepResult({"a": [4]}, draft_token_ids={"a": [5, 6]}))
    plan = s.schedule(1.0)
    # if only the target's token comes of it, two remain: one draft for the step after
    assert plan.seqs[0].draft_token_ids == [5, 6] and plan.seqs[0].num_propose == 1
    s2 = Scheduler(spec_config(max_model_len=8))
    s2.add_request(req("b", [1, 2, 3, 4, 5], max_tokens=None))
    plan = s2.schedule(0.0)
    assert plan.seqs[0].num_propose == 1  # positions up to 7 only: one draft, then the target's token


def test_drafts_give_way_before_anyone_is_preempted() -> None:
    s = Scheduler(spec_config(num_blocks=3, block_size=4, max_model_len=12))
    s.add_request(req("a", [1, 2, 3], max_tokens=8))
    s.add_request(req("b", [4, 5, 6], max_tokens=8))
    plan = s.schedule(0.0)
    # a's proposal gets the one spare block; b's finds none and is not asked for one
    assert [q.num_propose for q in plan.seqs] == [4, 0]
    s.update(plan, StepResult({"a": [7], "b": [8]}, draft_token_ids={"a": [1, 2, 3, 4]}))
    s.requests["b"].draft_token_ids = [1, 2, 3, 4]  # as if b had proposed too
    plan = s.schedule(1.0)
    assert not plan.preempted_ids
    assert [q.draft_token_ids for q in plan.seqs] == [[1, 2, 3, 4], []]  # b's drafts found no blocks


@pytest.mark.parametrize("miss_every", [0, 3])
@pytest.mark.parametrize("adaptive", [False, True])
def test_outputs_equal_plain_decoding_whatever_the_drafts(miss_every: int, adaptive: bool) -> None:
    reqs = random_workload(seed=5, n=10)
    s = Scheduler(spec_config(speculative_adaptive=adaptive, num_blocks=64))
    for r in reqs:
        s.add_request(r)
    ex = SpecFakeExecutor(64, 4, miss_every)
    out, plans = run_all(s, ex)
    for r in reqs:
        assert out[r.request_id] == reference_output(r.prompt_token_ids, r.sampling_params.max_tokens)
    assert ex.verified > 0
    assert any(len(q.draft_token_ids) > 1 for p in plans for q in p.seqs)
    if miss_every == 0:
        assert s.spec.stats.acceptance_rate == 1.0


def test_speculation_survives_preemption_chunking_and_prefix_caching() -> None:
    reqs = random_workload(seed=11, n=14)
    s = Scheduler(spec_config(num_blocks=14, max_num_batched_tokens=9, max_num_seqs=6))
    for r in reqs:
        s.add_request(r)
    ex = SpecFakeExecutor(14, 4, miss_every=3)
    out, _ = run_all(s, ex)
    assert s.num_preemptions > 0
    assert s.kv.prefix_hit_tokens > 0
    for r in reqs:
        assert out[r.request_id] == reference_output(r.prompt_token_ids, r.sampling_params.max_tokens)


def test_multi_step_plans_only_when_speculation_backs_off() -> None:
    s = Scheduler(spec_config(max_decode_steps=4))
    s.add_request(req("a", [1, 2, 3], max_tokens=30))
    out, plans = run_all(s, SpecFakeExecutor(64, 4))
    assert all(p.num_steps == 1 for p in plans)
    off = Scheduler(make_config(max_decode_steps=4))
    off.add_request(req("a", [1, 2, 3], max_tokens=30))
    out_off, plans_off = run_all(off)
    assert out == out_off and any(p.num_steps > 1 for p in plans_off)


def test_structured_output_requests_decode_without_drafts() -> None:
    from tokenmill.structured.params import StructuredOutputsParams

    s = Scheduler(spec_config(num_blocks=32, block_size=4))
    s.add_request(req("free", [1, 2, 3], max_tokens=20))
    shaped = req("json", [1, 2, 3], max_tokens=20)
    shaped.sampling_params.structured_outputs = StructuredOutputsParams(json_object=True)
    s.add_request(shaped)
    plan = s.schedule(0.0)
    asked = {q.request_id: q.num_propose for q in plan.seqs}
    assert asked["free"] > 0 and asked["json"] == 0
