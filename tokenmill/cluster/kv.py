"""KV blocks in and out of a paged cache, as numpy arrays that Ray's object store carries.

The model executor keeps every layer's K and V in one tensor
``[layers, 2, blocks, kv_heads, block_size * head_dim]`` (``model/attention.py``).
A transfer gathers the blocks it moves into one contiguous array, which Ray
copies into its shared-memory object store (``ExportBuffer.put``); the
receiving replica reads it there without a copy (numpy over the shared
buffer, on the same machine) and scatters it into its own cache. Three
passes over the bytes in all, against a memcpy's one. The gather goes into a
buffer kept from one export to the next: fresh memory would cost a page
fault per 4 KiB, which on a busy machine took longer than the copy itself.
Dtypes numpy lacks (bfloat16) travel as their bits in an integer of the same
width.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def export_kv(kv_cache: torch.Tensor, block_ids: list[int], out: torch.Tensor | None = None) -> np.ndarray:
    """The K and V of ``block_ids`` (every layer) as one contiguous array ``[layers, 2, len(ids), ...]``,
    gathered into ``out`` (a contiguous tensor of that shape) when given."""
    ids = torch.tensor(block_ids, dtype=torch.long, device=kv_cache.device)
    if out is not None and kv_cache.device.type == "cpu":
        blocks = torch.index_select(kv_cache, 2, ids, out=out)
    else:
        blocks = kv_cache.index_select(2, ids)
        if blocks.device.type != "cpu":
            blocks = blocks.cpu()
    return blocks.view(_BITS[blocks.element_size()]).numpy()


class ExportBuffer:
    """Gathers blocks into a buffer it keeps, and puts them in Ray's object store from there.

    Not for concurrent use: a caller holds it from the gather to the end of ``put``.
    """

    def __init__(self) -> None:
        self._flat: torch.Tensor | None = None

    def put(self, kv_cache: torch.Tensor, block_ids: list[int]) -> Any:
        """An ``ObjectRef`` to the blocks' KV (as ``export_kv`` gives it)."""
        import ray

        shape = (kv_cache.shape[0], kv_cache.shape[1], len(block_ids), *kv_cache.shape[3:])
        n = math.prod(shape)
        flat = self._flat
        if flat is None or flat.numel() < n or flat.dtype != kv_cache.dtype:
            flat = self._flat = torch.empty(n, dtype=kv_cache.dtype)
        out = flat[:n].view(shape)
        return ray.put(export_kv(kv_cache, block_ids, out))


def import_kv(kv_cache: torch.Tensor, block_ids: list[int], data: np.ndarray) -> None:
    """Write ``data`` (from ``export_kv``, as many blocks as ``block_ids``) into those blocks of the cache."""
    want = (kv_cache.shape[0], kv_cache.shape[1], len(block_ids), *kv_cache.shape[3:])
    if tuple(data.shape) != want or data.itemsize != kv_cache.element_size():
        raise ValueError(f"KV of shape {tuple(data.shape)} ({data.itemsize}-byte items) does not fit {want} "
                         f"of {kv_cache.dtype}: the replicas run different models or cache settings")  # fmt: skip
    with warnings.catch_warnings():
        # Ray hands over a read-only view of its shared memory; it is only read here.
        warnings.simplefilter("ignore", UserWarning)
        src = torch.from_numpy(data)
    src = src.view(kv_cache.dtype).to(kv_cache.device, non_blocking=True)
    ids = torch.tensor(block_ids, dtype=torch.long, device=kv_cache.device)
    kv_cache.index_copy_(2, ids, src)


def block_bytes(kv_cache: torch.Tensor) -> int:
    """Bytes one block takes in the cache (every layer, K and V)."""
    return kv_cache[:, :, :1].numel() * kv_cache.element_size()
