"""Which ``Host`` headers the server answers to: protection against DNS rebinding.

A server on loopback without an API key trusts whoever can reach it, which
should be local programs only. A web page can reach it too: its script
fetches ``http://evil.example:8000/v1/...`` after ``evil.example`` has been
re-pointed at 127.0.0.1, and the browser sends the request to the local
server, with ``Host: evil.example:8000``. So such a server answers only to
loopback names with its own port (``localhost``, ``127.0.0.1``, ``[::1]``),
or to none (HTTP/1.0). ``--allowed-hosts`` names others (``api.example.com``,
``*.example.com``, ``name:port``; ``*``: any) and turns the check on for any
server. A server with an API key, or one listening beyond loopback, checks
nothing unless given ``--allowed-hosts``.

Pure standard library: ``tokenmill serve`` imports it to parse its flags.
"""

from __future__ import annotations

_LOOPBACK_BINDS = frozenset({"127.0.0.1", "::1", "[::1]", "localhost"})
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def loopback_hosts(port: int) -> list[str]:
    return [f"{name}:{port}" for name in _LOOPBACK_NAMES]


def allowed_hosts_for(bind_host: str, port: int, *, api_key: str | None, flag: str | None) -> list[str] | None:
    """The ``Host`` patterns a server takes, from how it listens and ``--allowed-hosts``; None: any."""
    if flag is not None:
        names = [h.strip() for h in flag.split(",") if h.strip()]
        return None if "*" in names else names
    if api_key or bind_host.lower() not in _LOOPBACK_BINDS:
        return None
    return loopback_hosts(port)


def split_host(value: str) -> tuple[str, int | None] | None:
    """``"Name:8000"`` -> ``("name", 8000)``; ``"[::1]"`` -> ``("[::1]", None)``; None if malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[: end + 1], value[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:] if rest else None
    else:
        name, sep, port_text = value.partition(":")
        if not sep:
            port_text = None
    if not name or (port_text is not None and not (port_text.isdigit() and len(port_text) <= 5)):
        return None
    return name, None if port_text is None else int(port_text)


def host_allowed(header: str | None, allowed: list[str]) -> bool:
    """Whether a request's ``Host`` header (None: absent) matches one of the ``allowed`` patterns."""
    if header is None:
        return True
    host = split_host(header)
    if host is None:
        return False
    name, port = host
    for pattern in allowed:
        if pattern == "*":
            return True
        wildcard = pattern.startswith("*.")
        want = split_host(pattern[1:] if wildcard else pattern)  # "*.example.com" -> ".example.com"
        if want is None:
            continue
        want_name, want_port = want
        if want_port is not None and port is not None and port != want_port:
            continue
        if name.endswith(want_name) if wildcard else name == want_name:
            return True
    return False
