"""Prefill-to-decode handoff (DistServe, Splitwise), moving only the KV the decode replica lacks (Mooncake).

The same steps as the twin's (``sim/simulator.py``: ``_start_transfer``,
``_on_transfer``), on real replicas:

1. the prefill replica ran the prompt and the first token (``handoff=True``)
   and holds the request's KV blocks; its first token has already been
   relayed to the client (``ClusterEngine._on_handoff``);
2. the decode pool's core router picks a decode replica for the request as
   the twin sees it (prompt and first token as its prompt, one token fewer
   to generate);
3. the decode replica reserves blocks for the prompt's KV
   (``Engine.reserve_import``): the full blocks its prefix cache holds are
   taken from there and do not move;
4. the prefill replica exports the other blocks into Ray's object store
   (``Replica.export_kv``) and the decode replica reads them from there into
   the reserved blocks, then adds the request after its first token (one Ray
   call: ``Replica.add`` with ``kv``); it computes no prompt token;
5. the prefill replica releases its blocks (full ones stay in its prefix cache).

When the decode replica has no room to reserve, nothing moves and it
recomputes the prompt (as in the twin); so it does when the prefill replica
died before its KV was read. A decode replica that dies during the handoff
is replaced by another (the prefill replica still holds the KV). The front
end measures each transfer: blocks and bytes moved, blocks reused, seconds
from export to import.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from tokenmill.core.request import Request
from tokenmill.core.router import NoReplicaError
from tokenmill.core.scheduler import QueueFullError
from tokenmill.output_processor import PriorTokens
from tokenmill.outputs import RequestOutput
from tokenmill.server.async_engine import EngineDeadError

if TYPE_CHECKING:
    from tokenmill.cluster.frontend import ClusterEngine, Track

_MAX_ATTEMPTS = 4


def decode_view(track: Track, prior: PriorTokens) -> Request:
    """The request as the decode pool's router sees it: the twin's (``Simulator._start_transfer``)."""
    params = track.params
    k = len(prior.token_ids)
    params = replace(params, max_tokens=None if params.max_tokens is None else params.max_tokens - k,
                     min_tokens=max(0, params.min_tokens - k))  # fmt: skip
    predicted = track.kwargs.get("predicted_output_len")
    return Request(track.request_id, track.prompt + prior.token_ids, params,
                   cache_namespace=track.kwargs.get("cache_namespace", ""),
                   predicted_output_len=None if predicted is None else max(predicted - k, 0))  # fmt: skip


async def hand_off(fe: ClusterEngine, track: Track, out: RequestOutput) -> None:
    """Move a request that finished its prefill (``out``: the handoff output) to a decode replica."""
    o = out.outputs[0]
    prior = PriorTokens(list(o.token_ids), o.logprobs, o.cumulative_logprob)
    src = fe.replicas[track.replica]
    try:
        err = await _continue(fe, track, src.index, prior)
    finally:
        if src.up:
            src.actor.release_kv.remote(track.request_id)
    track.busy = False
    if err is not None:
        fe._fail(track, err)
    elif track.aborted and track.route is None:
        fe._finish_aborted(track)  # aborted before it reached a decode replica
    else:
        fe._settle(track)


async def _continue(fe: ClusterEngine, track: Track, src_index: int, prior: PriorTokens) -> BaseException | None:
    rid = track.request_id
    n_prompt = len(track.prompt)
    tokens = track.prompt + prior.token_ids
    namespace = track.kwargs.get("cache_namespace", "")
    view = decode_view(track, prior)
    for _ in range(_MAX_ATTEMPTS):
        if track.aborted:
            return None
        track.route = view
        try:
            dst = fe.replicas[fe._route(track, decode=True)]
        except NoReplicaError as exc:
            track.route = None
            return EngineDeadError(f"no decode replica can continue the request: {exc}")
        src = fe.replicas[src_index]
        t0 = fe.clock()
        got = None
        try:
            if src.up:
                got = await dst.actor.reserve_import.remote(rid, tokens, n_prompt, namespace)
            if track.aborted:
                if got is not None:
                    dst.actor.cancel_import.remote(rid)
                fe._unroute(track)
                return None
            kv = None
            if got is not None:
                cached, fresh = got
                kv = ([src.actor.export_kv.remote(rid, cached, n_prompt)], fresh)
            reply = await dst.actor.add.remote([(rid, track.prompt, track.params)], {**track.kwargs, "prior": prior}, kv)
        except Exception as exc:  # noqa: BLE001 - the decode replica died: another one takes it
            fe._unroute(track)
            fe._replica_down(dst, exc)
            continue
        if reply[0] != "ok":
            fe._unroute(track)
            kind, message = reply
            if kind == "queue_full":
                return QueueFullError(message)
            return ValueError(message) if kind == "invalid" else EngineDeadError(message)
        track.phase = "run"
        if got is not None and reply[2]:
            cached, fresh = got
            fe.metrics.on_transfer(len(fresh), cached // fe.block_size, len(fresh) * fe.block_bytes, fe.clock() - t0)
        else:
            fe.metrics.on_recomputed()
        return None
    return EngineDeadError("the decode replicas kept dying while the request was handed to them")
