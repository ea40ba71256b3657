"""One engine replica: the Ray actor that holds an ``Engine`` and its step-loop thread.

The actor reuses the single-process server's ``AsyncEngine`` for the step
loop (one engine thread; requests, aborts and KV operations enter through
its command queue and take effect between steps), with ``torch`` limited to
the replica's share of cores. It is an async actor: its methods run on one
event loop, which also receives the engine thread's outputs.

Outputs leave through one Ray streaming generator per replica
(``outputs``): each item is the list of ``RequestOutput``s the engine thread
handed over since the previous item (one step's worth, or one sub-step's
in a multi-step plan), so nothing waits for a response to finish and a
step's outputs for many requests cost one Ray object, not one each. The
front end demultiplexes them by request id (``frontend.py``).

KV export and import (prefill/decode, ``pd.py``): ``export_kv`` returns the
blocks of a handed-off request as one array, which Ray puts in its
shared-memory object store; ``add`` with ``kv`` reads such an array (by
reference, without a copy on the same machine), writes it into the blocks
``reserve_import`` reserved, then adds the request.

Replies are plain data: ``add`` answers ``("ok", prompt ids, imported)`` or
``(error kind, message)``, so that a refusal reaches the HTTP client as
a clean 400 or 429 rather than a Ray traceback. If the engine thread itself
fails, the process exits and Ray restarts the actor (the front end then
treats it as a replica that died).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any

from tokenmill.core.request import SamplingParams
from tokenmill.core.scheduler import QueueFullError
from tokenmill.engine import Engine, EngineConfig
from tokenmill.outputs import RequestOutput
from tokenmill.server.async_engine import AsyncEngine, EngineDeadError, RequestStream
from tokenmill.server.metrics import ServerMetrics

logger = logging.getLogger("tokenmill.cluster")

# A request handed off for prefill/decode holds its KV until the front end has moved
# it; if the front end never comes back for it (it died), the blocks go back after this.
HELD_KV_TIMEOUT_S = 120.0


class _NoPending(set):  # type: ignore[type-arg]
    """The outbox carries every request of the replica: it keeps no per-request books."""

    def add(self, item: Any) -> None:
        pass


class _TakenOver(Exception):
    """Put in the queue of an ``outputs`` stream that a newer one replaced."""


class _Outbox(RequestStream):
    """Where the ``AsyncEngine`` delivers every request's outputs, for the ``outputs`` stream."""

    def __init__(self) -> None:
        super().__init__()
        self.pending = _NoPending()
        self.queue: asyncio.Queue[Any] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        self.queue.put_nowait(item)


class Replica:
    """A Ray actor (see ``launch.py``, which wraps it with ``ray.remote``) around one engine."""

    def __init__(self, index: int, config: EngineConfig, threads: int | None, model_name: str) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)
        from prometheus_client import disable_created_metrics

        disable_created_metrics()  # the front end merges these pages; *_created would only add lines
        self.index = index
        self.engine = Engine(config)
        self.metrics = ServerMetrics(model_name)
        self.async_engine = AsyncEngine(self.engine, self.metrics)
        self.started = time.time()
        self.pid = os.getpid()
        self._outbox: _Outbox | None = None
        self._held: dict[str, float] = {}  # handed-off request id -> when its KV was last asked for
        self._reaper: asyncio.Task[None] | None = None
        from tokenmill.cluster.kv import ExportBuffer

        self._export = ExportBuffer()
        self._export_lock = asyncio.Lock()

    # ------------------------------------------------------------- lifecycle

    async def start(self) -> dict[str, Any]:
        """Start the engine thread (once); return what the front end needs to know."""
        if self._outbox is None:
            self._outbox = _Outbox()
            self.async_engine.start()
            self._reaper = asyncio.get_running_loop().create_task(self._reap_held())
        return self.info()

    def info(self) -> dict[str, Any]:
        e = self.engine
        ex = e.executor
        kv_cache = getattr(ex, "kv_cache", None)
        from tokenmill.cluster.kv import block_bytes

        return {
            "index": self.index,
            "pid": self.pid,
            "node": socket.gethostname(),
            "started": self.started,
            "model_path": e.model_path,
            "tokenizer": e.config.tokenizer or e.model_path,
            "max_model_len": e.max_model_len,
            "vocab_size": e.vocab_size,
            "num_blocks": e.scheduler.config.num_blocks,
            "block_size": e.scheduler.config.block_size,
            "block_bytes": block_bytes(kv_cache) if kv_cache is not None else 0,
            "max_waiting": e.config.max_waiting,
            "max_num_seqs": e.config.max_num_seqs,
        }

    # ---------------------------------------------------------------- requests

    async def add(
        self,
        requests: list[tuple[str, list[int], SamplingParams]],
        kwargs: dict[str, Any],
        kv: tuple[list[Any], list[int]] | None = None,
    ) -> tuple[Any, ...]:
        """Add requests (all or none); ``kv`` = ([ref to an ``export_kv`` array], reserved blocks)
        first imports the KV of the one request continued here. Returns ``("ok", prompt ids,
        imported)`` or ``(kind, message)`` with kind ``invalid``, ``queue_full`` or ``dead``."""
        assert self._outbox is not None, "start() first"
        imported = False
        if kv is not None:
            imported = await self._import(requests[0][0], *kv)
        try:
            ids = await self.async_engine.add_requests(requests, self._outbox, **kwargs)
        except QueueFullError as exc:
            return ("queue_full", str(exc))
        except ValueError as exc:
            return ("invalid", str(exc))
        except EngineDeadError as exc:
            return ("dead", str(exc))
        return ("ok", ids, imported)

    async def _import(self, request_id: str, refs: list[Any], block_ids: list[int]) -> bool:
        """Write the exported KV into the reserved blocks; on failure (its replica died), give
        the reservation back so that the request recomputes its prompt here."""
        from tokenmill.cluster.kv import import_kv

        try:
            (ref,) = await refs[0]  # export_kv's answer: [a reference to the blocks]
            data = await ref
            await asyncio.to_thread(import_kv, self.engine.executor.kv_cache, block_ids, data)
            del data  # the object store may reuse its memory
            return True
        except Exception:  # noqa: BLE001 - the source is gone or sent nothing usable: recompute
            logger.warning("replica %d: KV import of %s failed; recomputing its prompt", self.index, request_id,
                           exc_info=True)  # fmt: skip
            await self.async_engine.call(lambda e: e.cancel_import(request_id))
            return False

    async def outputs(self) -> Any:
        """Every output of every request, in batches as the engine produces them (a Ray streaming generator).

        One consumer at a time: a new call takes over (a front end that lost its
        stream, or a new front end over the same replica), the old one ends.
        """
        assert self._outbox is not None, "start() first"
        old = self._outbox.queue
        q = self._outbox.queue = asyncio.Queue()
        while not old.empty():
            q.put_nowait(old.get_nowait())
        old.put_nowait(_TakenOver())
        while True:
            item = await q.get()
            if isinstance(item, _TakenOver):
                return
            batch = [item]
            while not q.empty():
                batch.append(q.get_nowait())
            failed = [b for b in batch if isinstance(b, BaseException)]
            if failed:
                # The engine thread died: nothing here can be served again. Exit, so
                # that Ray restarts the actor; the front end sees the replica die.
                logger.error("replica %d: the engine failed (%s); exiting for a restart", self.index, failed[0])
                asyncio.get_running_loop().call_later(0.1, os._exit, 1)
                batch = [b for b in batch if not isinstance(b, BaseException)]
            yield batch

    async def abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.async_engine.abort(rid)

    # ------------------------------------------------------------ KV transfer

    async def reserve_import(self, request_id: str, token_ids: list[int], num_tokens: int,
                             cache_namespace: str = "") -> tuple[int, list[int]] | None:  # fmt: skip
        return await self.async_engine.call(lambda e: e.reserve_import(request_id, token_ids, num_tokens, cache_namespace))

    async def cancel_import(self, request_id: str) -> bool:
        return await self.async_engine.call(lambda e: e.cancel_import(request_id))

    async def export_kv(self, request_id: str, start_token: int, end_token: int) -> list[Any]:
        """``[ref]``: an ``ObjectRef`` to the KV of tokens ``[start_token, end_token)`` of a handed-off
        request (whole blocks), put in the object store by this replica."""
        self._held[request_id] = time.monotonic()
        ids = await self.async_engine.call(lambda e: e.export_blocks(request_id, start_token, end_token))
        # The blocks stay owned until release_kv, so nothing writes them while they are read.
        async with self._export_lock:
            return [await asyncio.to_thread(self._export.put, self.engine.executor.kv_cache, ids)]

    async def release_kv(self, request_id: str) -> bool:
        self._held.pop(request_id, None)
        return await self.async_engine.call(lambda e: e.release_kv(request_id))

    async def _reap_held(self) -> None:
        """Release KV that a handoff kept and nobody came for (the front end went away)."""
        while True:
            await asyncio.sleep(HELD_KV_TIMEOUT_S / 4)
            now = time.monotonic()
            try:
                held = await self.async_engine.call(lambda e: list(e.scheduler.kv.held))
            except EngineDeadError:
                return
            for rid in held:
                seen = self._held.setdefault(rid, now)
                if now - seen > HELD_KV_TIMEOUT_S:
                    logger.warning("replica %d: releasing the KV of %s, handed off and never taken", self.index, rid)
                    await self.release_kv(rid)

    # ------------------------------------------------------------- inspection

    async def metrics_text(self) -> bytes:
        """This replica's Prometheus metrics (the single-process server's set)."""
        from prometheus_client import generate_latest

        return generate_latest(self.metrics.registry)

    async def state(self) -> dict[str, Any]:
        """Counts a test or an operator can check: requests, KV blocks, prompt tokens computed."""

        def read(e: Engine) -> dict[str, Any]:
            kv = e.scheduler.kv
            return {
                "requests": len(e.scheduler.requests),
                "used_blocks": kv.pool.num_used,
                "held": len(kv.held),
                "imports": len(kv.imports),
                "num_prompt_tokens": e.num_prompt_tokens,
                "num_generation_tokens": e.num_generation_tokens,
                "num_steps": e.num_steps,
                "finished_by_reason": dict(e.finished_by_reason),
            }

        return await self.async_engine.call(read)

    async def step_log(self, start: int = 0) -> list[tuple[list[str], tuple, float, float]]:
        """(requests added before, plan summary, duration, start time) per plan from plan ``start`` on,
        when the engine records its steps (``EngineConfig.record_steps``)."""
        return await self.async_engine.call(
            lambda e: [(r.added_before, r.summary, r.duration, r.start) for r in e.step_log[start:]]
        )
