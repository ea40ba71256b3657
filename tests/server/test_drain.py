"""SIGTERM drains: new requests get 503, in-flight ones finish or are aborted at the deadline, exit 0."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server.helpers import MODEL_NAME, ServerProcess, assert_error_shape

NUM_STREAM, NUM_PLAIN = 24, 8


async def _stream(client: httpx.AsyncClient, body: dict[str, Any]) -> str:
    """'done', 'aborted' or an unexpected outcome, for one streamed request."""
    reason = None
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
        if resp.status_code != 200:
            return f"http {resp.status_code}"
        events = []
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
        assert events[-1] == "[DONE]", events[-3:]
        for ev in events[:-1]:
            obj = json.loads(ev)
            if "error" in obj:
                assert obj["error"]["code"] == "aborted", obj
                return "aborted"
            for c in obj["choices"]:
                reason = c.get("finish_reason") or reason
    return "done" if reason == "length" else f"finish {reason}"


async def _plain(client: httpx.AsyncClient, body: dict[str, Any]) -> str:
    resp = await client.post("/v1/completions", json=body)
    if resp.status_code == 200:
        return "done" if resp.json()["choices"][0]["finish_reason"] == "length" else "finish?"
    if resp.status_code == 503 and resp.json()["error"]["code"] == "aborted":
        return "aborted"
    return f"http {resp.status_code}"


def test_sigterm_drains_and_exits_zero(server_model_dir: Path, tmp_path: Path) -> None:
    # One sequence at a time and one decode step per plan: the queued work
    # takes far longer than the grace period, so some requests finish and
    # the rest are aborted at the deadline.
    srv = ServerProcess(
        server_model_dir, tmp_path / "server.log",
        "--max-num-seqs", "1", "--max-decode-steps", "1", "--drain-timeout", "3", "--log-level", "info",
        api_key=None,
    )  # fmt: skip
    try:
        srv.wait_ready()
        body = {"model": MODEL_NAME, "prompt": "drain me", "max_tokens": 240, "ignore_eos": True}

        async def main() -> tuple[list[str], httpx.Response]:
            limits = httpx.Limits(max_connections=100)
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=60.0, limits=limits) as client:
                tasks = [asyncio.ensure_future(_stream(client, body)) for _ in range(NUM_STREAM)]
                tasks += [asyncio.ensure_future(_plain(client, body)) for _ in range(NUM_PLAIN)]
                deadline = time.monotonic() + 30
                while True:  # every request is in the engine before the signal
                    m = await client.get("/metrics")
                    if "tokenmill_num_requests_in_flight" in m.text:
                        inflight = [ln for ln in m.text.splitlines() if ln.startswith("tokenmill_num_requests_in_flight")]
                        if float(inflight[0].rsplit(" ", 1)[1]) == NUM_STREAM + NUM_PLAIN:
                            break
                    assert time.monotonic() < deadline, "requests did not all arrive"
                    await asyncio.sleep(0.02)
                srv.proc.send_signal(signal.SIGTERM)
                while True:  # the signal is handled asynchronously: wait for the drain to begin
                    late = await client.post("/v1/completions", json={**body, "max_tokens": 1})
                    if late.status_code == 503:
                        break
                    await asyncio.sleep(0.01)
                outcomes = await asyncio.gather(*tasks)
                return list(outcomes), late

        try:
            outcomes, late = asyncio.run(main())
        except Exception as exc:
            raise AssertionError(f"{type(exc).__name__}: {exc}; server log:\n{srv.log()}") from exc
        assert_error_shape(late, 503, type="service_unavailable", code="draining")
        rc = srv.proc.wait(30)
        assert rc == 0, srv.log()
        assert set(outcomes) <= {"done", "aborted"}, outcomes
        assert outcomes.count("done") >= 1, outcomes
        assert outcomes.count("aborted") >= 1, outcomes
    finally:
        srv.stop()


@pytest.mark.parametrize("endpoint", ["/health", "/v1/models"])
def test_drain_refuses_with_503_in_process(server_model_dir: Path, endpoint: str) -> None:
    from starlette.testclient import TestClient

    from tokenmill.engine import Engine, EngineConfig
    from tokenmill.server.app import build_state, create_app
    from tokenmill.server.state import ServerSettings

    engine = Engine(EngineConfig(model=str(server_model_dir), kv_cache_memory=1 << 20, max_model_len=64))
    state = build_state(engine, ServerSettings(served_model_names=[MODEL_NAME]))
    with TestClient(create_app(state)) as client:
        assert client.get(endpoint).status_code == 200
        state.draining = True
        assert_error_shape(client.get(endpoint), 503, code="draining")  # type: ignore[arg-type]
        assert client.get("/metrics").status_code == 200  # the drain can be watched
