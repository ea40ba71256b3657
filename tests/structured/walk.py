"""Random walks through a grammar's token masks: outputs a grammar allows, with no model.

Each step draws one of the tokens the mask allows (mostly one-character tokens,
so that walks end), and ends where the grammar allows a stop token with
probability ``p_stop``. What the walk writes is exactly what a model's sampler
could have written under the same masks.
"""

from __future__ import annotations

import random
from typing import Any

import torch

STOP = (0, 4)  # the bundled model's EOS ids


def walk(compiler: Any, compiled: Any, tokenizer: Any, rng: random.Random, max_tokens: int = 300,
         p_stop: float = 0.5) -> tuple[str, bool]:  # fmt: skip
    """(decoded text, whether it ended on a stop token)."""
    import xgrammar as xgr

    vocab = compiler.vocab_size
    short = _short_tokens(compiler)
    matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=list(STOP))
    mask = xgr.allocate_token_bitmask(1, vocab)
    shifts = torch.arange(32, dtype=torch.int32)
    out: list[int] = []
    for _ in range(max_tokens):
        matcher.fill_next_token_bitmask(mask, 0)
        allowed = ((mask[0][:, None] >> shifts) & 1).reshape(-1)[:vocab].bool()
        can_stop = bool(allowed[list(STOP)].any())
        allowed[list(STOP)] = False
        if can_stop and (rng.random() < p_stop or not allowed.any()):
            return tokenizer.decode(out), True
        pool = allowed & short
        choice = (pool if pool.any() and rng.random() < 0.9 else allowed).nonzero()[:, 0].tolist()
        token = rng.choice(choice)
        assert matcher.accept_token(token)
        out.append(token)
    return tokenizer.decode(out), False


_SHORT: dict[int, torch.Tensor] = {}


def _short_tokens(compiler: Any) -> torch.Tensor:
    key = id(compiler)
    if key not in _SHORT:
        vocab = compiler.info.decoded_vocab
        _SHORT[key] = torch.tensor(
            [len(b) == 1 and b not in (b" ", b"\n", b"\t", b"\r") for b in vocab[: compiler.vocab_size]]
        )
    return _SHORT[key]
