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
        return (
            f"{name} venv at {venv_dir(name)} is incomplete: no tokenmill-peer.json ({SETUP_HINT})"
        )
    return None


def run_script(
    python: str | Path,
    script: str | Path,
    job: dict[str, Any],
    env: dict[str, str] | None = None,
    timeout: float = 3600,
    cwd: str | Path | None = None,
) -> dict[str, Any]:
    """Run ``script`` with ``python``, ``job`` as JSON on stdin; return its result line's object.

    The script sees this process's environment plus ``env``.
    The result gains ``peak_memory_mb``: the peak of the script's process tree
    (``process_memory``), sampled while it ran.
    """
    from tokenmill.bench.process_memory import PeakMemorySampler

    # -P: do not put the script's folder on sys.path, where tokenmill's
    # ``vllm.py`` would shadow the real ``vllm`` package.
    proc = subprocess.Popen(
        [str(python), "-P", str(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env=dict(os.environ) | (env or {}),
    )
    with PeakMemorySampler(proc.pid) as sampler:
        try:
            stdout, stderr = proc.communicate(json.dumps(job), timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
            result["peak_memory_mb"] = sampler.peak / 2**20
            return result
    tail = "\n".join((stdout + stderr).splitlines()[-40:])
    raise RuntimeError(f"runner {script} failed (exit {proc.returncode}):\n{tail}")


def run_runner(
    name: str, script: str, job: dict[str, Any], env: dict[str, str] | None = None, timeout: float = 3600
) -> dict[str, Any]:
    """Run ``script`` (a file beside this module) in the peer's venv with ``job`` on stdin; return its result."""
    # Run from the cache folder: a runner started from the repo root would
    # otherwise see the repo on sys.path (harmless, but not what users get).
    return run_script(venv_python(name), RUNNER_DIR / script, job, env, timeout, cwd=peers_dir())
