"""Backend selection: the torch reference is used, with one warning, when kernels cannot build."""

from __future__ import annotations

import warnings

import pytest
import torch

from tokenmill.model import backend, kernels


def test_failed_build_falls_back_to_torch_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_build() -> None:
        raise RuntimeError("no compiler")

    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setattr(kernels, "_build", broken_build)
    with pytest.warns(RuntimeWarning, match="no compiler"):
        ops = backend.select_ops(torch.device("cpu"), torch.float32)
    assert isinstance(ops, backend.TorchOps) and not isinstance(ops, backend.CpuKernelOps)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second selection is silent
        assert backend.select_ops(torch.device("cpu"), torch.bfloat16).name == "torch"
    with pytest.raises(RuntimeError, match="could not be built"):
        backend.select_ops(torch.device("cpu"), torch.float32, prefer="cpu_kernels")
    # without the kernels the helpers use plain torch
    x = torch.randn(3, 10)
    assert torch.equal(backend.argmax_rows(x), x.argmax(-1))
    assert not backend.sampling_kernel_applies(x)


def test_selection_rules() -> None:
    assert backend.select_ops(torch.device("cpu"), torch.float16).name == "torch"
    assert backend.select_ops(torch.device("cpu"), torch.float32, prefer="torch").name == "torch"
    assert backend.select_ops(torch.device("cpu"), torch.float32, head_dim=512).name == "torch"
    with pytest.raises(ValueError, match="head_dim"):
        backend.select_ops(torch.device("cpu"), torch.float32, "cpu_kernels", head_dim=512)
    with pytest.raises(ValueError, match="backend"):
        backend.select_ops(torch.device("cpu"), torch.float32, prefer="triton")
