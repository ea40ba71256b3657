"""The front end's fault handling, step by step, over fake replica actors (no Ray, no model).

A fake actor answers ``add`` with a future the test settles, and streams
the outputs the test feeds it; "dying" fails both. This pins down the
orderings a real cluster only hits by chance:

- a request whose add is lost with its replica after the replica streamed
  its first token must not run again elsewhere (the client would get those
  tokens twice): the add fails with a clean error;
- a request whose add is lost before anything came is retried on the other
  replica, counted as a retry, and the router never picks the dead one;
- a request queued on a replica that dies before its first token is retried,
  and outputs the dead replica had already put on its stream are dropped.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tokenmill.cluster.frontend import ClusterEngine, ReplicaDiedError, ReplicaHandle
from tokenmill.cluster.metrics import ClusterMetrics
from tokenmill.core.request import SamplingParams
from tokenmill.core.router import make_router
from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.server.async_engine import RequestStream


class _Died(Exception):
    pass


class _Method:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> Any:
        return self.fn(*args)

    def options(self, **_: Any) -> _Method:
        return self


class FakeActor:
    """Replica actor stand-in: adds wait on ``answer``; ``emit`` puts outputs on the stream; ``die`` fails all."""

    def __init__(self) -> None:
        self.added: list[str] = []
        self.pending: list[asyncio.Future[Any]] = []
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.alive = True
        self.add = _Method(self._add)
        self.outputs = _Method(self._outputs)
        self.abort = _Method(lambda ids: None)
        self.start = _Method(self._start)

    def _add(self, requests: list[Any], kwargs: dict[str, Any], kv: Any = None) -> Any:
        fut = asyncio.get_running_loop().create_future()
        if not self.alive:
            fut.set_exception(_Died("dead"))
        else:
            self.added.append(requests[0][0])
            self.pending.append(fut)
        return fut

    def answer(self) -> None:
        for fut in self.pending:
            fut.set_result(("ok", [], False))
        self.pending.clear()

    async def _outputs_gen(self) -> Any:
        while True:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            fut = asyncio.get_running_loop().create_future()
            fut.set_result(item)
            yield fut

    def _outputs(self) -> Any:
        return self._outputs_gen()

    async def _start(self) -> dict[str, Any]:
        await asyncio.sleep(3600)  # never comes back within a test
        return {}

    def emit(self, rid: str, tokens: list[int], finished: bool = False) -> None:
        out = CompletionOutput(0, token_ids=list(tokens), delta_token_ids=list(tokens),
                               finish_reason="length" if finished else None)  # fmt: skip
        self.queue.put_nowait([RequestOutput(rid, None, [1, 2], [out], finished=finished)])

    def die(self, stream: bool = True) -> None:
        """The process is gone: pending adds fail; the output stream breaks (after what it already
        holds), or later (``break_stream``) when ``stream`` is False."""
        self.alive = False
        for fut in self.pending:
            fut.set_exception(_Died("dead"))
        self.pending.clear()
        if stream:
            self.break_stream()

    def break_stream(self) -> None:
        self.queue.put_nowait(_Died("stream broke"))


def _engine() -> tuple[ClusterEngine, list[FakeActor]]:
    actors = [FakeActor(), FakeActor()]
    info = {"max_model_len": 64, "vocab_size": 100, "block_size": 16, "block_bytes": 1024}
    handles = [ReplicaHandle(i, "both", a, dict(info)) for i, a in enumerate(actors)]
    return ClusterEngine(handles, make_router("round_robin", 2), None, ClusterMetrics("m", ["both", "both"])), actors


def _count(metric: Any) -> float:
    return metric.labels(model_name="m")._value.get()


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def _params() -> SamplingParams:
    return SamplingParams(max_tokens=4, temperature=0.0)


def test_an_add_lost_after_the_first_token_fails_instead_of_running_twice() -> None:
    async def main() -> None:
        engine, (a0, a1) = _engine()
        engine.start()
        stream = RequestStream()
        add = asyncio.ensure_future(engine.add_requests([("r0", [1, 2], _params())], stream))
        await _settle()
        assert a0.added == ["r0"]
        a0.emit("r0", [7])  # the first token came on the stream before the add's reply ...
        await _settle()
        a0.die()  # ... which is lost with the replica
        with pytest.raises(ReplicaDiedError, match="retry the request"):
            await add
        assert a1.added == []  # not run again on the other replica
        assert _count(engine.metrics.failed) == 1 and _count(engine.metrics.retried) == 0
        assert engine.num_in_flight == 0 and engine.num_seqs_in_flight == 0
        await engine.stop()

    asyncio.run(asyncio.wait_for(main(), 10))


def test_an_add_lost_before_any_output_is_retried_on_the_live_replica() -> None:
    async def main() -> None:
        engine, (a0, a1) = _engine()
        engine.start()
        stream = RequestStream()
        add = asyncio.ensure_future(engine.add_requests([("r0", [1, 2], _params())], stream))
        await _settle()
        a0.die()
        await _settle()
        assert a1.added == ["r0"] and not engine.replicas[0].up
        a1.answer()
        await add
        # While replica 0 is down, the router picks only replica 1.
        more = asyncio.ensure_future(engine.add_requests([("r1", [3], _params()), ("r2", [4], _params())], stream))
        await _settle()
        a1.answer()
        await more
        assert a1.added == ["r0", "r1", "r2"] and a0.added == ["r0"]
        assert _count(engine.metrics.retried) == 1
        for rid in ("r0", "r1", "r2"):
            a1.emit(rid, [5, 6], finished=True)
        got = [out.request_id async for out in stream]
        assert sorted(got) == ["r0", "r1", "r2"]
        await engine.stop()

    asyncio.run(asyncio.wait_for(main(), 10))


def test_a_queued_request_is_retried_and_stale_outputs_are_dropped() -> None:
    async def main() -> None:
        engine, (a0, a1) = _engine()
        engine.start()
        stream = RequestStream()
        add = asyncio.ensure_future(engine.add_requests([("q", [1, 2], _params())], stream))
        await _settle()
        a0.answer()
        await add  # queued on replica 0, nothing sent yet
        # An add to replica 0 ("y"; "x" goes to replica 1) fails: the front end learns of the death
        # from it and retries "q"; an output of "q" that replica 0 had sent before it died comes
        # after that, then its stream breaks.
        other = asyncio.ensure_future(engine.add_requests([("x", [3], _params()), ("y", [4], _params())], RequestStream()))
        await _settle()
        assert a0.added == ["q", "y"] and a1.added == ["x"]
        a0.die(stream=False)
        a0.emit("q", [9])
        a0.break_stream()
        for _ in range(3):
            await _settle()
            a1.answer()
        await other
        assert a1.added == ["x", "y", "q"] and _count(engine.metrics.retried) == 2
        a1.emit("q", [5, 6], finished=True)
        outs = [out async for out in stream]
        # The client sees replica 1's tokens only: the dead replica's [9] never reached it.
        assert [t for o in outs for t in o.outputs[0].delta_token_ids] == [5, 6]
        await engine.stop()

    asyncio.run(asyncio.wait_for(main(), 10))
