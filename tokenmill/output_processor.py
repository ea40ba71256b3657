"""Turns the scheduler's per-sequence updates into user-facing ``RequestOutput``s.

It owns detokenization, stop strings (with hold-back, so a stream never shows
text that later turns out to be part of a stop string, and checked token by
token, so no token after the one that completes a stop string is handed
out), logprob formatting and the fan-in of ``n`` samples into one output per
user request. The engine feeds it the updates of each plan, and, when it
streams, the tokens of each sub-step of a multi-step plan as they are sampled
(``Engine.step``).

Prefill/decode disaggregation splits one request's output between two
engines, and the client must see what one engine would have shown it. The
prefill engine hands the request off after its first token
(``hand_off``: the output ends there with finish reason ``handoff``, the
text held back for stop strings still unsent); the decode engine takes it
with those tokens (``PriorTokens``) and replays them through the same
detokenizer and hold-back rules, so its state and what it sends next continue
exactly where the prefill engine's left off.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokenmill.core.plan import SeqUpdate
from tokenmill.core.request import FinishReason, Request, SamplingParams
from tokenmill.detokenizer import IncrementalDetokenizer
from tokenmill.outputs import (
    CompletionOutput,
    Logprob,
    RequestMetrics,
    RequestOutput,
    TokenLogprobs,
)


@dataclass
class PriorTokens:
    """Tokens a request generated on another engine before it continues on this one.

    ``logprobs`` are their entries as that engine's outputs carried them (when
    the request asked for logprobs), ``cumulative_logprob`` their sum.
    """

    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    cumulative_logprob: float | None = None


@dataclass
class SampleState:
    """One of a user request's ``n`` samples."""

    index: int
    detok: IncrementalDetokenizer | None  # None: no tokenizer, outputs carry token ids only
    params: SamplingParams
    text: str = ""
    emitted: int = 0  # characters of ``text`` already handed out
    token_ids: list[int] = field(default_factory=list)
    emitted_tokens: int = 0
    logprobs: list[TokenLogprobs] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class ParentState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[SampleState]
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # filled chunk by chunk

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.samples)


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.parents: dict[str, ParentState] = {}

    def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], children: list[Request],
            arrival: float, prior: PriorTokens | None = None) -> None:  # fmt: skip
        """Track a user request; ``prior``: the tokens it generated elsewhere (one sample), already sent."""
        samples = []
        for child in children:
            sp = child.sampling_params
            samples.append(
                SampleState(
                    index=child.sample_index,
                    detok=None if self.tokenizer is None
                    else IncrementalDetokenizer(self.tokenizer, prompt_token_ids, sp.skip_special_tokens),
                    params=sp,
                    logprobs=[] if sp.logprobs is not None else None,
                    cumulative_logprob=0.0 if sp.logprobs is not None else None,
                )
            )
        parent = ParentState(request_id, prompt, prompt_token_ids, samples, RequestMetrics(arrival))
        if any(child.sampling_params.prompt_logprobs is not None for child in children):
            parent.prompt_logprobs = [None]  # the first prompt token has no logprob
        if prior is not None and prior.token_ids:
            s = samples[0]
            # The same steps the engine that sampled them took, so the text, the
            # detokenizer and what was sent are where that engine left them.
            self._append_tokens(s, list(prior.token_ids), None, False)
            if s.logprobs is not None:
                s.logprobs = list(prior.logprobs or [])
                s.cumulative_logprob = prior.cumulative_logprob
            self._mark_sent(s)
        self.parents[request_id] = parent

    def remove(self, request_id: str) -> None:
        self.parents.pop(request_id, None)

    def process(
        self, updates: list[SeqUpdate], now: float
    ) -> tuple[list[RequestOutput], list[tuple[str, str, int]]]:
        """Apply updates. Returns the outputs and, for each sequence that hit a stop string,
        ``(child id, stop string, tokens of its update taken up to the one that completed it)``."""
        touched: dict[str, ParentState] = {}
        stopped: list[tuple[str, str, int]] = []
        for u in updates:
            req = u.request
            parent = self.parents.get(req.parent_id or req.request_id)
            if parent is None:
                continue
            if u.prompt_logprobs is not None:
                self._add_prompt_logprobs(parent, *u.prompt_logprobs)
                if not u.new_token_ids and not u.finished:
                    continue  # a prompt chunk: nothing to hand out before the first token
            sample = parent.samples[req.sample_index]
            if sample.finished:
                continue
            touched[parent.request_id] = parent
            m = parent.metrics
            if m.first_scheduled_time is None:
                m.first_scheduled_time = req.first_scheduled_time
                parent.num_cached_tokens = max(req.num_cached_tokens, 0)
            if u.new_token_ids:
                m.first_token_time = m.first_token_time or now
                m.last_token_time = now
            hit = self._append(sample, u)
            if hit is not None:
                stopped.append((req.request_id, *hit))
            elif u.finished:
                self._finish(sample, u.finish_reason, u.stop_reason)
        outputs = []
        for parent in touched.values():
            if parent.finished:
                parent.metrics.finished_time = now
                del self.parents[parent.request_id]
            outputs.append(self._snapshot(parent))
        return outputs, stopped

    def _append(self, s: SampleState, u: SeqUpdate) -> tuple[str, int] | None:
        """Append the update's tokens; return the stop string they complete, if any, with
        how many of them were taken (up to the one that completed it)."""
        tokens = u.new_token_ids
        if s.params.stop and len(tokens) > 1:
            # Several tokens at once (a multi-step plan): take them one at a time, so
            # that the tokens after the one that completes a stop string are dropped.
            lps = u.new_logprobs
            for i, t in enumerate(tokens):
                hit = self._append_tokens(
                    s, [t], lps[i : i + 1] if lps else None, u.finished and i == len(tokens) - 1
                )
                if hit is not None:
                    return hit, i + 1
            return None
        hit = self._append_tokens(s, tokens, u.new_logprobs, u.finished)
        return None if hit is None else (hit, len(tokens))

    def _append_tokens(
        self, s: SampleState, tokens: list[int], lps: list[tuple[float, list[tuple[int, float]]]] | None, last: bool
    ) -> str | None:
        """Append tokens (and their logprobs); return the stop string they complete, if any."""
        s.token_ids.extend(tokens)
        if s.logprobs is not None and lps:
            for tok, (lp, top) in zip(tokens, lps, strict=False):
                s.logprobs.append(self._format_logprobs(tok, lp, top))
                s.cumulative_logprob = (s.cumulative_logprob or 0.0) + lp
        if s.detok is None:
            return None
        delta = s.detok.add(tokens)
        if last:
            delta += s.detok.flush()
        if not delta:
            return None
        old_len = len(s.text)
        s.text += delta
        stops = s.params.stop
        if stops:
            # Only a stop string that ends inside the new text can be new.
            start = max(0, old_len - max(map(len, stops)) + 1)
            best: tuple[int, str] | None = None
            for stop in stops:  # type: ignore[union-attr]
                idx = s.text.find(stop, start)
                if idx != -1 and (best is None or idx < best[0]):
                    best = (idx, stop)
            if best is not None:
                idx, stop = best
                s.text = s.text[: idx + len(stop)] if s.params.include_stop_str_in_output else s.text[:idx]
                self._finish(s, FinishReason.STOP, stop)
                return stop
        return None

    def _add_prompt_logprobs(
        self, parent: ParentState, first: int, entries: list[tuple[float, list[tuple[int, float]]]]
    ) -> None:
        """Entries of prompt tokens ``first, first + 1, ...``; a recomputed chunk (after a
        preemption) repeats some, which are kept once."""
        got = parent.prompt_logprobs
        if got is None or first > len(got):
            return
        ids = parent.prompt_token_ids
        for j in range(len(got), first + len(entries)):
            lp, top = entries[j - first]
            got.append(self._format_logprobs(ids[j], lp, top))

    def _decode(self, token: int) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode([token])

    def _format_logprobs(self, token: int, lp: float, top: list[tuple[int, float]]) -> TokenLogprobs:
        out: TokenLogprobs = {}
        for rank, (tid, tlp) in enumerate(top, start=1):
            out[tid] = Logprob(tlp, rank, self._decode(tid))
        if token not in out:
            out[token] = Logprob(lp, None, self._decode(token))
        return out

    @staticmethod
    def _finish(s: SampleState, reason: FinishReason | None, stop_reason: int | str | None) -> None:
        s.finish_reason = str(reason) if reason is not None else "stop"
        s.stop_reason = stop_reason

    def hand_off(self, request_id: str, out: RequestOutput | None) -> RequestOutput | None:
        """End a request here because another engine continues it (prefill/decode).

        ``out`` is this step's output of the request, if it had one: it is
        marked finished with reason ``handoff``; else a new output says so.
        Returns None when the request is no longer tracked (it finished).
        """
        parent = self.parents.pop(request_id, None)
        if parent is None or parent.finished:
            return None
        if out is None:
            out = self._snapshot(parent)  # nothing new: text held back stays held back
        out.finished = True
        for o in out.outputs:
            o.finish_reason = "handoff"
        return out

    def finish_aborted(self, request_id: str) -> RequestOutput | None:
        parent = self.parents.pop(request_id, None)
        if parent is None:
            return None
        for s in parent.samples:
            if not s.finished:
                self._finish(s, FinishReason.ABORT, None)
        return self._snapshot(parent)

    def _snapshot(self, parent: ParentState) -> RequestOutput:
        outs = []
        for s in parent.samples:
            start, start_tokens = s.emitted, s.emitted_tokens
            upto = self._mark_sent(s)
            delta_text = s.text[start:upto]
            delta_ids = s.token_ids[start_tokens:]
            delta_lps = s.logprobs[start_tokens:] if s.logprobs is not None else None
            outs.append(
                CompletionOutput(
                    index=s.index,
                    text=s.text if s.finished else s.text[:upto],
                    token_ids=list(s.token_ids),
                    logprobs=list(s.logprobs) if s.logprobs is not None else None,
                    cumulative_logprob=s.cumulative_logprob,
                    finish_reason=s.finish_reason,
                    stop_reason=s.stop_reason,
                    delta_text=delta_text,
                    delta_token_ids=delta_ids,
                    delta_logprobs=delta_lps,
                )
            )
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=outs,
            finished=parent.finished,
            num_cached_tokens=parent.num_cached_tokens,
            metrics=parent.metrics,
            prompt_logprobs=self._complete_prompt_logprobs(parent),
        )

    @staticmethod
    def _mark_sent(s: SampleState) -> int:
        """Count the sample's tokens and text as sent, but for the tail that could still
        become a stop string (held back); returns where the sent text ends."""
        hold = 0 if s.finished or not s.params.stop else max(map(len, s.params.stop)) - 1  # type: ignore[arg-type]
        s.emitted = max(s.emitted, len(s.text) - hold)
        s.emitted_tokens = len(s.token_ids)
        return s.emitted

    @staticmethod
    def _complete_prompt_logprobs(parent: ParentState) -> list[TokenLogprobs | None] | None:
        """The prompt's logprobs once every prompt token has its entry (by the first token)."""
        got = parent.prompt_logprobs
        return got if got is not None and len(got) == len(parent.prompt_token_ids) else None
