"""llama.cpp (through ``llama-cpp-python``, built from source) as a throughput peer.

The checkpoint is converted to GGUF once per (checkpoint, dtype) with the
``convert_hf_to_gguf.py`` that ships in the same llama-cpp-python source tree
(so the writer and the loader agree), and cached under
``<peers dir>/gguf/``. Generation runs in the llamacpp venv
(``llamacpp_runner.py``): every prompt is its own sequence in one context, and
each step decodes one ``llama_batch`` holding all sequences, the way
llama.cpp's own batched example serves several requests, not one request after
another.

dtypes: ``float32`` -> GGUF f32, ``bfloat16`` -> bf16, ``int8`` -> q8_0
(llama.cpp's 8-bit block format: 32 weights share one fp16 scale).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from tokenmill.bench.peers import _venv

NAME = "llamacpp"
THREADS = 2
OUTTYPES = {"float32": "f32", "bfloat16": "bf16", "int8": "q8_0", "q8_0": "q8_0"}
DTYPES = tuple(OUTTYPES)


def available() -> str | None:
    why = _venv.missing(NAME)
    if why:
        return why
    converter = (_venv.stamp(NAME) or {}).get("converter", "")
    if not Path(converter).is_file():
        return f"llama.cpp converter {converter!r} is missing ({_venv.SETUP_HINT})"
    return None


def _checkpoint_key(model_dir: Path) -> str:
    """Identity of a checkpoint directory: its path plus size and mtime of every file the converter reads."""
    h = hashlib.sha256(str(model_dir.resolve()).encode())
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and (f.suffix in {".json", ".safetensors", ".model", ".txt"}):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def gguf_dir(model_dir: str | Path) -> Path:
    """Where the conversions of ``model_dir`` are cached."""
    model_dir = Path(model_dir)
    return _venv.peers_dir() / "gguf" / f"{model_dir.resolve().name}-{_checkpoint_key(model_dir)}"


def gguf_path(model_dir: str | Path, dtype: str) -> Path:
    """The GGUF file for ``model_dir`` in ``dtype``, converting it first unless it is cached."""
    if dtype not in OUTTYPES:
        raise ValueError(f"llama.cpp peer: unsupported dtype {dtype!r} (one of {sorted(OUTTYPES)})")
    model_dir = Path(model_dir)
    outtype = OUTTYPES[dtype]
    out = gguf_dir(model_dir) / f"{outtype}.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write under a temporary name and rename: an interrupted conversion must
    # not leave a truncated file that a later run would take for a cached one.
    tmp = out.with_name(f".{outtype}.{os.getpid()}.gguf")
    job = {
        "converter": (_venv.stamp(NAME) or {})["converter"],
        "model_dir": str(model_dir.resolve()),
        "outfile": str(tmp),
        "outtype": outtype,
    }
    try:
        _venv.run_runner(NAME, "llamacpp_convert.py", job, timeout=3600)
        tmp.rename(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def generate(model_dir: str, dtype: str, prompts: list[list[int]], output_len: int) -> dict[str, Any]:
    """Run the peer once (warm-up, then the timed job); the runner's result: ``seconds``, ``tokens``, ``peak_memory_mb``."""
    job = {"gguf": str(gguf_path(model_dir, dtype)), "prompts": prompts, "output_len": output_len, "threads": THREADS}
    return _venv.run_runner(NAME, "llamacpp_runner.py", job)

