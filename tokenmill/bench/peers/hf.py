"""Hugging Face transformers ``generate`` as a peer: greedy, batched, in a fresh process per cell.

It runs in tokenmill's own virtual environment (transformers is a tokenmill
dependency) but in its own process, like every system in the benchmark, so
its memory and threads are its own.
"""

from __future__ import annotations

import sys
from typing import Any

from tokenmill.bench.peers import _venv


def available() -> str | None:
    return None


def generate(
    model_dir: str, dtype: str, prompts: list[list[int]], output_len: int
) -> dict[str, Any]:
    """Run the peer once (warm-up, then the timed job); ``seconds``, ``tokens``, ``peak_memory_mb``."""
    job = {
        "model_dir": str(model_dir),
        "dtype": dtype,
        "prompts": prompts,
        "output_len": output_len,
    }
    return _venv.run_script(sys.executable, _venv.RUNNER_DIR / "hf_runner.py", job)
