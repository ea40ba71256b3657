"""The kernel build's cache directory and lock: a build killed half-way must not block later ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenmill.model import kernels


def test_a_stale_build_lock_is_cleared_and_builds_are_serialized(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch.utils.cpp_extension as ext

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    seen: list[Path] = []

    def fake_load(name: str, build_directory: str, **kw: object) -> None:
        d = Path(build_directory)
        # torch's lock from a killed build is gone before torch looks for it
        assert not (d / "lock").exists()
        seen.append(d)

    monkeypatch.setattr(ext, "load", fake_load)
    kernels._build()  # learn the directory
    (seen[0] / "lock").write_text("")  # what a process killed mid-build leaves
    kernels._build()
    assert seen == [seen[0], seen[0]]
    assert seen[0].parent == tmp_path


def test_the_build_directory_depends_on_where_torch_and_the_sources_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    import torch.utils.cpp_extension as ext

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    seen: list[str] = []
    monkeypatch.setattr(ext, "load", lambda name, **kw: seen.append(name))
    kernels._build()
    monkeypatch.setattr(torch, "__file__", str(tmp_path / "elsewhere" / "torch" / "__init__.py"))
    kernels._build()
    assert seen[0] != seen[1]
