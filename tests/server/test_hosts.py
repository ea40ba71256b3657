"""DNS-rebinding protection: without an API key, a loopback server takes only loopback Host headers.

A web page on ``evil.example`` whose name re-resolves to 127.0.0.1 can make
the browser send requests to the local server; the ``Host`` header still
names ``evil.example``, and that is what the server checks.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.server.helpers import ServerProcess, assert_error_shape, make_app


def test_loopback_server_without_key_checks_the_host(open_server: ServerProcess) -> None:
    port = open_server.port
    good = [f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "localhost", "127.0.0.1", f"LOCALHOST:{port}"]
    bad = ["evil.example", f"evil.example:{port}", "127.0.0.1:1", f"localhost.evil.example:{port}",
           f"127.0.0.1.nip.io:{port}", f"localhost:{port}0", "[::1"]  # fmt: skip
    with httpx.Client(base_url=open_server.base_url, timeout=10.0) as client:
        for host in good:
            assert client.get("/v1/models", headers={"Host": host}).status_code == 200, host
        for host in bad:
            for path in ("/v1/models", "/health"):
                resp = client.get(path, headers={"Host": host})
                err = assert_error_shape(resp, 421, type="invalid_request_error", code="invalid_host")
                assert "--allowed-hosts" in err["message"], err
            body = {"prompt": "hi", "max_tokens": 1}
            assert client.post("/v1/completions", json=body, headers={"Host": host}).status_code == 421


@pytest.mark.parametrize(
    ("allowed", "host", "ok"),
    [
        (["api.example.com"], "api.example.com", True),
        (["api.example.com"], "api.example.com:8443", True),
        (["api.example.com"], "API.example.com", True),
        (["api.example.com"], "evil.example.com", False),
        (["*.example.com"], "a.b.example.com:1", True),
        (["*.example.com"], "example.com", False),
        (["*.example.com"], "evilexample.com", False),
        (["api.example.com:8443"], "api.example.com:8443", True),
        (["api.example.com:8443"], "api.example.com", True),
        (["api.example.com:8443"], "api.example.com:80", False),
        (["*"], "anything.at.all:1", True),
    ],
)
def test_allowed_hosts(server_model_dir: Path, allowed: list[str], host: str, ok: bool) -> None:
    from starlette.testclient import TestClient

    app, _ = make_app(server_model_dir, settings={"allowed_hosts": allowed})
    with TestClient(app) as client:
        resp = client.get("/health", headers={"Host": host})
        if ok:
            assert resp.status_code == 200, resp.text
        else:
            assert_error_shape(resp, 421, code="invalid_host")


def test_allowed_hosts_flag() -> None:
    from tokenmill.server.hosts import allowed_hosts_for

    assert allowed_hosts_for("127.0.0.1", 8000, api_key=None, flag=None) == [
        "localhost:8000", "127.0.0.1:8000", "[::1]:8000"
    ]  # fmt: skip
    assert allowed_hosts_for("::1", 9, api_key=None, flag=None) == ["localhost:9", "127.0.0.1:9", "[::1]:9"]
    # An API key protects the server already; a public bind names its own hosts.
    assert allowed_hosts_for("127.0.0.1", 8000, api_key="k", flag=None) is None
    assert allowed_hosts_for("0.0.0.0", 8000, api_key=None, flag=None) is None
    assert allowed_hosts_for("0.0.0.0", 8000, api_key=None, flag="a.example, b.example") == ["a.example", "b.example"]
    assert allowed_hosts_for("127.0.0.1", 8000, api_key=None, flag="*") is None
