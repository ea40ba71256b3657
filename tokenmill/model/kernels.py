"""Build and load tokenmill's compiled CPU kernels (``csrc/*.cpp``) on first use.

The extension is compiled with ``torch.utils.cpp_extension.load`` for the host
CPU (``-march=native``) into ``$TORCH_EXTENSIONS_DIR`` or
``~/.cache/tokenmill/kernels``; the build directory's name carries a hash of
the source and the CPU's flags so a cache shared between different machines
never loads a binary built for another CPU. Its ops register as
``torch.ops.tokenmill.*``. If it cannot be built (no compiler, ...) callers
fall back to the torch reference after one warning.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = (
    "kernels.cpp",
    "attention.cpp",
    "layer_ops.cpp",
    "gemm.cpp",
    "sampling.cpp",
    "family_ops.cpp",
    "moe.cpp",
    "lora.cpp",
    "registration.cpp",
)
_HEADERS = ("simd.h", "ops.h", "gemm_kernels.h", "kv_quant.h")
_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _build_dir(name: str) -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "tokenmill" / "kernels"
    path = base / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _build() -> None:
    from torch.utils.cpp_extension import load

    h = hashlib.sha256(_cpu_flags().encode() + torch.__version__.encode())
    # The build files name the sources and torch's headers by path: two installs
    # (virtual environments, checkouts) must not share, and rebuild over, one directory.
    h.update(str(_CSRC.resolve()).encode() + str(Path(torch.__file__).resolve()).encode())
    for name in _SOURCES + _HEADERS:
        h.update((_CSRC / name).read_bytes())
    digest = h.hexdigest()[:12]
    name = f"tokenmill_cpu_{digest}"
    build_dir = _build_dir(name)
    with _exclusive(build_dir / "tokenmill.lock"):
        # torch's own build lock is a plain file that a process killed mid-build leaves
        # behind, and every later build then waits on it forever. Holding our lock (the
        # kernel releases it when its holder dies) means no build is running: a torch
        # lock found now is stale.
        (build_dir / "lock").unlink(missing_ok=True)
        load(
            name=name,
            sources=[str(_CSRC / _SOURCES[0])],  # a unity build that includes the others
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` for the block (between processes)."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cpu_kernels_available() -> bool:
    """True once the CPU extension is loaded; builds it on the first call (may take ~30 s)."""
    with _lock:
        if "ok" not in _state:
            try:
                _build()
                _state["ok"] = True
            except Exception as exc:  # noqa: BLE001 - any build failure means "use the reference"
                _state["ok"] = False
                warnings.warn(
                    f"tokenmill CPU kernels could not be built ({type(exc).__name__}: {exc}); "
                    "falling back to the slower torch reference implementation",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return bool(_state["ok"])


def cpu_kernels_loaded() -> bool:
    """True if the extension is already loaded; never starts a build."""
    return bool(_state.get("ok"))


def has_avx512() -> bool:
    """Whether the loaded extension was compiled with AVX-512 and this CPU supports it."""
    return cpu_kernels_available() and bool(torch.ops.tokenmill.has_avx512())
