"""The scheduler and KV manager end to end, against a paged fake model.

The fake executor keeps a KV store addressed by (block id, slot), writes each
scheduled token's "KV" (the token itself) through the plan's block table, and
samples the next token as a hash of the context it reads back through that
table. So if the scheduler hands a request a cached block that holds someone
else's tokens, or a slot that was never written, the output changes or the
executor fails. Greedy outputs must equal a plain sequential reference
whatever the schedule: prefix caching on or off, chunked prefill, preemption
by recompute, multi-step decode plans, and every registered policy.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenmill.core.executor_state import ExecutorState
from tokenmill.core.plan import StepPlan, StepResult
from tokenmill.core.policies import available_policies
from tokenmill.core.request import Request, SamplingParams
from tokenmill.core.scheduler import Scheduler, SchedulerConfig

VOCAB = 13
EOS = 0
MAX_MODEL_LEN = 64


def next_token(ctx: list[int]) -> int:
    """The fake model: an order-sensitive hash of the whole context."""
    h = len(ctx)
    for t in ctx:
        h = (h * 31 + t + 7) % 1_000_003
    return h % VOCAB


def reference(prompt: list[int], max_tokens: int) -> list[int]:
    ctx, out = list(prompt), []
    while True:
        t = next_token(ctx)
        ctx.append(t)
        out.append(t)
        if t == EOS or len(out) >= max_tokens or len(ctx) >= MAX_MODEL_LEN:
            return out


class PagedFakeExecutor:
    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.bs = sched.config.block_size
        self.kv: dict[tuple[int, int], int] = {}
        self.state = ExecutorState()

    def _write(self, table: list[int], pos: int, tok: int) -> None:
        b = table[pos // self.bs]
        pool = self.sched.kv.pool
        # Shared KV is immutable: only a sole, uncached owner may write.
        assert pool.ref_counts[b] == 1 and not pool.cached[b], f"write into shared block {b}"
        self.kv[(b, pos % self.bs)] = tok

    def _read(self, table: list[int], n: int) -> list[int]:
        return [self.kv[(table[p // self.bs], p % self.bs)] for p in range(n)]

    def execute(self, plan: StepPlan) -> StepResult:
        out: dict[str, list[int]] = {}
        for s, view in zip(plan.seqs, self.state.apply(plan), strict=True):
            pos = s.start_pos
            for i, p in enumerate(range(pos, pos + s.num_new_tokens)):
                self._write(view.blocks, p, s.token_ids[i])
            pos += s.num_new_tokens
            if not s.samples:
                continue
            sampled = []
            for k in range(plan.num_steps):
                if k > 0:  # each later sub-step feeds the token sampled just before
                    self._write(view.blocks, pos, sampled[-1])
                    pos += 1
                sampled.append(next_token(self._read(view.blocks, pos)))
            out[s.request_id] = sampled
        self.state.record(out)
        return StepResult(sampled_token_ids=out, duration=1.0)


def run(config: SchedulerConfig, reqs: list[tuple[list[int], int, int, dict]]) -> tuple[dict[str, list[int]], Scheduler]:
    """Drive a scheduler to completion; ``reqs`` are (prompt, max_tokens, arrival step, extra fields)."""
    sched = Scheduler(config)
    ex = PagedFakeExecutor(sched)
    pending = sorted(enumerate(reqs), key=lambda x: x[1][2])
    done: dict[str, list[int]] = {}
    now, step = 0.0, 0
    while pending or sched.has_unfinished():
        while pending and pending[0][1][2] <= step:
            i, (prompt, mt, _, extra) = pending.pop(0)
            req = Request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=mt), arrival_time=now,
                          eos_token_ids=(EOS,), **extra)
            sched.add_request(req, now)
        plan = sched.schedule(now)
        step += 1
        if plan.is_empty:
            now += 1.0
            continue
        for u in sched.update(plan, ex.execute(plan)):
            if u.finished:
                done[u.request_id] = list(u.request.output_token_ids)
        now += 1.0
        assert step < 5000, "the scheduler made no progress"
    assert sched.kv.pool.num_used == 0 and not sched.kv.tables
    return done, sched


# Non-default options that change a policy's control flow.
POLICY_VARIANTS = [
    ("lpm", {"max_sort_len": 2}),
    ("dlpm", {"quantum": 4.0}),
    ("vtc", {"input_weight": 0.0}),
    ("slo", {"prefill_tokens_per_s": 4.0, "ttft_slo_by_priority": {"0": 3.0}}),
    ("slo", {"relegate": False}),
    ("bins", {"bin_edges": [4], "static": True}),
    ("bins", {"bin_edges": [4, 10], "batch_size": 2}),
]

prefixes = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8]]


@st.composite
def workloads(draw: st.DrawFn) -> list[tuple[list[int], int, int, dict]]:
    n = draw(st.integers(1, 12))
    reqs = []
    for _ in range(n):
        pre = draw(st.sampled_from(prefixes + [[]]))
        tail = draw(st.lists(st.integers(1, VOCAB - 1), min_size=1 if not pre else 0, max_size=10))
        prompt = (pre + tail)[: MAX_MODEL_LEN - 30]
        extra = {
            "client_id": draw(st.sampled_from(["a", "b", "c"])),
            "priority": draw(st.integers(0, 2)),
            "ttft_slo": draw(st.sampled_from([None, 2.0, 20.0])),
            "tpot_slo": draw(st.sampled_from([None, 1.0, 5.0])),
            "predicted_output_len": draw(st.sampled_from([None, 2, 20])),
        }
        reqs.append((prompt, draw(st.integers(1, 20)), draw(st.integers(0, 6)), extra))
    return reqs


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    reqs=workloads(),
    block_size=st.sampled_from([2, 4]),
    spare_blocks=st.integers(0, 6),
    budget=st.sampled_from([3, 8, 64]),
    max_seqs=st.integers(1, 6),
    decode_steps=st.sampled_from([1, 4]),
    caching=st.booleans(),
    policy=st.sampled_from([(name, {}) for name in available_policies()] + POLICY_VARIANTS),
)
def test_greedy_outputs_do_not_depend_on_the_schedule(
    reqs, block_size, spare_blocks, budget, max_seqs, decode_steps, caching, policy
) -> None:
    longest = max(len(p) + mt for p, mt, _, _ in reqs)
    num_blocks = -(-min(longest, MAX_MODEL_LEN) // block_size) + spare_blocks  # tight pools force preemption
    cfg = SchedulerConfig(
        num_blocks=num_blocks,
        block_size=block_size,
        max_num_seqs=max_seqs,
        max_num_batched_tokens=budget,
        max_model_len=MAX_MODEL_LEN,
        enable_prefix_caching=caching,
        max_decode_steps=decode_steps,
        policy=policy[0],
        policy_options=policy[1],
        debug_checks=True,
    )
    done, _ = run(cfg, reqs)
    assert len(done) == len(reqs)
    for i, (prompt, mt, _, _) in enumerate(reqs):
        assert done[f"r{i}"] == reference(prompt, mt), f"request r{i} differs under {policy}"


def test_shared_prefix_is_served_from_the_cache() -> None:
    """Eight requests behind one long prefix: the later ones hit the cache for all full blocks of it."""
    pre = list(range(1, 13)) * 2  # 24 tokens = 6 blocks of 4
    reqs = [(pre + [i + 1], 3, 1 if i else 0, {}) for i in range(8)]
    cfg = SchedulerConfig(num_blocks=64, block_size=4, max_model_len=MAX_MODEL_LEN, debug_checks=True)
    done, sched = run(cfg, reqs)
    st_ = sched.stats()
    assert st_.prefix_query_tokens == 8 * 25
    assert st_.prefix_hit_tokens == 7 * 24
    for i, (prompt, mt, _, _) in enumerate(reqs):
        assert done[f"r{i}"] == reference(prompt, mt)
