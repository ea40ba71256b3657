"""The engine's step loop on a background thread, with an asyncio face.

``Engine`` is synchronous and single-threaded: whoever calls ``step()`` owns
it. ``AsyncEngine`` gives it a thread of its own so that the event loop never
waits on a forward pass, and it keeps every engine call on that thread:

- requests and aborts enter through one thread-safe command queue and take
  effect before the next step (an abort frees the request's KV blocks at
  once, so a client that goes away costs at most the step in progress);
- outputs go back to the event loop with ``loop.call_soon_threadsafe``, one
  call per step, into a per-request ``asyncio.Queue`` (a ``RequestStream``);
  within a multi-step decode plan, one call per sub-step (``Engine.on_partial``),
  so a stream gets each token when it is sampled;
- adding requests is awaited (the prompts of one HTTP request go over in
  one batch), so bad input (``ValueError``) and a full queue
  (``QueueFullError``) reach the HTTP handler before it answers;
- the event loop counts the sequences it has handed over and not seen
  finish (``num_seqs_in_flight``), so that admission needs no engine call;
- anything else that must touch the engine (loading a LoRA adapter, a
  cluster replica reserving or exporting KV blocks) goes through ``call``,
  which runs a function on the engine thread between two steps.

The thread sleeps on the command queue when the engine has nothing to do.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from tokenmill.core.request import SamplingParams
from tokenmill.engine import Engine, EngineStats
from tokenmill.outputs import RequestOutput
from tokenmill.server.metrics import ServerMetrics

logger = logging.getLogger("tokenmill.server")

# How long the thread waits for a command when requests exist but the
# scheduler planned nothing (e.g. a policy holds them back): it must not spin.
_STALL_WAIT_S = 0.005


class EngineDeadError(RuntimeError):
    """The engine thread stopped (a failure or shutdown); no request can be served."""


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    kwargs: dict[str, Any]
    future: asyncio.Future[list[int]]


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Stop:
    pass


@dataclass
class _Call:
    fn: Callable[[Engine], Any]
    future: asyncio.Future[Any]


@dataclass
class _Delivery:
    """What one engine-loop iteration hands to the event loop."""

    added: list[tuple[str, asyncio.Future[list[int]], list[int] | None, BaseException | None]] = field(
        default_factory=list
    )
    outputs: list[RequestOutput] = field(default_factory=list)
    calls: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = field(default_factory=list)


class RequestStream:
    """The outputs of one or more user requests (a batched prompt), in step order.

    Iteration ends once every request the stream carries has finished.
    """

    def __init__(self) -> None:
        self.pending: set[str] = set()  # request ids added and not finished
        self.finished = False
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.pending.discard(item.request_id)
            self.finished = not self.pending
        return item


class AsyncEngine:
    """Run ``engine`` on a background thread; serve requests as async streams."""

    def __init__(self, engine: Engine, metrics: ServerMetrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self.stats: EngineStats | None = None  # latest snapshot, written by the engine thread
        self.dead: BaseException | None = None
        self._commands: queue.SimpleQueue[_Add | _Abort | _Stop | _Call] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # event-loop thread only
        self._seqs: dict[str, int] = {}  # event-loop thread only: sequences (n) per request
        self.num_seqs_in_flight = 0  # event-loop view: sequences added and not finished
        self._lock = threading.Lock()  # orders "dead" against enqueuing
        self._live: set[str] = set()  # engine thread only: requests added and not finished
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the engine thread; call from the event loop that will consume outputs."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self.engine.on_partial = self._publish_partial
        self._thread = threading.Thread(target=self._run, name="tokenmill-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Abort whatever is left and join the engine thread."""
        thread = self._thread
        if thread is None:
            return
        self._commands.put(_Stop())
        await asyncio.get_running_loop().run_in_executor(None, thread.join)
        self._thread = None
        self.engine.on_partial = None

    @property
    def num_in_flight(self) -> int:
        """User requests added and not yet finished (event-loop view)."""
        return len(self._streams)

    def clock(self) -> float:
        """The engine's clock (arrival times are on it)."""
        return self.engine.clock()

    async def collect_metrics(self) -> None:
        """Bring ``metrics`` up to date before a scrape; the engine thread keeps them current already."""

    # ---------------------------------------------------------------- requests

    async def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        stream: RequestStream | None = None,
        **kwargs: Any,
    ) -> tuple[RequestStream, list[int]]:
        """Queue a request; return its output stream and prompt token ids (see ``add_requests``)."""
        stream = stream if stream is not None else RequestStream()
        (prompt_ids,) = await self.add_requests([(request_id, prompt, params)], stream, **kwargs)
        return stream, prompt_ids

    async def add_requests(
        self,
        requests: list[tuple[str, str | list[int], SamplingParams]],
        stream: RequestStream,
        on_queued: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> list[list[int]]:
        """Queue requests (id, prompt, params) into ``stream``, all or none; return their prompt token ids.

        All are handed to the engine thread at once and taken before its next
        step; ``on_queued`` runs right after, before this awaits anything
        (their sequences count in ``num_seqs_in_flight`` from then on).
        ``kwargs`` go to ``Engine.add_request``. Raises what that raises
        (``ValueError``, ``QueueFullError``) or ``EngineDeadError``; on any
        error, or if the caller is cancelled, none of them stays in the engine.
        """
        loop = asyncio.get_running_loop()
        ids = [rid for rid, _, _ in requests]
        if len(set(ids)) != len(ids) or any(rid in self._streams for rid in ids):
            raise ValueError("a request id is already in use")
        futures: list[asyncio.Future[list[int]]] = []
        with self._lock:
            if self.dead is not None or self._thread is None:
                raise EngineDeadError(f"the engine is not running ({self.dead or 'stopped'})")
            for rid, prompt, params in requests:
                future: asyncio.Future[list[int]] = loop.create_future()
                futures.append(future)
                self._streams[rid] = stream
                self._seqs[rid] = params.n
                self.num_seqs_in_flight += params.n
                stream.pending.add(rid)
                self._commands.put(_Add(rid, prompt, params, kwargs, future))
        if on_queued is not None:
            on_queued()
        try:
            results = await asyncio.gather(*futures, return_exceptions=True)
        except asyncio.CancelledError:
            # The client left before the engine took the requests: make sure they go.
            for rid in ids:
                self.abort(rid)
            raise
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            for rid, r in zip(ids, results, strict=True):
                if not isinstance(r, BaseException):
                    self.abort(rid)
            raise failures[0]
        return results  # type: ignore[return-value]

    async def call(self, fn: Callable[[Engine], Any]) -> Any:
        """Run ``fn(engine)`` on the engine thread between two steps; return what it returns
        (or raise what it raises). Raises ``EngineDeadError`` if the engine is not running."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        with self._lock:
            if self.dead is not None or self._thread is None:
                raise EngineDeadError(f"the engine is not running ({self.dead or 'stopped'})")
            self._commands.put(_Call(fn, future))
        return await future

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op if it finished); takes effect before the next step."""
        self._commands.put(_Abort(request_id))

    def abort_all(self) -> None:
        for request_id in list(self._streams):
            self.abort(request_id)

    # ------------------------------------------------------- event-loop side

    def _forget(self, request_id: str) -> RequestStream | None:
        self.num_seqs_in_flight -= self._seqs.pop(request_id, 0)
        return self._streams.pop(request_id, None)

    def _deliver(self, delivery: _Delivery) -> None:
        for request_id, future, prompt_ids, exc in delivery.added:
            if exc is not None:
                stream = self._forget(request_id)
                if stream is not None:
                    stream.pending.discard(request_id)
            if future.done():
                continue  # the awaiting handler was cancelled; an abort is queued if needed
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(prompt_ids or [])
        for future, result, exc in delivery.calls:
            if future.done():
                continue
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(result)
        for out in delivery.outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            stream.put(out)
            if out.finished:
                self._forget(out.request_id)

    def _fail_all(self, exc: BaseException) -> None:
        for stream in {id(s): s for s in self._streams.values()}.values():
            stream.put(exc)
        self._streams.clear()
        self._seqs.clear()
        self.num_seqs_in_flight = 0

    def _post(self, fn: Any, arg: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, arg)
        except RuntimeError:
            pass  # the event loop is closed: nobody is listening any more

    # ---------------------------------------------------------- engine thread

    def _run(self) -> None:
        try:
            self._loop_forever()
        except BaseException as exc:  # noqa: BLE001 - report any failure to every waiting client
            logger.exception("the engine thread failed")
            with self._lock:
                self.dead = exc
            err = EngineDeadError(f"the engine failed: {type(exc).__name__}: {exc}")
            delivery = _Delivery()
            while True:
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    break
                if isinstance(cmd, _Add):
                    delivery.added.append((cmd.request_id, cmd.future, None, err))
                elif isinstance(cmd, _Call):
                    delivery.calls.append((cmd.future, None, err))
            self._post(self._deliver, delivery)
            self._post(self._fail_all, err)

    def _loop_forever(self) -> None:
        engine = self.engine
        stalled = False
        self._publish(_Delivery())  # gauges (KV blocks ...) from the start, not the first request
        while True:
            cmds: list[_Add | _Abort | _Stop | _Call] = []
            if not engine.has_unfinished():
                cmds.append(self._commands.get())  # idle: sleep until there is work
            elif stalled:
                try:
                    cmds.append(self._commands.get(timeout=_STALL_WAIT_S))
                except queue.Empty:
                    pass
            while True:
                try:
                    cmds.append(self._commands.get_nowait())
                except queue.Empty:
                    break
            delivery = _Delivery()
            stop = self._apply(cmds, delivery)
            if delivery.added or delivery.calls:
                # Answer the adds before the step: a handler can start its
                # response now, and a step that fails cannot strand it.
                self._post(self._deliver, _Delivery(added=delivery.added, calls=delivery.calls))
                delivery.added, delivery.calls = [], []
            if stop:
                for request_id in list(self._live):
                    out = engine.abort_request(request_id)
                    if out is not None:
                        delivery.outputs.append(out)
            elif engine.has_unfinished():
                steps_before = engine.num_steps
                delivery.outputs.extend(engine.step())
                stalled = engine.num_steps == steps_before
            self._publish(delivery)
            if stop:
                with self._lock:
                    self.dead = EngineDeadError("the engine was stopped")
                return

    def _apply(self, cmds: list[_Add | _Abort | _Stop | _Call], delivery: _Delivery) -> bool:
        engine = self.engine
        stop = False
        for cmd in cmds:
            if isinstance(cmd, _Add):
                try:
                    prompt_ids = engine.add_request(cmd.request_id, cmd.prompt, cmd.params, **cmd.kwargs)
                except Exception as exc:  # noqa: BLE001 - ValueError / QueueFullError go to the handler
                    delivery.added.append((cmd.request_id, cmd.future, None, exc))
                    continue
                delivery.added.append((cmd.request_id, cmd.future, prompt_ids, None))
                self._live.add(cmd.request_id)
                if self.metrics is not None:
                    arrival = cmd.kwargs.get("arrival_time")
                    self.metrics.on_added(
                        cmd.request_id, engine.clock() if arrival is None else arrival, len(prompt_ids),
                        continued=cmd.kwargs.get("prior") is not None,
                    )
            elif isinstance(cmd, _Abort):
                out = engine.abort_request(cmd.request_id)
                if out is not None:
                    delivery.outputs.append(out)
            elif isinstance(cmd, _Call):
                try:
                    delivery.calls.append((cmd.future, cmd.fn(engine), None))
                except Exception as exc:  # noqa: BLE001 - the caller gets it
                    delivery.calls.append((cmd.future, None, exc))
            else:
                stop = True
        return stop

    def _publish_partial(self, outputs: list[RequestOutput]) -> None:
        """Hand the outputs of one sub-step of a multi-step plan to the event loop now."""
        for out in outputs:
            if out.finished:
                self._live.discard(out.request_id)
        if self.metrics is not None:
            now = self.engine.clock()
            for out in outputs:
                self.metrics.on_output(out, now)
        self._post(self._deliver, _Delivery(outputs=outputs))

    def _publish(self, delivery: _Delivery) -> None:
        engine = self.engine
        for out in delivery.outputs:
            if out.finished:
                self._live.discard(out.request_id)
        stats = engine.stats()
        self.stats = stats
        if self.metrics is not None:
            now = engine.clock()
            for out in delivery.outputs:
                self.metrics.on_output(out, now)
            pool = getattr(getattr(engine.scheduler, "kv", None), "pool", None)
            self.metrics.on_stats(
                stats, len(self._live), pool.num_free if pool is not None else None
            )
        if delivery.added or delivery.outputs or delivery.calls:
            self._post(self._deliver, delivery)
