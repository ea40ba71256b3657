"""LoRA in the model's forward pass for bf16 and int8 weights: the compiled kernel path
(fused-layout gate/up, bf16 adapters) against the torch reference, and a batch whose base
rows are exactly the base model's."""

from __future__ import annotations

import pytest
import torch

from tokenmill.core.lora import LoRARequest
from tokenmill.lora.manager import LoraManager
from tokenmill.model import kernels
from tokenmill.model.attention import AttentionMetadata, kv_cache_shape
from tokenmill.model.loader import load_model

pytestmark = pytest.mark.skipif(not kernels.cpu_kernels_available(), reason="the CPU kernels could not be built")


def forward(model, ids: list[list[int]], lora_batch) -> torch.Tensor:  # noqa: ANN001
    """Logits of the last token of each sequence, all prefilled in one forward pass."""
    cfg, bs = model.config, 8
    flat = [t for s in ids for t in s]
    starts = [0]
    for s in ids:
        starts.append(starts[-1] + len(s))
    blocks_per = [(len(s) + bs - 1) // bs for s in ids]
    kv = [torch.zeros(kv_cache_shape(sum(blocks_per), bs, cfg.num_kv_heads, cfg.head_dim), dtype=model.dtype)
          for _ in range(cfg.num_layers)]  # fmt: skip
    tables, first = [], 0
    for n in blocks_per:
        tables.append(list(range(first, first + n)) + [0] * (max(blocks_per) - n))
        first += n
    pos = torch.tensor([p for s in ids for p in range(len(s))])
    seq = torch.repeat_interleave(torch.arange(len(ids)), torch.tensor([len(s) for s in ids]))
    table = torch.tensor(tables, dtype=torch.int32)
    slots = table[seq, pos // bs].long() * bs + pos % bs
    meta = AttentionMetadata(torch.tensor(starts, dtype=torch.int32), torch.tensor([len(s) for s in ids], dtype=torch.int32),
                             table, slots, max(len(s) for s in ids), max(len(s) for s in ids))  # fmt: skip
    hidden = model(torch.tensor(flat), pos, kv, meta, lora_batch)
    return model.compute_logits(hidden[torch.tensor(starts[1:]) - 1]).float()


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_kernel_and_reference_agree(dtype, lora_base, peft_adapters) -> None:
    model, cfg = load_model(lora_base, dtype=dtype)
    ids = [[5, 17, 33, 91, 120, 7, 8, 250, 19, 40], [200, 3, 44, 45, 46, 47], [9, 9, 300, 301, 302, 303, 310]]
    loras = [LoRARequest(n, i + 1, str(p)) for i, (n, p) in enumerate(peft_adapters.items())]
    segments = [(loras[0], 0, 10), (loras[2], 16, 7)]  # the middle sequence runs the base model
    got = {}
    for backend in ("cpu_kernels", "torch"):
        model.set_backend(backend)
        manager = LoraManager(model, cfg, max_loras=3, max_rank=16)
        got[backend] = forward(model, ids, manager.batch(segments, model.device))
        got[backend + "-base"] = forward(model, ids, None)
    tol = dict(atol=0.15, rtol=0.05)
    torch.testing.assert_close(got["cpu_kernels"], got["torch"], **tol)
    for backend in ("cpu_kernels", "torch"):
        assert torch.equal(got[backend][1], got[backend + "-base"][1])  # the base row is the base model's
        assert (got[backend][[0, 2]] - got[backend + "-base"][[0, 2]]).abs().max() > 1.0  # adapters change logits
