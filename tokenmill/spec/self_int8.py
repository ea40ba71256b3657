"""Quantized self-draft: the target's own checkpoint, with int8 weights, drafts for itself.

The draft is the target model loaded again with ``dtype="int8"`` (weight-only,
per-channel, ``model/quant.py``, the packed int8 kernels): the same function up
to rounding, so its guesses are nearly always the target's (high acceptance),
and each draft step reads about a quarter of the bytes of an fp32 target step
(half of a bf16 one). Its activations and KV cache keep the target's dtype (the
int8 kernels take fp32 or bf16 activations): in fp32, only the weights' rounding
separates draft from target, which is what keeps acceptance high. Its KV is a
cache of its own on the target's block tables (``draft_model.py``). Drafting with a
more coarsely quantized copy of the target itself is the idea of QSpec (Zhao et
al., 2024); here the quantization is weight-only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenmill.spec.draft_model import DraftModelProposer


class SelfInt8Proposer(DraftModelProposer):
    def __init__(self, target_path: str | Path, *, target: Any) -> None:
        super().__init__(target_path, target=target, dtype=target.dtype, name="self-int8", quantization="int8")
