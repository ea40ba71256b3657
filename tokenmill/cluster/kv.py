"""KV blocks in and out of a paged cache, as numpy arrays that Ray's object store carries.

The model executor keeps every layer's K and V in one tensor
``[layers, 2, blocks, kv_heads, block_size * head_dim]`` (``model/attention.py``).
A transfer gathers the blocks it moves into one contiguous array (one copy),
which Ray puts into its shared-memory object store; the receiving replica
reads it there without a copy (numpy over the shared buffer, on the same
machine) and scatters it into its own cache (one copy). Dtypes numpy lacks
(bfloat16) travel as their bits in an unsigned integer of the same width.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def export_kv(kv_cache: torch.Tensor, block_ids: list[int]) -> np.ndarray:
    """The K and V of ``block_ids`` (every layer) as one contiguous array ``[layers, 2, len(ids), ...]``."""
    ids = torch.tensor(block_ids, dtype=torch.long, device=kv_cache.device)
    blocks = kv_cache.index_select(2, ids)
    if blocks.device.type != "cpu":
        blocks = blocks.cpu()
    return blocks.view(_BITS[blocks.element_size()]).numpy()


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
