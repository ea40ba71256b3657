"""Timed batched greedy generation with vLLM's CPU build; runs in the vllm venv.

Job on stdin: ``{"model_dir", "dtype", "prompts", "output_len"}``. Prints
``TOKENMILL_RESULT {"seconds", "tokens", ...}``.

The whole job goes to one ``LLM.generate`` call (vLLM batches it itself, with
``max_num_seqs`` = number of prompts), as token ids, greedy, ``ignore_eos`` and
``min_tokens`` = ``max_tokens`` = ``output_len``, no detokenization (the other
systems in the benchmark return token ids too). A short warm-up with the same
batch width runs first. Threads and KV cache size come from vLLM's CPU
environment variables, which the calling process sets.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

RESULT_PREFIX = "TOKENMILL_RESULT "


def main() -> None:
    job = json.loads(sys.stdin.read())
    # This file sits beside tokenmill's peer module ``vllm.py``: with its folder
    # on sys.path (python run without -P) ``import vllm`` would find that one.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    # Imported here, not at module level: vLLM starts its engine core in a
    # spawned process that re-imports this file, and only the guarded entry
    # point below may start work.
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts: list[list[int]] = job["prompts"]
    output_len: int = job["output_len"]
    llm = LLM(
        model=job["model_dir"],
        dtype=job["dtype"],
        max_model_len=max(len(p) for p in prompts) + output_len,
        max_num_seqs=len(prompts),
        seed=0,
    )

    def run(batch: list[list[int]], n: int) -> list[list[int]]:
        params = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True, detokenize=False)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    run([p[:8] for p in prompts], 4)  # warm-up: same batch width, short
    t0 = time.perf_counter()
    tokens = run(prompts, output_len)
    seconds = time.perf_counter() - t0
    result = {"seconds": seconds, "tokens": tokens, "vllm": vllm.__version__, "ld_preload": os.environ.get("LD_PRELOAD")}
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# vLLM spawns worker processes that import this module again; without the guard
# each of them would start another engine.
if __name__ == "__main__":
    main()
