"""Draft-model proposals: a small model (or the target's own weights in int8) guesses the next tokens.

The draft model has its own paged KV cache, indexed by the target's block
tables: its cache has the target's number of blocks and block size, and a
request's draft KV for position ``p`` lives in the block the target uses for
``p``. So the draft needs no allocator of its own, the scheduler's slot
reservation covers it (``ScheduledSeq.num_propose``), and the prefix cache
shares the draft's KV along with the target's.

Proposing for a request that now has ``L`` tokens: feed the tokens whose
draft KV is not there yet (everything from the request's ``draft_pos``, at
least the last token) in one forward pass, take the first draft from the
last row, then feed each draft to get the next. Afterwards ``draft_pos`` is
``L``, plus the drafts that the target then accepts (their KV was written
while proposing): on the next proposal the common prefix of the drafts and
the request's new tokens says how many. Positions past it are rewritten
before they are read. A request admitted with a prefix-cache hit trusts the
draft KV of the cached blocks (whoever computed those blocks proposed past
them); if it is stale, drafts are worse, never the output: verification
decides every token.

Greedy requests get the draft's argmax (verified by comparison); sampling
requests get tokens drawn from the draft's distribution ``q`` (the sampler's
processing of the draft's logits), kept for rejection sampling
(``spec/verify.py``), with uniforms from the request's seeded stream.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from tokenmill.model.attention import kv_cache_shape
from tokenmill.model.config import ModelConfig
from tokenmill.model.decoder import DecoderModel
from tokenmill.model.loader import load_model, load_state_dict, read_model_config
from tokenmill.model.sampler import Sampler, SamplingRow, _inverse_cdf
from tokenmill.spec.verify import DRAFT_STREAM, sampling_probs


@dataclass(slots=True)
class _Proposal:
    length: int  # the request's tokens when the drafts were proposed
    drafts: list[int]
    probs: torch.Tensor | None  # [len(drafts), vocab] for sampled drafts


def load_draft(
    path: str | Path, dtype: str | torch.dtype, device: torch.device, quantization: str | None = None
) -> tuple[DecoderModel, ModelConfig]:
    """The draft model and its config; with ``quantization``, weights quantized and
    activations in ``dtype``."""
    if quantization is None:
        return load_model(path, dtype=dtype, device=device)
    config = replace(read_model_config(path, dtype), quantization=quantization)
    if config.moe is not None:
        # experts load through load_model's expert sources, which quantize with the activations' dtype
        raise ValueError(f"a {quantization} self-draft of a mixture-of-experts model ({config.architecture}) "
                         "is not supported; use --speculative ngram or draft:PATH")  # fmt: skip
    # weights are rounded from fp32 (as load_model does for a quantized dtype)
    model = DecoderModel.from_state_dict(config, load_state_dict(path, torch.float32), device=device)
    return model, config


def weight_bytes(model: Any) -> int:
    """Bytes of the weights a decode step reads: linear layers (as stored) and norms."""
    total = 0
    for layer in model.layers:
        for lin in (layer.qkv, layer.o, layer.gate_up, layer.down):
            if lin is None:
                continue  # a mixture-of-experts layer: experts are priced by the measured cost
            w = lin.packed if lin.packed is not None else lin.weight
            total += w.numel() * w.element_size()
    head = model.lm_head.packed if model.lm_head.packed is not None else model.lm_head.weight
    return total + head.numel() * head.element_size()


class DraftModelProposer:
    """Proposes drafts with a model on the target's block tables; see the module docstring."""

    writes_kv = True

    def __init__(
        self,
        path: str | Path,
        *,
        target: Any,
        dtype: str | torch.dtype = "auto",
        name: str = "draft",
        quantization: str | None = None,
    ) -> None:
        """``target``: the ``ModelExecutor`` whose blocks, device and vocabulary the draft shares.
        ``quantization`` ("int8") quantizes the draft's linear layers and keeps ``dtype`` for
        its activations and KV (rather than the quantized dtype's default, bfloat16)."""
        self.name = name
        self.model, self.config = load_draft(path, dtype, target.device, quantization)
        tcfg = target.model_config
        if self.config.vocab_size != tcfg.vocab_size:
            raise ValueError(
                f"the draft model at {path} has a vocabulary of {self.config.vocab_size} tokens but the "
                f"target's has {tcfg.vocab_size}: a draft must share the target's tokenizer"
            )
        self.device = target.device
        self.block_size = target.block_size
        self.max_model_len = self.config.max_model_len
        self.sampler = Sampler(self.device)
        self.draft_cost = weight_bytes(self.model) / max(1, weight_bytes(target.model))
        self.num_blocks = 0
        self.kv_caches: list[torch.Tensor] = []
        self._pos: dict[str, int] = {}  # request id -> positions whose draft KV is valid
        self._last: dict[str, _Proposal] = {}

    def kv_bytes_per_block(self, block_size: int) -> int:
        cfg = self.config
        item = torch.empty((), dtype=cfg.dtype).element_size()
        return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * item

    def allocate_cache(self, num_blocks: int) -> None:
        """The draft's KV cache: as many blocks as the target's, same block size."""
        cfg = self.config
        shape = kv_cache_shape(num_blocks, self.block_size, cfg.num_kv_heads, cfg.head_dim)
        self.num_blocks = num_blocks
        self.kv_cache = torch.zeros((cfg.num_layers, *shape), dtype=cfg.dtype, device=self.device)
        self.kv_caches = list(self.kv_cache.unbind(0))

    # -- per-request state --------------------------------------------------------------

    def reset(self, request_id: str, start_pos: int) -> None:
        """A request (re-)admitted with its first ``start_pos`` tokens' KV cached."""
        self._pos[request_id] = start_pos
        self._last.pop(request_id, None)

    def drop(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._pos.pop(rid, None)
            self._last.pop(rid, None)

    def draft_probs(self, request_id: str, drafts: list[int]) -> torch.Tensor | None:
        """``q`` of the first ``len(drafts)`` proposed drafts, if they were sampled from it."""
        last = self._last.get(request_id)
        if last is None or last.probs is None or last.drafts[: len(drafts)] != drafts:
            return None
        return last.probs[: len(drafts)]

    def _valid_pos(self, request_id: str, tokens: list[int]) -> int:
        pos = self._pos.get(request_id, 0)
        last = self._last.get(request_id)
        if last is not None:
            got = tokens[last.length : last.length + len(last.drafts)]
            same = 0
            for a, b in zip(got, last.drafts, strict=False):
                if a != b:
                    break
                same += 1
            # drafts 1..p-1 were fed while proposing; those the text kept have valid KV
            pos = last.length + min(same, len(last.drafts) - 1)
        return min(pos, len(tokens) - 1)

    # -- proposing ----------------------------------------------------------------------

    @torch.inference_mode()
    def propose(self, items: list[Any]) -> dict[str, list[int]]:
        """Drafts for each ``ProposeItem`` (request id, tokens, how many, block table, setup)."""
        from tokenmill.executor.model_executor import _Batch, forward_batch

        live = []
        for it in items:
            length = len(it.token_ids)
            num = min(it.num, self.max_model_len - length)  # the draft's own context
            if num > 0:
                live.append((it, num, self._valid_pos(it.request_id, it.token_ids)))
        drafts: dict[str, list[int]] = {it.request_id: [] for it, _, _ in live}
        probs: dict[str, list[torch.Tensor]] = {}
        step = 0
        while live:
            b = _Batch()
            for it, _, pos in live:
                length = len(it.token_ids)
                if step == 0:
                    feed = it.token_ids[pos:length]
                    first = pos
                else:
                    feed = [drafts[it.request_id][-1]]
                    first = length + step - 1
                b.input_ids.extend(feed)
                b.positions.extend(range(first, first + len(feed)))
                b.query_start.append(b.query_start[-1] + len(feed))
                end = first + len(feed)
                b.seq_lens.append(end)
                nb = -(-end // self.block_size)
                if len(it.blocks) < nb:
                    raise ValueError(f"request {it.request_id!r}: the draft needs {nb} blocks, the plan gave {len(it.blocks)}")
                b.block_rows.append(it.blocks[:nb])
                b.sample_rows.append(b.query_start[-1] - 1)
            hidden = forward_batch(self.model, self.kv_caches, b, self.block_size, self.device)
            logits = self.model.compute_logits(hidden.index_select(0, torch.tensor(b.sample_rows, device=self.device)))
            self._draw(live, logits, drafts, probs)
            step += 1
            live = [t for t in live if len(drafts[t[0].request_id]) < t[1]]
        for it in items:
            rid = it.request_id
            got = drafts.get(rid)
            if not got:
                continue
            self._pos[rid] = len(it.token_ids)
            p = torch.stack(probs[rid]) if rid in probs else None
            self._last[rid] = _Proposal(len(it.token_ids), got, p)
        return {rid: d for rid, d in drafts.items() if d}

    def _draw(self, live: list, logits: torch.Tensor, drafts: dict[str, list[int]], probs: dict) -> None:
        greedy = [i for i, (it, _, _) in enumerate(live) if it.setup.sampling_params.greedy]
        if greedy:
            picked = logits[greedy].argmax(dim=-1).tolist()
            for i, tok in zip(greedy, picked, strict=True):
                drafts[live[i][0].request_id].append(tok)
        sampled = [i for i, (it, _, _) in enumerate(live) if not it.setup.sampling_params.greedy]
        if not sampled:
            return
        rows = []
        for i in sampled:
            it = live[i][0]
            setup = it.setup
            outputs = it.token_ids[len(setup.prompt_token_ids) :] + drafts[it.request_id]
            rows.append(SamplingRow(setup.sampling_params, outputs, setup.prompt_token_ids,
                                    setup.eos_token_ids, setup.sample_index))  # fmt: skip
        q = sampling_probs(logits[sampled], rows)
        u = self.sampler.uniforms(rows, q.device, DRAFT_STREAM)
        picked = _inverse_cdf(q, u).tolist()
        for j, (i, tok) in enumerate(zip(sampled, picked, strict=True)):
            rid = live[i][0].request_id
            drafts[rid].append(tok)
            probs.setdefault(rid, []).append(q[j])
