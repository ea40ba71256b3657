"""The cluster's front end: ``ClusterEngine``, with the face the HTTP handlers use, over Ray replicas.

The server's handlers talk to an ``AsyncEngine`` (``add_requests``,
``abort``, streams of ``RequestOutput``s, in-flight counts); a
``ClusterEngine`` has the same face, so one FastAPI app serves one engine or
a cluster. Behind it:

- Routing is the core's (``core/router.py``): the very router objects the
  twin uses pick a replica per request (``route``) and learn of each finish
  (``on_finished``), on the front end's event loop, in the order the front
  end sees them. Each replica's outputs arrive on one Ray stream
  (``Replica.outputs``) and are relayed into the requests' streams as they
  come; a client that goes away aborts its request on its replica.
- Prefill/decode (``--pd P:D``): a request (one sample, no prompt logprobs)
  is routed to a prefill replica, which stops after its first token; the
  first token is relayed at once, then ``pd.hand_off`` moves the KV to a
  decode replica and the request continues there (see ``pd.py``).
- Faults: a replica whose stream breaks is down. The router skips it; each
  of its requests that has sent no token yet is routed again (the client
  never knows), the others end with an error (503 before the response
  starts, an error event in a stream). Ray restarts the actor; once it
  answers again, it is back in the router. Requests whose replica is mid-way
  through an operation of the front end (an add, a handoff) are settled by
  that operation, which sees the failure itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from tokenmill.cluster.metrics import ClusterMetrics
from tokenmill.core.request import Request, SamplingParams
from tokenmill.core.router import NoReplicaError, Router
from tokenmill.core.scheduler import QueueFullError
from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.server.async_engine import EngineDeadError, RequestStream

logger = logging.getLogger("tokenmill.cluster")

# Outputs of requests that were moved elsewhere or ended are dropped; an add that keeps
# meeting dead replicas gives up after this many tries.
_MAX_ATTEMPTS = 4
_RECOVER_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)
_NODE = socket.gethostname()


class _NoGrammars:
    """What the server's structured-output step sees as the engine of a cluster: replicas
    compile no grammars yet, so a request that asks for one is refused by name."""

    @property
    def grammar_compiler(self) -> Any:
        from tokenmill.server.errors import APIError

        raise APIError(400, "structured outputs (response_format, structured_outputs, guided_*, tools) are not "
                            "served with --replicas or --pd yet", code="unsupported_with_cluster")  # fmt: skip


class ReplicaDiedError(EngineDeadError):
    """The replica serving a request died after the request had sent tokens."""


@dataclass
class ReplicaHandle:
    index: int
    role: str  # "both" (colocated), "prefill" or "decode"
    actor: Any
    info: dict[str, Any]
    up: bool = True
    restarts: int = 0
    pump: asyncio.Task[None] | None = field(default=None, repr=False)


@dataclass(eq=False)
class Track:
    """One engine request in flight at the front end."""

    request_id: str
    stream: RequestStream
    prompt: list[int]
    params: SamplingParams
    kwargs: dict[str, Any]
    pd: bool  # prefill/decode: prefilled on one replica, decoded on another
    route: Request | None = None  # what the router charged (None: not routed now)
    router: Router | None = None
    replica: int = -1  # where it runs (or is being added)
    phase: str = "run"  # run | prefill | transfer
    busy: bool = False  # an operation of the front end (add, handoff) settles its failures
    sent: bool = False  # a token reached the client's stream
    aborted: bool = False
    prefill_cached: int | None = None  # P/D: prompt tokens the prefill replica's cache held
    attempts: int = 0
    add_sent: float | None = None  # front-end clock when the add left for the replica (until its first token)


class ClusterEngine:
    """``AsyncEngine``'s face over replicas (see the module docstring)."""

    def __init__(self, replicas: list[ReplicaHandle], router: Router, prefill_router: Router | None,
                 metrics: ClusterMetrics, clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.replicas = replicas
        self.pool = [r.index for r in replicas if r.role != "prefill"]  # router position -> replica
        self.prefill_pool = [r.index for r in replicas if r.role == "prefill"]
        if router.num_replicas != len(self.pool):
            raise ValueError("the router must cover the colocated (or decode) replicas")
        if (prefill_router is None) != (not self.prefill_pool):
            raise ValueError("a prefill router goes with prefill replicas")
        self.router = router
        self.prefill_router = prefill_router
        self.metrics = metrics
        self.clock = clock
        info = replicas[0].info
        self.max_model_len: int = min(r.info["max_model_len"] for r in replicas)
        self.vocab_size: int = info["vocab_size"]
        self.block_size: int = info["block_size"]
        self.block_bytes: int = info["block_bytes"]
        self.tracks: dict[str, Track] = {}
        self.num_seqs_in_flight = 0
        self.stats = None  # the face of AsyncEngine; per-replica stats are in the metrics
        self.engine = _NoGrammars()  # the face of AsyncEngine, for structured outputs only
        self._stopped = False
        self._started = False
        self._tasks: set[asyncio.Task[Any]] = set()
        # (request id, pool, replica, front-end clock) per routing decision, when recording.
        self.routing_log: list[tuple[str, str, int, float]] | None = None
        self.finish_log: list[tuple[str, float]] | None = None  # (request id, front-end clock) per finish seen

    # ------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start relaying the replicas' outputs; call from the event loop that serves."""
        if self._started:
            return
        self._started = True
        for rep in self.replicas:
            rep.pump = self._spawn(self._pump(rep))

    async def stop(self) -> None:
        """Abort what is left (its streams get their final outputs) and stop relaying."""
        if self._stopped:
            return
        self.abort_all()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2.0
        while self.tracks and loop.time() < deadline:
            await asyncio.sleep(0.02)
        self._stopped = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        self._fail_all(EngineDeadError("the server is shutting down"))

    @property
    def dead(self) -> BaseException | None:
        """Why no request can be served now (stopped, or a whole pool down); None while serving."""
        if self._stopped:
            return EngineDeadError("the cluster was stopped")
        for pool, name in ((self.pool, "replicas"), (self.prefill_pool, "prefill replicas")):
            if pool and not any(self.replicas[r].up for r in pool):
                return EngineDeadError(f"all {name} are down (restarting)")
        return None

    @property
    def num_in_flight(self) -> int:
        return len(self.tracks)

    async def collect_metrics(self) -> None:
        """Fetch every replica's metrics page (a replica that does not answer soon is left out)."""

        async def one(rep: ReplicaHandle) -> None:
            if not rep.up:
                return
            try:
                page = await asyncio.wait_for(_await(rep.actor.metrics_text.remote()), timeout=2.0)
            except Exception:  # noqa: BLE001 - a scrape must not fail for one replica
                return
            self.metrics.set_page(rep.index, page)

        await asyncio.gather(*(one(r) for r in self.replicas))

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---------------------------------------------------------------- requests

    async def add_request(self, request_id: str, prompt: list[int], params: SamplingParams,
                          stream: RequestStream | None = None, **kwargs: Any) -> tuple[RequestStream, list[int]]:  # fmt: skip
        stream = stream if stream is not None else RequestStream()
        (ids,) = await self.add_requests([(request_id, prompt, params)], stream, **kwargs)
        return stream, ids

    async def add_requests(
        self,
        requests: list[tuple[str, Any, SamplingParams]],
        stream: RequestStream,
        on_queued: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> list[list[int]]:
        """Route and add requests (id, prompt token ids, params) into ``stream``, all or none.

        Raises ``ValueError``, ``QueueFullError`` (a replica refused) or
        ``EngineDeadError`` (no replica can take them); on any error, or if the
        caller is cancelled, none of them stays anywhere.
        """
        if self._stopped or not self._started:
            raise EngineDeadError("the cluster is not running")
        ids = [rid for rid, _, _ in requests]
        if len(set(ids)) != len(ids) or any(rid in self.tracks for rid in ids):
            raise ValueError("a request id is already in use")
        for _, prompt, _ in requests:
            if isinstance(prompt, str):
                raise ValueError("a cluster takes prompts as token ids (the front end tokenizes)")
        kwargs.pop("arrival_time", None)  # each replica stamps arrivals on its own clock
        tracks = []
        for rid, prompt, params in requests:
            pd = bool(self.prefill_pool) and params.n == 1 and params.prompt_logprobs is None
            track = Track(rid, stream, [int(t) for t in prompt], params, dict(kwargs), pd, busy=True,
                          phase="prefill" if pd else "run")  # fmt: skip
            tracks.append(track)
            self.tracks[rid] = track
            stream.pending.add(rid)
            self.num_seqs_in_flight += params.n
        if on_queued is not None:
            on_queued()
        try:
            errors = await asyncio.gather(*(self._place(t) for t in tracks))
        except asyncio.CancelledError:
            for t in tracks:
                self._give_up(t, None)
            raise
        failure = next((e for e in errors if e is not None), None)
        if failure is not None:
            for t in tracks:
                self._give_up(t, None)
            raise failure
        for t in tracks:
            t.busy = False
            self._settle(t)
        return [t.prompt for t in tracks]

    async def _place(self, track: Track) -> BaseException | None:
        """Route ``track`` and add it to a replica, trying others while the chosen one is dead;
        returns the error that refuses it (None: added)."""
        while True:
            track.attempts += 1
            try:
                replica = self._route(track)
            except NoReplicaError as exc:
                return EngineDeadError(f"no replica can take the request: {exc}")
            rep = self.replicas[replica]
            kw = dict(track.kwargs)
            if track.phase == "prefill":
                kw["handoff"] = True
            track.add_sent = self.clock()
            try:
                reply = await _await(rep.actor.add.remote([(track.request_id, track.prompt, track.params)], kw))
            except Exception as exc:  # noqa: BLE001 - the replica died (or Ray lost it): try another
                self._unroute(track)
                self._replica_down(rep, exc)
                if track.sent:
                    # Its first outputs came on the replica's stream before the add's reply was lost:
                    # running it again elsewhere would send those tokens twice.
                    self.metrics.on_failed()
                    return ReplicaDiedError(f"replica {replica} died while the request was being added, after "
                                            "part of its output was produced: retry the request")  # fmt: skip
                if track.attempts >= _MAX_ATTEMPTS or track.aborted:
                    return EngineDeadError(f"the replicas died while the request was being added ({exc})")
                self.metrics.on_retry()  # nothing was sent: it moves to another replica
                continue
            kind = reply[0]
            if kind == "ok":
                return None
            self._unroute(track)
            if kind == "queue_full":
                return QueueFullError(reply[1])
            if kind == "invalid":
                return ValueError(reply[1])
            return EngineDeadError(reply[1])

    def _route(self, track: Track, decode: bool = False) -> int:
        """Pick the replica for the track's next phase (charging its router)."""
        if track.phase == "prefill" and not decode:
            router, pool, name = self.prefill_router, self.prefill_pool, "prefill"
        else:
            router, pool, name = self.router, self.pool, "decode" if track.pd else "run"
        assert router is not None
        view = track.route if decode else Request(
            track.request_id, track.prompt, track.params, cache_namespace=track.kwargs.get("cache_namespace", ""),
            predicted_output_len=track.kwargs.get("predicted_output_len"),
        )  # fmt: skip
        assert view is not None
        replica = pool[router.route(view)]
        track.route, track.router, track.replica = view, router, replica
        self.metrics.on_routed(replica)
        if self.routing_log is not None:
            self.routing_log.append((track.request_id, name, replica, self.clock()))
        return replica

    def _unroute(self, track: Track) -> None:
        if track.route is not None and track.router is not None:
            track.router.on_finished(track.route)
        track.route = track.router = None

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op if it finished); its replica frees it, its stream gets a final output."""
        track = self.tracks.get(request_id)
        if track is None or track.aborted:
            return
        track.aborted = True
        if track.busy:
            return  # the operation in progress sees the flag
        rep = self.replicas[track.replica]
        if not rep.up:
            self._finish_aborted(track)
            return
        rep.actor.abort.remote([request_id])

    def abort_all(self) -> None:
        for request_id in list(self.tracks):
            self.abort(request_id)

    # ---------------------------------------------------------------- outputs

    async def _pump(self, rep: ReplicaHandle) -> None:
        """Relay one replica's outputs until its stream breaks (the replica died)."""
        try:
            async for ref in rep.actor.outputs.options(num_returns="streaming").remote():
                batch = await ref
                for out in batch:
                    self._on_output(rep, out)
            raise EngineDeadError("the replica's output stream ended")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any break of the stream means the replica is gone
            if not self._stopped:
                self._replica_down(rep, exc)

    def _on_output(self, rep: ReplicaHandle, out: RequestOutput) -> None:
        track = self.tracks.get(out.request_id)
        if track is None or track.replica != rep.index:
            return  # it ended, or moved to another replica: this replica's copy is stale
        m = out.metrics
        if track.add_sent is not None and m is not None and m.first_token_time is not None:
            # The engine's clock is CLOCK_MONOTONIC, one per machine: with the replica on this
            # machine, its stamps and ours compare (across machines the figure would be meaningless).
            if self.clock is time.monotonic and rep.info.get("node") == _NODE:
                self.metrics.on_hop(m.arrival_time - track.add_sent + time.monotonic() - m.first_token_time)
            track.add_sent = None
        if track.phase == "prefill":
            if out.finished and out.outputs[0].finish_reason == "handoff":
                self._on_handoff(track, out)
                return
        elif track.pd and track.prefill_cached is not None:
            out.num_cached_tokens = track.prefill_cached  # the client's cache hits are the prefill replica's
        self._relay(track, out)

    def _relay(self, track: Track, out: RequestOutput) -> None:
        if any(o.delta_token_ids for o in out.outputs):
            track.sent = True
        track.stream.put(out)
        if out.finished:
            self._finish(track)

    def _on_handoff(self, track: Track, out: RequestOutput) -> None:
        from tokenmill.cluster.pd import hand_off

        self._unroute(track)  # the prefill replica is done with it (the twin's prefill router learns here too)
        track.prefill_cached = out.num_cached_tokens
        first = replace(out, finished=False,
                        outputs=[replace(o, finish_reason=None, stop_reason=None) for o in out.outputs])  # fmt: skip
        self._relay(track, first)
        track.phase, track.busy = "transfer", True
        self._spawn(hand_off(self, track, out))

    def _finish(self, track: Track) -> None:
        if self.tracks.pop(track.request_id, None) is None:
            return
        self._unroute(track)
        self.num_seqs_in_flight -= track.params.n
        if self.finish_log is not None:
            self.finish_log.append((track.request_id, self.clock()))

    def _finish_aborted(self, track: Track) -> None:
        outs = [CompletionOutput(index=i, finish_reason="abort") for i in range(track.params.n)]
        self._relay(track, RequestOutput(track.request_id, None, track.prompt, outs, finished=True))

    def _fail(self, track: Track, exc: BaseException) -> None:
        """End a request with an error; the other requests of its stream are aborted (the
        stream ends with the error, so nobody would read them)."""
        if track.request_id not in self.tracks:
            return
        self._finish(track)
        track.stream.pending.discard(track.request_id)
        track.stream.put(exc)
        for rid in list(track.stream.pending):
            self.abort(rid)

    def _give_up(self, track: Track, exc: BaseException | None) -> None:
        """Drop a request the handler was told failed (nothing of it reached the client)."""
        if self.tracks.pop(track.request_id, None) is None:
            return
        self.num_seqs_in_flight -= track.params.n
        track.stream.pending.discard(track.request_id)
        if track.route is not None:
            rep = self.replicas[track.replica]
            if rep.up:
                rep.actor.abort.remote([track.request_id])
            self._unroute(track)

    def _fail_all(self, exc: BaseException) -> None:
        for track in list(self.tracks.values()):
            self._fail(track, exc)

    def _settle(self, track: Track) -> None:
        """After an operation on the track ends: if its replica went down meanwhile, act now."""
        if track.request_id not in self.tracks or track.busy:
            return
        if track.aborted:
            rep = self.replicas[track.replica]
            if rep.up:
                rep.actor.abort.remote([track.request_id])
            else:
                self._finish_aborted(track)
            return
        if not self.replicas[track.replica].up:
            self._orphaned(track)

    # ------------------------------------------------------------------ faults

    def _replica_down(self, rep: ReplicaHandle, exc: BaseException) -> None:
        if not rep.up or self._stopped:
            return
        logger.warning("replica %d is down (%s: %s); routing around it", rep.index, type(exc).__name__, exc)
        rep.up = False
        self.metrics.set_up(rep.index, False)
        router, pool = (self.prefill_router, self.prefill_pool) if rep.role == "prefill" else (self.router, self.pool)
        assert router is not None
        router.set_available(pool.index(rep.index), False)
        for track in list(self.tracks.values()):
            if track.replica == rep.index and not track.busy:
                self._orphaned(track)
        self._spawn(self._recover(rep))

    def _orphaned(self, track: Track) -> None:
        """The track's replica died: retry it elsewhere if nothing was sent, else fail it."""
        if track.aborted:
            self._unroute(track)
            self._finish_aborted(track)
        elif track.sent or track.pd and track.phase != "prefill":
            self.metrics.on_failed()
            self._fail(track, ReplicaDiedError(
                f"replica {track.replica} died while serving this request, after part of the output was sent; "
                "the rest is lost: retry the request"))  # fmt: skip
        else:
            self.metrics.on_retry()
            self._unroute(track)
            track.replica = -1  # outputs the dead replica sent before it died are stale now
            track.busy = True
            self._spawn(self._retry(track))

    async def _retry(self, track: Track) -> None:
        track.attempts = 0
        err = await self._place(track)
        track.busy = False
        if err is not None:
            self._fail(track, err)
        else:
            self._settle(track)

    async def _recover(self, rep: ReplicaHandle) -> None:
        """Wait for Ray to restart the replica's actor; then serve with it again."""
        for attempt in range(1 << 30):
            try:
                info = await _await(rep.actor.start.remote())
                break
            except Exception:  # noqa: BLE001 - still restarting (or gone for good: keep waiting)
                await asyncio.sleep(_RECOVER_BACKOFF_S[min(attempt, len(_RECOVER_BACKOFF_S) - 1)])
        rep.info = info
        rep.restarts += 1
        self.metrics.on_restart(rep.index)
        rep.pump = self._spawn(self._pump(rep))
        rep.up = True
        self.metrics.set_up(rep.index, True)
        router, pool = (self.prefill_router, self.prefill_pool) if rep.role == "prefill" else (self.router, self.pool)
        assert router is not None
        router.set_available(pool.index(rep.index), True)
        logger.info("replica %d is back (pid %s)", rep.index, info.get("pid"))


async def _await(ref: Any) -> Any:
    """Await a Ray ``ObjectRef`` (a coroutine, so that ``asyncio.wait_for`` and ``gather`` take it)."""
    return await ref
