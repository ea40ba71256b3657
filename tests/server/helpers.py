"""Helpers for the server tests: a ``tokenmill serve`` subprocess, metrics parsing, error checks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

API_KEY = "test-key"
MODEL_NAME = "tiny"
MAX_BODY_BYTES = 65536
REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A ``tokenmill serve`` subprocess on a free port; ``stop()`` sends SIGTERM."""

    def __init__(self, model_dir: Path, log_path: Path, *extra: str, api_key: str | None = API_KEY) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log_path = log_path
        cmd = [
            sys.executable, "-m", "tokenmill.server", str(model_dir),
            "--port", str(self.port),
            "--served-model-name", MODEL_NAME,
            "--kv-cache-memory", "8MiB",
            "--max-body-bytes", str(MAX_BODY_BYTES),
            "--log-level", "warning",
            *extra,
        ]  # fmt: skip
        if api_key:
            cmd += ["--api-key", api_key]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("TOKENMILL_API_KEY", None)
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the server did not become ready in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(f"{self.base_url}/metrics", timeout=5.0).text)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {"name{labels}": value}, plus {"name": value} summed over labels."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
        name = key.split("{", 1)[0]
        if "{" in key:
            out[name] = out.get(name, 0.0) + float(value)
    return out


def metric(metrics: dict[str, float], name: str, **labels: str) -> float:
    """The value of ``name`` whose labels include ``labels`` (summed over the rest)."""
    total = 0.0
    for key, value in metrics.items():
        if not key.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in key for k, v in labels.items()):
            total += value
    return total


def assert_error_shape(resp: httpx.Response, status: int, *, type: str | None = None, code: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if type is not None:
        assert err["type"] == type, err
    if code is not None:
        assert err["code"] == code, err
    return err


# ------------------------------------------------------------ in-process servers


def make_app(model_dir: Path | None, *, settings: dict[str, Any] | None = None, **engine_kw: Any) -> tuple[Any, Any]:
    """A FastAPI app and its ``ServerState`` around a fresh engine (``model_dir`` None: the bundled model)."""
    from tokenmill.engine import Engine, EngineConfig
    from tokenmill.server.app import build_state, create_app
    from tokenmill.server.state import ServerSettings

    kw: dict[str, Any] = dict(kv_cache_memory=4 << 20, max_model_len=64, max_num_seqs=16)
    engine = Engine(EngineConfig(model=None if model_dir is None else str(model_dir), **{**kw, **engine_kw}))
    s: dict[str, Any] = {"served_model_names": [MODEL_NAME], "max_body_bytes": MAX_BODY_BYTES, **(settings or {})}
    state = build_state(engine, ServerSettings(**s))
    return create_app(state), state


class InProcessServer:
    """uvicorn on a thread of this process, on a free loopback port: tests can look inside the engine."""

    def __init__(self, app: Any, state: Any) -> None:
        import threading

        import uvicorn

        self.app, self.state = app, state
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        # log_config=None: records reach the root logger, where tests can see them
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_config=None, lifespan="on", timeout_graceful_shutdown=1
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)

    def __enter__(self) -> InProcessServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the in-process server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def wait_until(cond: Any, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def engine_idle(state: Any) -> bool:
    """No request anywhere: not in the server, not in the scheduler, no KV block owned."""
    engine = state.async_engine.engine
    sched = engine.scheduler
    return (
        state.async_engine.num_in_flight == 0
        and not sched.requests
        and not sched.waiting
        and not sched.running
        and sched.kv.pool.num_used == 0
    )
