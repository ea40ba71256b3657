"""Run the app under uvicorn, draining on SIGTERM.

uvicorn alone stops listening on SIGTERM and then waits for open
connections. tokenmill drains instead: new requests (on new or kept-alive
connections) get a 503 in OpenAI's error shape, in-flight requests may finish
within the grace period (``--drain-timeout``), the rest are aborted (a
streamed one gets an error event), and only then does uvicorn shut down. The
process exits 0. A second SIGTERM or SIGINT shuts down at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from types import FrameType
from typing import Any

import uvicorn

from tokenmill.server.app import drain
from tokenmill.server.state import ServerState

logger = logging.getLogger("tokenmill.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._draining = False

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or self._loop is None or not self.started:
            # A second signal, or one before the server is up: stop now.
            super().handle_exit(sig, frame)
            return
        self._draining = True
        # A signal handler runs between two bytecodes of the event loop's own
        # thread; call_soon_threadsafe wakes the selector to start the drain.
        self._loop.call_soon_threadsafe(self._start_drain, signal.Signals(sig).name)

    def _start_drain(self, signame: str) -> None:
        self._drain_task = asyncio.ensure_future(self._drain(signame))

    async def _drain(self, signame: str) -> None:
        timeout = self.state.settings.drain_timeout
        logger.info(
            "%s: draining %d in-flight request(s), up to %.1f s", signame, self.state.async_engine.num_in_flight, timeout
        )
        aborted = await drain(self.state, timeout)
        if aborted:
            logger.warning("drain timeout: aborted %d request(s)", aborted)
        logger.info("drained; shutting down")
        # Not super().handle_exit(): uvicorn would re-raise the signal after
        # shutdown, and the process would die by it instead of exiting 0.
        self.should_exit = True


def run_server(app: Any, state: ServerState, host: str, port: int, *, log_level: str = "info", access_log: bool = False) -> int:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        lifespan="on",
        # After the drain nothing is in flight; this only bounds idle keep-alive closes.
        timeout_graceful_shutdown=5,
    )
    server = DrainingServer(config, state)
    server.run()
    return 0
