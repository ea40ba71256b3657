"""Adapters laid out for one ops backend, and which rows of a forward pass run which one.

``PreparedAdapter`` holds a loaded adapter (``adapter.AdapterWeights``) in the
form the model's ops want: the torch reference reads the plain ``[r, in]`` /
``[out, r]`` matrices; the CPU kernel reads 16-wide panels (the dense GEMM's
layout) through one row of addresses per layer (``csrc/lora.cpp``), which
the adapter keeps alive with the panels.

``LoraBatch`` is built once per forward pass: the rows of each adapter of the
batch, grouped adapter after adapter (``rows``, ``offsets``), and every
adapter's address rows stacked per linear layer, so that each of the
decoder's linear layers costs one kernel call for all adapters together,
and the layers no adapter of the batch touches cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokenmill.core.lora import LoRARequest
from tokenmill.lora.adapter import LINEAR_KEYS, AdapterWeights
from tokenmill.model.backend import TorchOps, interleave_gate_up, pack_panels

# one row of the kernel's table: A, R, in, dtype, parts, then 5 fields per part (3 at most)
TABLE_FIELDS = 20
_KEY_INDEX = {k: i for i, k in enumerate(LINEAR_KEYS)}
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1}


@dataclass(slots=True)
class PreparedAdapter:
    """An adapter ready for one model's ops."""

    lora: LoRARequest
    ops: TorchOps
    keys: frozenset[tuple[int, str]]  # the (layer, linear layer) pairs it adapts
    rank: int
    weights: AdapterWeights | None = None  # the plain matrices (the reference's form)
    table: torch.Tensor | None = None  # int64 [layers * 4, TABLE_FIELDS] (CPU kernel only)
    _keep: list[torch.Tensor] = field(default_factory=list)  # the panels ``table`` points into

    @property
    def nbytes(self) -> int:
        plain = self.weights.nbytes if self.weights is not None else 0
        return plain + sum(t.numel() * t.element_size() for t in self._keep)


def prepare_adapter(lora: LoRARequest, weights: AdapterWeights, ops: TorchOps, num_layers: int) -> PreparedAdapter:
    """Lay ``weights`` out for ``ops`` (panels and an address table for the CPU kernel)."""
    prepared = PreparedAdapter(lora, ops, frozenset(weights.modules), weights.rank)
    if not ops.lora_kernel:
        prepared.weights = weights
        return prepared
    table = torch.zeros(num_layers * len(LINEAR_KEYS), TABLE_FIELDS, dtype=torch.int64)
    keep: list[torch.Tensor] = []
    for (layer, key), module in weights.modules.items():
        a = pack_panels(module.a)
        keep.append(a)
        row = [a.data_ptr(), module.rank, module.in_features, _DTYPE_CODE[module.a.dtype], len(module.parts)]
        for part in module.parts:
            b = pack_panels(part.b)
            keep.append(b)
            row += [b.data_ptr(), part.rank, part.h_offset, part.out_offset, part.out_features]
        table[layer * len(LINEAR_KEYS) + _KEY_INDEX[key], : len(row)] = torch.tensor(row, dtype=torch.int64)
    prepared.table = table
    prepared._keep = keep  # the plain matrices are dropped: the kernel reads only the panels
    return prepared


class LoraBatch:
    """The adapters of one forward pass and the rows each of them runs on.

    ``segments`` are ``(slot, first row, rows)`` runs: a sequence's rows are
    contiguous in the flattened batch; ``slot`` indexes ``adapters``.
    """

    def __init__(
        self,
        adapters: list[PreparedAdapter],
        segments: list[tuple[int, int, int]],
        device: torch.device,
    ) -> None:
        self.adapters = adapters
        per_slot: list[list[int]] = [[] for _ in adapters]
        for slot, start, n in segments:
            per_slot[slot].extend(range(start, start + n))
        counts = [len(r) for r in per_slot]
        offsets = [0]
        for c in counts:
            offsets.append(offsets[-1] + c)
        self.rows = torch.tensor([r for rs in per_slot for r in rs], dtype=torch.int64, device=device)
        self.offsets = torch.tensor(offsets, dtype=torch.int64)
        self.slot_rows = [self.rows[offsets[s] : offsets[s + 1]] for s in range(len(adapters))]
        self._touched = frozenset().union(*(a.keys for a in adapters))
        self._tables: list[torch.Tensor] | None = None
        if adapters and all(a.table is not None for a in adapters):
            stacked = torch.stack([a.table for a in adapters], dim=1)  # type: ignore[misc]
            self._tables = list(stacked.unbind(0))  # per (layer, key): [adapters, TABLE_FIELDS]

    def touches(self, layer: int, key: str) -> bool:
        """Whether an adapter of the batch adapts linear layer ``key`` of ``layer``."""
        return (layer, key) in self._touched

    def table(self, layer: int, key: str) -> torch.Tensor:
        """The CPU kernel's address rows of every adapter for one linear layer."""
        assert self._tables is not None, "adapters were not prepared for the CPU kernel"
        return self._tables[layer * len(LINEAR_KEYS) + _KEY_INDEX[key]]

    def apply_reference(self, y: torch.Tensor, x: torch.Tensor, layer: int, key: str, inter: int = 0) -> None:
        """``lora_apply`` in torch: each adapter of the batch on its rows (fp32 accumulation)."""
        for slot, adapter in enumerate(self.adapters):
            assert adapter.weights is not None, "adapters were prepared for the CPU kernel"
            module = adapter.weights.modules.get((layer, key))
            rows = self.slot_rows[slot]
            if module is None or rows.numel() == 0:
                continue
            h = x.index_select(0, rows).float() @ module.a.float().T
            delta = torch.zeros(rows.numel(), y.shape[1], dtype=torch.float32, device=y.device)
            for p in module.parts:
                delta[:, p.out_offset : p.out_offset + p.out_features] = (
                    h[:, p.h_offset : p.h_offset + p.rank] @ p.b.float().T
                )
            if inter:
                delta = interleave_gate_up(delta.T.contiguous()).T
            y.index_copy_(0, rows, (y.index_select(0, rows).float() + delta).to(y.dtype))
