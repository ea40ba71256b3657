"""Timed batched greedy generation with llama.cpp's low-level API; runs in the llamacpp venv.

Job on stdin: ``{"gguf", "prompts", "output_len", "threads"}``. Prints
``TOKENMILL_RESULT {"seconds", "tokens", ...}``.

Every prompt is one sequence (``seq_id``) of one context with ``n_seq_max`` =
number of prompts and a KV cache of ``batch x (prompt + output)`` cells, one
stream per sequence (``kv_unified`` off, so attention reads only the
sequence's own cells; a unified cache measured 0.7x the speed at batch 32). Prefill puts all prompts' tokens into ``llama_batch``es
of up to ``n_batch`` tokens with logits only at each prompt's last token; every
decode step is one ``llama_decode`` of a batch with one token per sequence.
Sampling is llama.cpp's greedy sampler (argmax in C). EOS is not checked, so
every sequence gets exactly ``output_len`` tokens. A short warm-up with the
same batch width runs first and its cache is cleared.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import llama_cpp as L

RESULT_PREFIX = "TOKENMILL_RESULT "
N_BATCH = 2048  # llama.cpp's default logical batch; prefill longer than this is split


def _add(batch: Any, tok: int, pos: int, seq: int, logits: bool) -> None:
    i = batch.n_tokens
    batch.token[i] = tok
    batch.pos[i] = pos
    batch.n_seq_id[i] = 1
    batch.seq_id[i][0] = seq
    batch.logits[i] = logits
    batch.n_tokens = i + 1


def _decode(ctx: Any, batch: Any) -> None:
    rc = L.llama_decode(ctx, batch)
    if rc != 0:
        raise RuntimeError(f"llama_decode returned {rc}")


def generate(
    ctx: Any, smpl: Any, batch: Any, prompts: list[list[int]], output_len: int, marks: dict[str, float]
) -> list[list[int]]:
    L.llama_memory_clear(L.llama_get_memory(ctx), True)
    out: list[list[int]] = [[] for _ in prompts]
    # Prefill: all prompts' tokens in order, chunked; each chunk's logits must be
    # sampled before the next decode overwrites them.
    items = [(s, p, tok) for s, prompt in enumerate(prompts) for p, tok in enumerate(prompt)]
    for start in range(0, len(items), N_BATCH):
        batch.n_tokens = 0
        last: list[tuple[int, int]] = []  # (seq, index in batch) of prompts ending in this chunk
        for s, p, tok in items[start : start + N_BATCH]:
            is_last = p == len(prompts[s]) - 1
            if is_last:
                last.append((s, batch.n_tokens))
            _add(batch, tok, p, s, is_last)
        _decode(ctx, batch)
        for s, idx in last:
            out[s].append(L.llama_sampler_sample(smpl, ctx, idx))
    marks["prefill_done"] = time.perf_counter()
    for step in range(output_len - 1):
        batch.n_tokens = 0
        for s, prompt in enumerate(prompts):
            _add(batch, out[s][-1], len(prompt) + step, s, True)
        _decode(ctx, batch)
        for s in range(len(prompts)):
            out[s].append(L.llama_sampler_sample(smpl, ctx, s))
    return out


def main() -> None:
    job = json.loads(sys.stdin.read())
    prompts: list[list[int]] = job["prompts"]
    output_len: int = job["output_len"]
    threads: int = job["threads"]
    n_seq = len(prompts)

    L.llama_backend_init()
    mparams = L.llama_model_default_params()
    model = L.llama_model_load_from_file(job["gguf"].encode(), mparams)
    if not model:
        raise RuntimeError(f"cannot load {job['gguf']}")
    cparams = L.llama_context_default_params()
    # llama.cpp rounds each sequence's share of the context up to 256 cells.
    per_seq = -(-(max(len(p) for p in prompts) + output_len) // 256) * 256
    cparams.n_ctx = per_seq * n_seq
    cparams.n_batch = N_BATCH
    # Physical batch = logical batch (default 512): prefill GEMMs over 2048 rows
    # instead of 512 cut batch-32 prefill from 8.1 s to 4.7 s on this machine
    # (4096 gained nothing more); decode is unaffected.
    cparams.n_ubatch = N_BATCH
    cparams.n_seq_max = n_seq
    cparams.kv_unified = False
    cparams.n_threads = threads
    cparams.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, cparams)
    if not ctx:
        raise RuntimeError("cannot create a llama.cpp context")
    smpl = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    L.llama_sampler_chain_add(smpl, L.llama_sampler_init_greedy())
    batch = L.llama_batch_init(max(N_BATCH, n_seq), 0, 1)

    marks: dict[str, float] = {}
    generate(ctx, smpl, batch, [p[:8] for p in prompts], 4, marks)  # warm-up: same batch width, short
    t0 = time.perf_counter()
    tokens = generate(ctx, smpl, batch, prompts, output_len, marks)
    seconds = time.perf_counter() - t0

    result = {
        "seconds": seconds,
        "prefill_seconds": marks["prefill_done"] - t0,  # first token of every prompt included
        "tokens": tokens,
        "n_ctx": L.llama_n_ctx(ctx),
        "n_seq_max": L.llama_n_seq_max(ctx),
        "threads": threads,
        "llama_cpp_python": L.__version__,
        "system_info": L.llama_print_system_info().decode(),
    }
    L.llama_batch_free(batch)
    L.llama_sampler_free(smpl)
    L.llama_free(ctx)
    L.llama_model_free(model)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
