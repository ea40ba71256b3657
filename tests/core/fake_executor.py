"""A fake executor that checks the KV bookkeeping as a real one would rely on it.

Its "KV cache" stores (position, token) per slot. Each step writes the new
tokens into the slots the block table names and, for each sampling sequence,
reads the whole context back through the block table: if a block was shared,
evicted or reused wrongly, the read-back differs from the request's tokens and
the executor raises. The sampled token is a pure function of the token
history, so outputs must not depend on batching, chunking, preemption or
prefix caching.
"""

from __future__ import annotations

import zlib

from tokenmill.core.executor_state import ExecutorState
from tokenmill.core.plan import StepPlan, StepResult

VOCAB = 97


def next_token(history: list[int]) -> int:
    return zlib.crc32(repr(history[-8:]).encode() + bytes([len(history) % 251])) % VOCAB


class FakeKVExecutor:
    # The model facts an engine asks its executor for.
    max_model_len = 1 << 20
    vocab_size = VOCAB
    eos_token_ids: tuple[int, ...] = ()

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.slots: list[tuple[int, int] | None] = [None] * (num_blocks * block_size)
        self.steps = 0
        self.state = ExecutorState()  # what it knows of requests comes from plans alone

    def _write(self, block_ids: list[int], pos: int, token: int) -> None:
        bs = self.block_size
        self.slots[block_ids[pos // bs] * bs + pos % bs] = (pos, token)

    def _read(self, block_ids: list[int], n: int) -> list[int]:
        bs = self.block_size
        out = []
        for pos in range(n):
            entry = self.slots[block_ids[pos // bs] * bs + pos % bs]
            if entry is None or entry[0] != pos:
                raise AssertionError(f"slot for position {pos} holds {entry}")
            out.append(entry[1])
        return out

    def _check_context(self, request_id: str, ctx: list[int], tokens: list[int]) -> None:
        """What the KV holds of a sequence against its tokens so far."""
        if ctx != tokens:
            raise AssertionError(f"{request_id}: KV read back differs from the tokens")

    def execute(self, plan: StepPlan, on_substep: object = None) -> StepResult:
        self.steps += plan.num_steps
        sampled: dict[str, list[int]] = {}
        for s, view in zip(plan.seqs, self.state.apply(plan), strict=True):
            history = view.token_ids()
            if history[s.start_pos : s.start_pos + s.num_new_tokens] != s.token_ids:
                raise AssertionError(f"{s.request_id}: the plan's tokens differ from the request's")
            for i, t in enumerate(s.token_ids):
                self._write(view.blocks, s.start_pos + i, t)
            if not s.samples:
                continue
            end = s.start_pos + s.num_new_tokens
            out: list[int] = []
            for step in range(plan.num_steps):
                if step > 0:
                    self._write(view.blocks, end, out[-1])
                    end += 1
                self._check_context(s.request_id, self._read(view.blocks, end), (history + out)[:end])
                out.append(next_token(history + out))
            sampled[s.request_id] = out
        self.state.record(sampled)
        return StepResult(sampled, duration=0.001 * plan.num_steps)


def reference_output(prompt: list[int], max_tokens: int) -> list[int]:
    hist = list(prompt)
    for _ in range(max_tokens):
        hist.append(next_token(hist))
    return hist[len(prompt) :]
