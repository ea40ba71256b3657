"""Hugging Face transformers ``generate`` as a peer: greedy, batched, no padding needed."""

from __future__ import annotations

import time


def available() -> str | None:
    return None


def generate_seconds(model_dir: str, dtype: str, prompts: list[list[int]], output_len: int) -> float:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model.eval()
    model.generation_config.eos_token_id = None  # exactly output_len tokens, like ignore_eos
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)
    kw = dict(do_sample=False, pad_token_id=0, attention_mask=mask)
    with torch.inference_mode():
        model.generate(ids[:, :8], max_new_tokens=4, **{**kw, "attention_mask": mask[:, :8]})  # warm-up
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=output_len, **kw)
        elapsed = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + output_len
    return elapsed
