"""``/health`` keeps answering within 100 ms while one bad request of each kind is handled.

The server process (``open_server``) trusts request templates, so hostile
templates reach the sandbox, and it takes 8 MiB bodies, so a 4 MB message
reaches the prompt-size check. The bad request is sent from a thread; the
probe polls ``/health`` on a kept-alive connection until it is answered.
Before the fix, a 4 MB prompt held the event loop for 5-9 s while it was
tokenized, and 20,000 prompts for minutes.
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

# kind -> (path, body, expected status and error code)
BAD_REQUESTS: dict[str, tuple[str, dict[str, Any], tuple[int, str | None]]] = {
    "template_bomb": (
        "/v1/chat/completions", {"messages": USER, "chat_template": "{{ 'a' * 100000000 }}"},
        (400, "chat_template_limit"),
    ),
    "template_loop": (
        "/v1/chat/completions",
        {"messages": USER, "chat_template": "{% for i in range(9999) %}{% for j in range(9999) %}{% endfor %}{% endfor %}"},
        (400, "chat_template_limit"),
    ),
    "4mb_message": ("/v1/chat/completions", {"messages": [{"role": "user", "content": BIG}]}, (400, "context_length_exceeded")),
    "4mb_prompt": ("/v1/completions", {"prompt": BIG}, (400, "context_length_exceeded")),
    "20000_prompts": (
        "/v1/completions", {"prompt": [f"prompt {i}" for i in range(20_000)], "max_tokens": 1}, (400, "too_many_prompts")
    ),
    "n_128": ("/v1/completions", {"prompt": "hi", "n": 128, "max_tokens": 64, "ignore_eos": True}, (200, None)),
    "n_128_stream": (
        "/v1/chat/completions",
        {"messages": USER, "n": 128, "max_tokens": 64, "ignore_eos": True, "stream": True},
        (200, None),
    ),
}  # fmt: skip


def _probe_while(server: ServerProcess, path: str, body: dict[str, Any]) -> tuple[list[float], tuple[int, str | None]]:
    """Send ``body`` from a thread; poll /health until it is answered. Returns the latencies and its outcome."""
    done = threading.Event()
    status: list[tuple[int, str | None]] = []

    def fire() -> None:
        try:
            with httpx.Client(base_url=server.base_url, timeout=120.0) as c:
                if body.get("stream"):
                    with c.stream("POST", path, json={"model": MODEL_NAME, **body}) as resp:
                        for _ in resp.iter_bytes():
                            pass
                        status.append((resp.status_code, None))
                else:
                    resp = c.post(path, json={"model": MODEL_NAME, **body})
                    code = resp.json()["error"]["code"] if resp.status_code != 200 else None
                    status.append((resp.status_code, code))
        finally:
            done.set()

    latencies: list[float] = []
    with httpx.Client(base_url=server.base_url, timeout=10.0) as probe:
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
    assert len(status) == 1
    return sorted(latencies), status[0]


@pytest.mark.parametrize("kind", sorted(BAD_REQUESTS))
def test_health_answers_while_a_bad_request_is_handled(open_server: ServerProcess, kind: str) -> None:
    path, body, expected = BAD_REQUESTS[kind]
    # A stall the request causes shows every time; a test machine busy with other
    # processes can delay one probe: the slowest probe of the better of two runs counts.
    runs = []
    for _ in range(2):
        latencies, outcome = _probe_while(open_server, path, body)
        assert outcome == expected, (kind, outcome)
        runs.append(latencies)
        if latencies[-1] < 0.1:
            break
    best = min(runs, key=lambda lat: lat[-1])
    assert best[-1] < 0.1, f"{kind}: slowest /health " + ", ".join(
        f"{lat[-1] * 1000:.0f} ms of {len(lat)} (p50 {lat[len(lat) // 2] * 1000:.1f} ms)" for lat in runs
    )
