"""Timed batched greedy ``generate`` with Hugging Face transformers; runs in tokenmill's venv.

Job on stdin: ``{"model_dir", "dtype", "prompts", "output_len"}`` (prompts of
equal length, so no padding is needed). Prints ``TOKENMILL_RESULT {"seconds",
"tokens"}``. A short warm-up with the same batch width runs first.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    from tokenmill.bench.peers._venv import RESULT_PREFIX

    job = json.loads(sys.stdin.read())
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        job["model_dir"], dtype=getattr(torch, job["dtype"])
    )
    model.eval()
    model.generation_config.eos_token_id = None  # exactly output_len tokens, like ignore_eos
    ids = torch.tensor(job["prompts"])
    mask = torch.ones_like(ids)
    kw = dict(do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids[:, :8], max_new_tokens=4, attention_mask=mask[:, :8], **kw)  # warm-up
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=job["output_len"], attention_mask=mask, **kw)
        seconds = time.perf_counter() - t0
    tokens = out[:, ids.shape[1] :].tolist()
    print(RESULT_PREFIX + json.dumps({"seconds": seconds, "tokens": tokens}), flush=True)


if __name__ == "__main__":
    main()
