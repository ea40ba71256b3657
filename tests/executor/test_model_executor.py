"""ModelExecutor on hand-built plans: chunked prefill + decodes equal transformers' greedy output."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tokenmill.core import Request, SamplingParams, StepPlan
from tokenmill.core.plan import standalone_seq
from tokenmill.executor import ModelExecutor
from tokenmill.model import kernels, threads
from tokenmill.model.testing import load_hf_model, make_tiny_checkpoint
from tokenmill.model.threads import CpuSample, ThreadController

BLOCK = 4
PROMPTS = {
    "a": [5, 9, 33, 101, 7, 8, 200, 3, 44, 12, 19],
    "b": [400, 17, 250, 6],
    "c": list(range(40, 70)),
}
# hand-picked, disjoint, deliberately unordered block tables (enough for prompt + 16 tokens)
TABLES = {
    "a": [7, 3, 11, 2, 20, 5, 9],
    "b": [1, 30, 14, 8, 22],
    "c": [40, 12, 33, 0, 18, 27, 36, 4, 25, 16, 31, 39],
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("exec") / "qwen2", "qwen2", tie_word_embeddings=True
    )


@pytest.fixture(scope="module")
def hf_greedy(model_dir: Path) -> dict[str, list[int]]:
    hf = load_hf_model(model_dir)
    out = {}
    with torch.no_grad():
        for rid, prompt in PROMPTS.items():
            gen = hf.generate(
                torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long), pad_token_id=0,
            )  # fmt: skip
            out[rid] = gen[0, len(prompt) :].tolist()
    return out


def make_executor(model_dir: Path, **kw) -> ModelExecutor:
    return ModelExecutor(
        str(model_dir), dtype="float32", kv_cache_memory=1 << 20, block_size=BLOCK,
        max_num_batched_tokens=64, max_num_seqs=8, **kw,
    )  # fmt: skip


def new_request(rid: str, **params) -> Request:
    params.setdefault("temperature", 0.0)
    return Request(rid, list(PROMPTS[rid]), SamplingParams(max_tokens=16, **params))


def decode_seq(req: Request):
    return standalone_seq(req, req.num_tokens - 1, 1, TABLES[req.request_id], True)


def apply(result, reqs: list[Request]) -> None:
    for req in reqs:
        req.output_token_ids.extend(result.sampled_token_ids.get(req.request_id, []))


def test_num_blocks_from_memory(model_dir: Path) -> None:
    ex = make_executor(model_dir)
    cfg = ex.model_config
    per_block = 2 * cfg.num_layers * BLOCK * cfg.num_kv_heads * cfg.head_dim * 4
    assert ex.kv_bytes_per_block == per_block == ModelExecutor.kv_cache_bytes_per_block(cfg, BLOCK)
    assert ex.num_blocks == (1 << 20) // per_block
    assert ModelExecutor.kv_cache_bytes_per_block(cfg, BLOCK, "bfloat16") == per_block // 2
    with pytest.raises(ValueError, match="kv_cache_memory"):
        ModelExecutor(str(model_dir), kv_cache_memory=per_block - 1, block_size=BLOCK)


def test_chunked_prefill_then_decodes_match_transformers(model_dir: Path, hf_greedy) -> None:
    ex = make_executor(model_dir)
    a, b, c = new_request("a"), new_request("b"), new_request("c")
    # step 0: a's first chunk (no sample) alongside b's whole prompt and c's first chunk
    plan = StepPlan(0, 0.0, [
        standalone_seq(a, 0, 6, TABLES["a"], False),
        standalone_seq(b, 0, 4, TABLES["b"], True),
        standalone_seq(c, 0, 13, TABLES["c"], False),
    ])  # fmt: skip
    result = ex.execute(plan)
    assert set(result.sampled_token_ids) == {"b"} and result.logprobs is None
    apply(result, [a, b, c])
    # step 1: a's and c's last chunks sample, b decodes: a mixed prefill + decode batch
    plan = StepPlan(1, 0.0, [
        standalone_seq(a, 6, 5, TABLES["a"], True),
        decode_seq(b),
        standalone_seq(c, 13, 17, TABLES["c"], True),
    ])  # fmt: skip
    apply(ex.execute(plan), [a, b, c])
    while a.num_output_tokens < 10:
        live = [r for r in (a, b, c) if r.num_output_tokens < 10]
        apply(ex.execute(StepPlan(2, 0.0, [decode_seq(r) for r in live])), live)
    assert {r.request_id: r.output_token_ids for r in (a, b, c)} == hf_greedy


def test_multi_step_plan_equals_single_steps(model_dir: Path, hf_greedy) -> None:
    ex = make_executor(model_dir)
    reqs = [new_request(rid) for rid in PROMPTS]
    first = StepPlan(
        0, 0.0, [standalone_seq(r, 0, r.num_prompt_tokens, TABLES[r.request_id], True) for r in reqs]
    )
    apply(ex.execute(first), reqs)
    result = ex.execute(StepPlan(1, 0.0, [decode_seq(r) for r in reqs], num_steps=6))
    assert all(len(v) == 6 for v in result.sampled_token_ids.values())
    apply(result, reqs)
    apply(ex.execute(StepPlan(2, 0.0, [decode_seq(r) for r in reqs], num_steps=3)), reqs)
    assert {r.request_id: r.output_token_ids for r in reqs} == hf_greedy


def run_sampled(ex: ModelExecutor, multi: bool, **params) -> tuple[list[int], list]:
    req = new_request("a", **params)
    apply(ex.execute(StepPlan(0, 0.0, [standalone_seq(req, 0, 11, TABLES["a"], True)])), [req])
    logprobs = []
    if multi:
        result = ex.execute(StepPlan(1, 0.0, [decode_seq(req)], num_steps=8))
        apply(result, [req])
        logprobs = result.logprobs["a"] if result.logprobs else []
    else:
        for step in range(8):
            result = ex.execute(StepPlan(1 + step, 0.0, [decode_seq(req)]))
            apply(result, [req])
            logprobs += result.logprobs["a"] if result.logprobs else []
    return req.output_token_ids, logprobs


def test_multi_step_penalties_seeds_and_logprobs_equal_single_steps(model_dir: Path) -> None:
    ex = make_executor(model_dir)
    # penalties must see tokens sampled in earlier sub-steps of the same plan
    params = dict(temperature=0.9, seed=11, frequency_penalty=1.5, presence_penalty=0.5, logprobs=2)
    single, lp_single = run_sampled(ex, multi=False, **params)
    multi, lp_multi = run_sampled(ex, multi=True, **params)
    assert single == multi and len(single) == 9
    assert len(lp_multi) == 8 and all(len(top) == 2 for _, top in lp_multi)
    for (a, top_a), (b, top_b) in zip(lp_single, lp_multi, strict=True):
        assert abs(a - b) < 1e-4 and [t for t, _ in top_a] == [t for t, _ in top_b]
    greedy_penalised, _ = run_sampled(ex, multi=True, temperature=0.0, repetition_penalty=3.0)
    assert (
        greedy_penalised == run_sampled(ex, multi=False, temperature=0.0, repetition_penalty=3.0)[0]
    )


def test_empty_plan(model_dir: Path) -> None:
    result = make_executor(model_dir).execute(StepPlan(0, 0.0, []))
    assert result.sampled_token_ids == {} and result.duration is not None


def test_bad_block_tables_are_refused(model_dir: Path) -> None:
    ex = make_executor(model_dir)
    req = new_request("a")
    with pytest.raises(ValueError, match="blocks"):
        ex.execute(StepPlan(0, 0.0, [standalone_seq(req, 0, 11, [1, 2], True)]))  # needs 3
    with pytest.raises(ValueError, match="blocks"):
        ex.execute(StepPlan(0, 0.0, [standalone_seq(req, 0, 11, [1, 2, ex.num_blocks], True)]))


class _Starved:
    """CPU counters of a process whose threads wait for a CPU all the time."""

    def __init__(self) -> None:
        self.n = 0

    def sample(self) -> CpuSample:
        self.n += 1
        return CpuSample(run_delay=10.0 * self.n, idle=0.0, total=100.0 * self.n, cpus=2)


def test_forward_passes_feed_the_thread_controller(
    model_dir: Path, hf_greedy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the executor wraps each forward pass in the process's thread controller; a controller
    # that sees starved threads drops the kernels to one thread mid-generation, and the
    # output stays the reference's
    if not kernels.cpu_kernels_available():
        pytest.skip("CPU kernels could not be built here")
    stats = _Starved()
    ctl = ThreadController(stats, kernels.set_thread_limit, lambda: 2, window=0.0)
    monkeypatch.setattr(threads, "_controller", ctl)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ex = make_executor(model_dir)
        assert ex.threads is ctl
        reqs = [new_request(rid) for rid in PROMPTS]
        first = [standalone_seq(r, 0, r.num_prompt_tokens, TABLES[r.request_id], True) for r in reqs]
        apply(ex.execute(StepPlan(0, 0.0, first)), reqs)
        assert kernels.kernel_threads() == 1 and ctl.changes == 1 and stats.n >= 2
        apply(ex.execute(StepPlan(1, 0.0, [decode_seq(r) for r in reqs], num_steps=9)), reqs)
        assert {r.request_id: r.output_token_ids for r in reqs} == hf_greedy
    finally:
        kernels.set_thread_limit(0)
        torch.set_num_threads(torch_threads)
