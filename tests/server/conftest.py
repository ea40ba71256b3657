"""Fixtures for the server tests: a real ``tokenmill serve`` process and its clients.

The process is started once per session (``python -m tokenmill.server``,
the same entry point as ``tokenmill serve``) on a free loopback port, on the
tiny random-weight Llama from ``tests/conftest.py``, with an API key and a
small body limit so that the error tests need no second server; a second one
(``open_server``) runs as ``tokenmill serve`` does by default, without a key.
Tests that need a server of their own (the SIGTERM drain) start a
``ServerProcess``; those that look inside the engine run an ``InProcessServer``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.server.helpers import API_KEY, ServerProcess


@pytest.fixture(scope="session")
def server_model_dir(tiny_model_dir: Any) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="session")
def server(server_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(server_model_dir, tmp_path_factory.mktemp("server") / "server.log")
    proc.wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def openai_client(server: ServerProcess) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60.0)


@pytest.fixture(scope="session")
def open_server(server_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server as ``tokenmill serve`` starts by default: loopback, no API key (so the Host check is on).

    It trusts request chat templates and takes 8 MiB bodies, so that hostile
    templates and huge prompts reach the limits behind those two gates.
    """
    proc = ServerProcess(
        server_model_dir, tmp_path_factory.mktemp("open-server") / "server.log",
        "--trust-request-chat-template", "--chat-template-timeout", "1", "--max-body-bytes", "8MiB",
        api_key=None,
    )  # fmt: skip
    proc.wait_ready()
    yield proc
    proc.stop()
