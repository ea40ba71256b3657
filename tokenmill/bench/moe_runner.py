"""One cell of ``tokenmill bench moe`` in a fresh process: tokenmill or transformers decoding.

Job on stdin: ``{"system", "model_dir", "dtype", "prompts", "output_len",
"expert_cache_memory", "prefetch", "experts_implementation", "threads", "repeats"}``
(equal-length prompts). After a warm-up it times greedy generation of 1 and of
``output_len`` new tokens for the whole batch, ``repeats`` times; the difference
is decode only. Prints ``TOKENMILL_RESULT {"t_one": [...], "t_full": [...],
"cpu_one": [...], "cpu_full": [...], "tokens", "expert_cache", "rss_anon_mb",
"rss_file_mb"}`` (``cpu_*``: the process's CPU seconds, all its threads, for the
same runs: on a shared machine they vary much less than wall time).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def _rss_mb() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            out[f"{key[3:].lower()}"] = int(value.split()[0]) / 1024
    return {"rss_anon_mb": out.get("anon", 0.0), "rss_file_mb": out.get("file", 0.0)}


def _tokenmill(job: dict[str, Any]):
    from tokenmill.core.request import SamplingParams
    from tokenmill.llm import LLM

    prompts = job["prompts"]
    llm = LLM(
        job["model_dir"], dtype=job["dtype"], kv_cache_memory=256 << 20, max_num_seqs=len(prompts),
        expert_cache_memory=job.get("expert_cache_memory"), expert_prefetch=job.get("prefetch", True),
        enable_prefix_caching=False,  # the 1-token and full runs must both prefill
    )  # fmt: skip

    def gen(n: int) -> list[list[int]]:
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]

    def stats() -> Any:
        s = llm.engine.stats().expert_cache
        return None if s is None else s.as_dict()

    return gen, stats


def _transformers(job: dict[str, Any]):
    import torch
    import transformers

    kw = {}
    if job.get("experts_implementation"):
        kw["experts_implementation"] = job["experts_implementation"]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        job["model_dir"], dtype=getattr(torch, job["dtype"]), **kw
    ).eval()
    model.generation_config.eos_token_id = None  # exactly n tokens, like ignore_eos
    ids = torch.tensor(job["prompts"])

    def gen(n: int) -> list[list[int]]:
        with torch.inference_mode():
            out = model.generate(
                ids, max_new_tokens=n, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids)
            )
        return out[:, ids.shape[1] :].tolist()

    return gen, lambda: None


def main() -> None:
    from tokenmill.bench.peers._venv import RESULT_PREFIX

    job = json.loads(sys.stdin.read())
    if job.get("threads"):
        import torch

        torch.set_num_threads(int(job["threads"]))
    gen, stats = (_tokenmill if job["system"] == "tokenmill" else _transformers)(job)
    gen(2)  # warm-up: same batch, short
    t_one, t_full, cpu_one, cpu_full = [], [], [], []
    for _ in range(int(job.get("repeats", 1))):
        t0, c0 = time.perf_counter(), time.process_time()
        gen(1)
        t1, c1 = time.perf_counter(), time.process_time()
        tokens = gen(job["output_len"])
        t_one.append(t1 - t0)
        t_full.append(time.perf_counter() - t1)
        cpu_one.append(c1 - c0)
        cpu_full.append(time.process_time() - c1)
    result = {
        "t_one": t_one, "t_full": t_full, "cpu_one": cpu_one, "cpu_full": cpu_full,
        "tokens": tokens, "expert_cache": stats(), **_rss_mb(),
    }  # fmt: skip
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
