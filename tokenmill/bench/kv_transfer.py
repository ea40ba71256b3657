"""``tokenmill bench kv-transfer``: prefill-to-decode KV transfer throughput against a memcpy of the same bytes.

Two Ray actor processes each hold a paged KV cache shaped as the model's
(``--model``, the bundled one by default). A transfer is what a handoff
does (``cluster/pd.py``): the source gathers the blocks
(``cluster.kv.export_kv``) into an array that Ray puts in its shared-memory
object store, the destination reads it there and scatters it into its own
cache (``cluster.kv.import_kv``); timed from the export call to the import's
return, as the front end times it for ``tokenmill_kv_transfer_seconds``.
Block ids are scattered over the pools, as a busy cache's are. The
destination checks that the bytes arrived.

In the same run, this process times a ``memcpy`` of the same number of bytes
(``numpy.copyto`` between two preallocated buffers) and a gather plus
scatter within one process (the two copies a transfer cannot avoid), and
prints throughput (GB/s) and the transfer's share of the memcpy's: one
transfer at a time (its latency) and ``--in-flight`` transfers at once (as
many handoffs overlap under load).

    tokenmill bench kv-transfer --sizes-mb 0.25 1 4 16 64 --repeats 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="checkpoint whose KV shape to use (default: the bundled model)")
    parser.add_argument("--dtype", default=None, help="KV dtype (default: the model's)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[0.25, 1.0, 4.0, 16.0, 64.0],
                        help="bytes per transfer, in MB (10^6)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=15, help="timed transfers per size (median reported)")
    parser.add_argument("--in-flight", type=int, default=4, help="transfers at once in the overlapped measurement")
    parser.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: start one here)")
    parser.add_argument("--result-file", default=None, help="write the results as JSON")


class _Holder:
    """A Ray actor with a KV cache: the source or the destination of transfers."""

    def __init__(self, shape: tuple[int, ...], dtype: str, seed: int) -> None:
        import torch

        from tokenmill.cluster.kv import ExportBuffer

        torch.set_num_threads(1)
        g = torch.Generator().manual_seed(seed)
        self.cache = torch.randn(shape, generator=g).to(getattr(torch, dtype))
        self.buffer = ExportBuffer()

    def export(self, ids: list[int]) -> list[Any]:
        return [self.buffer.put(self.cache, ids)]  # as Replica.export_kv answers

    async def take(self, refs: list[Any], ids: list[int]) -> None:
        from tokenmill.cluster.kv import import_kv

        (ref,) = await refs[0]
        import_kv(self.cache, ids, await ref)

    def blocks(self, ids: list[int]) -> Any:
        from tokenmill.cluster.kv import export_kv

        return export_kv(self.cache, ids)


def _shape(args: argparse.Namespace, num_blocks: int) -> tuple[tuple[int, ...], str, int]:
    from tokenmill.engine import resolve_model_path
    from tokenmill.model.attention import kv_cache_shape
    from tokenmill.model.loader import read_model_config

    cfg = read_model_config(resolve_model_path(args.model), args.dtype or "auto")
    dtype = str(cfg.dtype).removeprefix("torch.")
    shape = (cfg.num_layers, *kv_cache_shape(num_blocks, args.block_size, cfg.num_kv_heads, cfg.head_dim))
    import torch

    itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    block_bytes = 2 * cfg.num_layers * args.block_size * cfg.num_kv_heads * cfg.head_dim * itemsize
    return shape, dtype, block_bytes


def run(args: argparse.Namespace) -> int:
    import logging
    import random

    import numpy as np
    import ray
    import torch

    torch.set_num_threads(1)  # as each replica runs (--threads-per-replica 1), and the actors here
    _, dtype, block_bytes = _shape(args, 1)
    most = max(1, max(int(mb * 1e6 / block_bytes) for mb in args.sizes_mb))
    num_blocks = (args.in_flight + 1) * most + 8
    shape, dtype, _ = _shape(args, num_blocks)
    owns = not ray.is_initialized()
    if owns:
        if args.ray_address:
            ray.init(address=args.ray_address, logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
                     object_store_memory=max(256 << 20, 4 * (args.in_flight + 1) * most * block_bytes))  # fmt: skip
    holder = ray.remote(num_cpus=0)(_Holder)
    src, dst = holder.remote(shape, dtype, 1), holder.remote(shape, dtype, 2)
    rng = random.Random(0)
    results = []
    print(f"KV blocks of {block_bytes / 1e3:.1f} kB ({dtype}, shape per block {shape[:2] + shape[3:]}); "
          f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    k = args.in_flight
    print(f"{'size MB':>8} {'blocks':>7} {'transfer ms':>12} {'GB/s':>7} {'memcpy GB/s':>12} {'ratio':>6} "
          f"{f'{k} at once GB/s':>16} {'ratio':>6} {'gather+scatter GB/s':>20}")  # fmt: skip
    for mb in args.sizes_mb:
        n = max(1, int(mb * 1e6 / block_bytes))
        nbytes = n * block_bytes
        times, copies, local, overlapped = [], [], [], []
        a = np.random.default_rng(0).random(nbytes // 8)
        b = np.empty_like(a)
        from tokenmill.cluster.kv import export_kv, import_kv

        here = torch.zeros(shape, dtype=getattr(torch, dtype))
        there = torch.zeros(shape, dtype=getattr(torch, dtype))
        per_block = here[:, :, :1].numel()
        scratch = torch.empty(most * per_block, dtype=here.dtype)

        def gathered(k: int) -> tuple[int, ...]:
            return (shape[0], shape[1], k, *shape[3:])

        for i in range(args.repeats + 2):
            s_ids = rng.sample(range(num_blocks), n)
            d_ids = rng.sample(range(num_blocks), n)
            t0 = time.perf_counter()
            ray.get(dst.take.remote([src.export.remote(s_ids)], d_ids))
            t1 = time.perf_counter()
            np.copyto(b, a)
            t2 = time.perf_counter()
            import_kv(there, d_ids, export_kv(here, s_ids, scratch[: n * per_block].view(gathered(n))))
            t3 = time.perf_counter()
            if i == 2:
                sent, got = ray.get([src.blocks.remote(s_ids), dst.blocks.remote(d_ids)])
                if not np.array_equal(sent, got):
                    raise AssertionError("the destination's blocks differ from the source's")
            ids = [(rng.sample(range(num_blocks), n), rng.sample(range(num_blocks), n)) for _ in range(k)]
            t4 = time.perf_counter()
            ray.get([dst.take.remote([src.export.remote(si)], di) for si, di in ids])
            t5 = time.perf_counter()
            if i >= 2:  # the first two warm the object store and the caches
                times.append(t1 - t0)
                copies.append(t2 - t1)
                local.append(t3 - t2)
                overlapped.append((t5 - t4) / k)
        t, c, g = statistics.median(times), statistics.median(copies), statistics.median(local)
        o = statistics.median(overlapped)
        row = {"size_mb": nbytes / 1e6, "blocks": n, "transfer_ms": t * 1e3, "transfer_gbps": nbytes / t / 1e9,
               "memcpy_gbps": nbytes / c / 1e9, "ratio": c / t, "overlapped_gbps": nbytes / o / 1e9,
               "overlapped_ratio": c / o, "gather_scatter_gbps": nbytes / g / 1e9}  # fmt: skip
        results.append(row)
        print(f"{row['size_mb']:8.2f} {n:7d} {row['transfer_ms']:12.2f} {row['transfer_gbps']:7.2f} "
              f"{row['memcpy_gbps']:12.2f} {row['ratio']:6.2f} {row['overlapped_gbps']:16.2f} "
              f"{row['overlapped_ratio']:6.2f} {row['gather_scatter_gbps']:20.2f}")  # fmt: skip
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.result_file:
        with open(args.result_file, "w") as f:
            json.dump({"block_bytes": block_bytes, "dtype": dtype, "in_flight": k, "results": results,
                       "load_average": load}, f, indent=1)  # fmt: skip
    if owns:
        ray.shutdown()
    return 0
