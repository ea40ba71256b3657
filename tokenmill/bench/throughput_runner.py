"""One cell of ``tokenmill bench throughput`` for tokenmill itself, in a fresh process.

Run by the benchmark exactly as it runs each peer's runner (``peers._venv.run_script``):
job on stdin ``{"model_dir", "dtype", "prompts", "output_len", "kv_cache_memory"}``,
one line ``TOKENMILL_RESULT {...}`` on stdout with ``seconds`` (the timed job,
prefill included, after a warm-up of the same batch width), ``tokens``,
``cold_start_s`` (engine construction to the first token of a short prompt)
and ``process_start_s`` (this script's first line to that same token, imports
of torch and tokenmill included).
"""

from __future__ import annotations

import time

_T_START = time.perf_counter()

import json  # noqa: E402
import sys  # noqa: E402


def main() -> None:
    from tokenmill.bench.peers._venv import RESULT_PREFIX

    job = json.loads(sys.stdin.read())
    from tokenmill.core.request import SamplingParams
    from tokenmill.llm import LLM

    prompts: list[list[int]] = job["prompts"]
    output_len: int = job["output_len"]
    t0 = time.perf_counter()
    llm = LLM(
        job["model_dir"],
        dtype=job["dtype"],
        kv_cache_memory=job["kv_cache_memory"],
        max_num_seqs=len(prompts),
        max_num_batched_tokens=max(2048, max(len(p) for p in prompts)),
    )
    llm.generate([prompts[0][:4]], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    first_token = time.perf_counter()

    def run(batch: list[list[int]], n: int) -> list[list[int]]:
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        return [list(o.outputs[0].token_ids) for o in llm.generate(batch, params)]

    run([p[:8] for p in prompts], 4)  # warm-up: same batch width, short
    start = time.perf_counter()
    tokens = run(prompts, output_len)
    seconds = time.perf_counter() - start
    result = {
        "seconds": seconds,
        "tokens": tokens,
        "cold_start_s": first_token - t0,
        "process_start_s": first_token - _T_START,
    }
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
