"""Prefill/decode between two engines in one process: handoff, KV export/import, prior tokens.

A prefill engine runs a request to its first token and holds its KV; a decode
engine reserves blocks, the KV of the blocks it lacks is copied across, and
the request continues there after its first token. What a client sees
(tokens, text, deltas, finish reason) must equal a single engine's.
"""

from __future__ import annotations

from typing import Any

import pytest

from tokenmill.cluster.kv import export_kv, import_kv
from tokenmill.core.request import SamplingParams
from tokenmill.engine import Engine, EngineConfig, PriorTokens


def _engine(path: Any, **kw: Any) -> Engine:
    return Engine(EngineConfig(model=str(path), dtype="float32", kv_cache_memory=64 * 8192, block_size=16,
                               max_num_seqs=8, max_model_len=200, **kw))  # fmt: skip


def _run(engine: Engine) -> list[Any]:
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    return outs


def _pd(p: Engine, d: Engine, rid: str, prompt: list[int], params: SamplingParams) -> tuple[list[Any], dict[str, int]]:
    """Serve one request across ``p`` and ``d`` as the cluster does; returns the client's outputs and counts."""
    p.add_request(rid, prompt, params, handoff=True)
    first = _run(p)
    last = first[-1]
    if last.outputs[0].finish_reason != "handoff":
        return first, {"moved": 0, "cached": 0}
    o = last.outputs[0]
    tokens = prompt + o.token_ids
    got = d.reserve_import(rid, tokens, len(prompt))
    assert got is not None
    cached, fresh = got
    src = p.export_blocks(rid, cached, len(prompt))
    import_kv(d.executor.kv_cache, fresh, export_kv(p.executor.kv_cache, src))
    assert p.release_kv(rid)
    d.add_request(rid, prompt, params, prior=PriorTokens(o.token_ids, o.logprobs, o.cumulative_logprob))
    prompt_before = d.num_prompt_tokens
    rest = _run(d)
    return first + rest, {"moved": len(fresh), "cached": cached, "decode_prompt_tokens": d.num_prompt_tokens - prompt_before}


def _client_view(outs: list[Any]) -> tuple[str, list[int], str | None, list[float] | None]:
    """What a streaming client assembles: the deltas, in order, and the last finish reason."""
    text = "".join(o.outputs[0].delta_text for o in outs)
    toks = [t for o in outs for t in o.outputs[0].delta_token_ids]
    lps = None
    if outs[-1].outputs[0].logprobs is not None:
        lps = [next(iter(e.values())).logprob for o in outs for e in (o.outputs[0].delta_logprobs or [])]
    reasons = [o.outputs[0].finish_reason for o in outs if o.outputs[0].finish_reason not in (None, "handoff")]
    return text, toks, reasons[-1] if reasons else None, lps


def test_handoff_and_continue_equal_one_engine(tiny_model_dir: Any) -> None:
    path = tiny_model_dir("llama")
    single, p, d = _engine(path), _engine(path), _engine(path, max_decode_steps=4)
    shared = list(range(5, 45))
    prompts = [shared + [50, 51, 52], list(range(60, 77)), shared + [90], [7, 8, 9]]
    for i, prompt in enumerate(prompts):
        params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=2)
        single.add_request(str(i), prompt, params)
        want = _client_view(_run(single))
        got, counts = _pd(p, d, str(i), prompt, params)
        assert _client_view(got) == want
        # The decode engine computed no prompt token; blocks its cache held did not move.
        assert counts["decode_prompt_tokens"] == 0
        assert counts["moved"] == -(-len(prompt) // 16) - counts["cached"] // 16
        if i == 2:
            assert counts["cached"] == 32  # the shared prefix's two full blocks were there from request 0
    for e in (p, d):
        assert e.scheduler.kv.pool.num_used == 0 and not e.scheduler.kv.held and not e.scheduler.kv.imports


def test_a_first_token_that_ends_the_request_frees_its_kv(tiny_model_dir: Any) -> None:
    p = _engine(tiny_model_dir("llama"))
    outs, _ = _pd(p, p, "a", [3, 4, 5], SamplingParams(max_tokens=1, temperature=0.0))
    assert outs[-1].outputs[0].finish_reason == "length" and outs[-1].finished
    assert p.scheduler.kv.pool.num_used == 0 and not p.scheduler.kv.held


def test_stop_string_across_the_handoff(tiny_model_dir: Any) -> None:
    """A stop string that begins in the first token's text and ends in the second's: held back
    on the prefill engine, found on the decode engine, as one engine would."""
    path = tiny_model_dir("llama")
    single = _engine(path)
    for start in range(20, 120, 7):
        prompt = list(range(start, start + 9))
        single.add_request("probe", prompt, SamplingParams(max_tokens=3, temperature=0.0))
        outs = _run(single)
        texts = [single.tokenizer.decode([t]) for t in outs[-1].outputs[0].token_ids]
        if len(texts) == 3 and texts[0] and texts[1] and "\ufffd" not in "".join(texts):
            break
    else:
        pytest.skip("no prompt whose first tokens decode cleanly")
    stop = texts[0][-1] + texts[1][0]
    params = SamplingParams(max_tokens=3, temperature=0.0, stop=[stop])
    single.add_request("s", prompt, params)
    want = _client_view(_run(single))
    got, _ = _pd(_engine(path), _engine(path), "s", prompt, params)
    assert _client_view(got) == want and want[2] == "stop"


def test_handoff_refuses_what_it_cannot_carry(tiny_model_dir: Any) -> None:
    p = _engine(tiny_model_dir("llama"))
    with pytest.raises(ValueError, match="one sample"):
        p.add_request("n", [1, 2, 3], SamplingParams(n=2), handoff=True)
    with pytest.raises(ValueError, match="one sample"):
        p.add_request("lp", [1, 2, 3], SamplingParams(prompt_logprobs=1), prior=PriorTokens([4]))
    # A refused continuation gives its reservation back.
    assert p.reserve_import("r", [1] * 40, 40) is not None
    with pytest.raises(ValueError):
        p.add_request("r", [1] * 40, SamplingParams(n=2), prior=PriorTokens([4]))
    assert not p.scheduler.kv.imports and p.scheduler.kv.pool.num_used == 0
