"""``/health`` keeps answering within 100 ms while one bad request of each kind is handled.

The server process (``open_server``) trusts request templates, so hostile
templates reach the sandbox, and it takes 8 MiB bodies, so a 4 MB message
reaches the prompt-size check. The bad request is sent from a thread; the
probe polls ``/health`` on a kept-alive connection until it is answered.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest

from tests.server.helpers import MODEL_NAME, ServerProcess

USER = [{"role": "user", "content": "hello"}]
BIG = "In the beginning " * 250_000  # ~4 MB

BAD_REQUESTS: dict[str, tuple[str, dict[str, Any], set[int]]] = {
    "template_bomb": ("/v1/chat/completions", {"messages": USER, "chat_template": "{{ 'a' * 100000000 }}"}, {400}),
    "template_loop": (
        "/v1/chat/completions",
        {"messages": USER, "chat_template": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"},
        {400},
    ),
    "4mb_message": ("/v1/chat/completions", {"messages": [{"role": "user", "content": BIG}]}, {400}),
    "4mb_prompt": ("/v1/completions", {"prompt": BIG}, {400}),
    "20000_prompts": ("/v1/completions", {"prompt": [f"prompt {i}" for i in range(20_000)], "max_tokens": 1}, {400}),
    "n_128": ("/v1/completions", {"prompt": "hi", "n": 128, "max_tokens": 64, "ignore_eos": True}, {200}),
    "n_128_stream": (
        "/v1/chat/completions",
        {"messages": USER, "n": 128, "max_tokens": 64, "ignore_eos": True, "stream": True},
        {200},
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_REQUESTS))
def test_health_answers_while_a_bad_request_is_handled(open_server: ServerProcess, kind: str) -> None:
    path, body, expected = BAD_REQUESTS[kind]
    done = threading.Event()
    status: list[int] = []

    def fire() -> None:
        try:
            with httpx.Client(base_url=open_server.base_url, timeout=120.0) as c:
                if body.get("stream"):
                    with c.stream("POST", path, json={"model": MODEL_NAME, **body}) as resp:
                        for _ in resp.iter_bytes():
                            pass
                        status.append(resp.status_code)
                else:
                    status.append(c.post(path, json={"model": MODEL_NAME, **body}).status_code)
        finally:
            done.set()

    latencies: list[float] = []
    with httpx.Client(base_url=open_server.base_url, timeout=10.0) as probe:
        assert probe.get("/health").status_code == 200  # connection open before the bad request
        thread = threading.Thread(target=fire)
        thread.start()
        min_end = time.monotonic() + 0.5
        while not done.is_set() or time.monotonic() < min_end:
            t0 = time.perf_counter()
            resp = probe.get("/health")
            latencies.append(time.perf_counter() - t0)
            assert resp.status_code == 200
            time.sleep(0.01)
        thread.join()
    assert status and status[0] in expected, (kind, status)
    latencies.sort()
    assert latencies[-1] < 0.1, f"{kind}: slowest /health {latencies[-1] * 1000:.0f} ms of {len(latencies)}; " \
        f"p50 {latencies[len(latencies) // 2] * 1000:.1f} ms"
