"""Running a peer engine in its own virtual environment, from tokenmill's process.

``scripts/setup_peers.sh`` installs each peer into
``${TOKENMILL_CACHE:-~/.cache/tokenmill}/peers/<name>-venv`` and, once the
install imports cleanly, writes ``tokenmill-peer.json`` into the venv. The peer
modules check for that stamp, then run one of the runner scripts beside this
file with the venv's python: the runner reads a JSON job on stdin, measures,
and prints one line ``TOKENMILL_RESULT {...}`` on stdout. Peers never import
tokenmill, and tokenmill never imports them: their pinned dependencies (torch
builds, transformers versions) stay out of tokenmill's environment.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

RESULT_PREFIX = "TOKENMILL_RESULT "
RUNNER_DIR = Path(__file__).resolve().parent
SETUP_HINT = "run scripts/setup_peers.sh"


def peers_dir() -> Path:
    """Where the peer venvs and their converted checkpoints live (read at call time, so tests can move it)."""
    if "TOKENMILL_PEERS_DIR" in os.environ:
        return Path(os.environ["TOKENMILL_PEERS_DIR"])
    cache = Path(os.environ.get("TOKENMILL_CACHE", Path.home() / ".cache" / "tokenmill"))
    return cache / "peers"


def venv_dir(name: str) -> Path:
    return peers_dir() / f"{name}-venv"


def venv_python(name: str) -> Path:
    return venv_dir(name) / "bin" / "python"


def stamp(name: str) -> dict[str, Any] | None:
    """The setup script's record of a finished install, or None when there is none."""
    path = venv_dir(name) / "tokenmill-peer.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def missing(name: str) -> str | None:
    """Why the peer's venv cannot be used (None when it is installed and was verified by the setup)."""
    if not venv_python(name).exists():
        return f"no {name} venv at {venv_dir(name)} ({SETUP_HINT})"
    if stamp(name) is None:
        return f"{name} venv at {venv_dir(name)} is incomplete: no tokenmill-peer.json ({SETUP_HINT})"
    return None


# Set by tokenmill's own import (tokenmill/__init__.py) for tokenmill's OpenMP
# threads; a peer inheriting it would run with sleeping OpenMP waiters instead of
# its own defaults (measured: llama.cpp batch-1 decode at half speed).
TOKENMILL_ENV_DEFAULTS = ("OMP_WAIT_POLICY",)


def _launch_environ() -> dict[str, str] | None:
    """The environment this process was started with (Linux), before any import changed ``os.environ``."""
    try:
        raw = Path("/proc/self/environ").read_bytes()
    except OSError:
        return None
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def peer_environ(extra: dict[str, str] | None = None) -> dict[str, str]:
    """``os.environ`` for a peer: what the user set stays, what tokenmill set for itself goes."""
    env = dict(os.environ)
    launch = _launch_environ() or {}
    for key in TOKENMILL_ENV_DEFAULTS:
        if key in launch:
            env[key] = launch[key]
        else:
            env.pop(key, None)
    return env | (extra or {})


def run_runner(
    name: str, script: str, job: dict[str, Any], env: dict[str, str] | None = None, timeout: float = 3600
) -> dict[str, Any]:
    """Run ``script`` (a file beside this module) in the peer's venv with ``job`` on stdin; return its result."""
    proc = subprocess.run(
        # -P: do not put the runner's folder on sys.path, where tokenmill's
        # ``vllm.py`` would shadow the real ``vllm`` package.
        [str(venv_python(name)), "-P", str(RUNNER_DIR / script)],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        timeout=timeout,
        # Run from the cache folder: a runner started from the repo root would
        # otherwise see the repo on sys.path (harmless, but not what users get).
        cwd=peers_dir(),
        env=peer_environ(env),
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    raise RuntimeError(f"{name} runner {script} failed (exit {proc.returncode}):\n{tail}")
