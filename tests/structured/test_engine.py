"""Structured output through the engine on the bundled model: valid at temperature 1.0, and the
same tokens whatever the plans look like (multi-step, preemption, prefix cache)."""

from __future__ import annotations

import json
import random
import re
from typing import Any

import jsonschema
import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.structured.params import StructuredOutputsParams as Spec
from tokenmill.structured.testing import random_schema

PROMPT = "<|user|>\nAnswer in the form asked.<|end|>\n<|assistant|>\n"


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(max_num_seqs=32, kv_cache_memory=32 << 20, max_decode_steps=8)


def _texts(llm: LLM, specs: list[Spec], max_tokens: int = 160, n: int = 1, **kw: Any) -> list[Any]:
    params = [SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=i, n=n, structured_outputs=s, **kw)
              for i, s in enumerate(specs)]  # fmt: skip
    return [c for o in llm.generate([PROMPT] * len(specs), params) for c in o.outputs]


def test_generated_schemas_give_valid_json(llm: LLM) -> None:
    # 200 schemas: test_compiler (random walks) and `tokenmill bench structured` (this model, docs/benchmarks.md)
    rng = random.Random(11)
    schemas = [random_schema(rng) for _ in range(16)]
    outs = _texts(llm, [Spec(json=s, disable_any_whitespace=True) for s in schemas], max_tokens=160)
    stopped = 0
    for schema, c in zip(schemas, outs, strict=True):
        if c.finish_reason == "stop":
            stopped += 1
            jsonschema.validate(json.loads(c.text), schema, format_checker=jsonschema.FormatChecker())
    assert stopped >= len(schemas) // 2


def test_regex_and_choice_always_match_with_n_samples(llm: LLM) -> None:
    pattern = r"\d{3}-[a-z]{2,5}"
    choices = ["yes", "no", "it came to pass"]
    outs = _texts(llm, [Spec(regex=pattern)] * 4 + [Spec(choice=choices)] * 4, max_tokens=30, n=2)
    assert len(outs) == 16
    for c in outs[:8]:
        assert c.finish_reason == "stop" and re.fullmatch(pattern, c.text), c.text
    for c in outs[8:]:
        assert c.finish_reason == "stop" and c.text in choices, c.text


def test_the_same_tokens_with_multi_step_plans_preemption_and_no_prefix_cache(tiny_model_dir: Any) -> None:
    # Seeded draws depend only on the output position, so identical tokens mean that every
    # sub-step saw the mask of its own state, and that a preempted request's matcher was
    # rebuilt from its accepted tokens.
    specs = [Spec(json={"type": "object", "properties": {"a": {"type": "string", "maxLength": 20},
                                                         "b": {"type": "array", "items": {"type": "integer"}}}},
                  disable_any_whitespace=True), Spec(regex=r"([a-z]+ ){3,6}\."), Spec(choice=["alpha", "beta"])] * 2  # fmt: skip
    params = [SamplingParams(temperature=1.0, max_tokens=32, seed=i, structured_outputs=s) for i, s in enumerate(specs)]
    prompts = [[5 + i, 6, 7, 8, 9] for i in range(len(specs))]
    runs = {}
    for name, kw in {
        "one step": dict(max_decode_steps=1),
        "eight steps": dict(max_decode_steps=8),
        # 3 blocks of 16 tokens: 6 requests that grow to 37 tokens take turns
        "preempting": dict(max_decode_steps=4, num_blocks=8),
        "no prefix cache": dict(max_decode_steps=8, enable_prefix_caching=False),
    }.items():
        blocks = kw.pop("num_blocks", None)
        engine_llm = LLM(str(tiny_model_dir("llama")), max_num_seqs=8, dtype="float32",
                         kv_cache_memory=(blocks or 64) * _block_bytes(tiny_model_dir("llama")), **kw)  # fmt: skip
        runs[name] = [o.outputs[0].token_ids for o in engine_llm.generate(prompts, params)]
        if name == "preempting":
            assert engine_llm.engine.scheduler.num_preemptions > 0
    first = runs.pop("one step")
    for name, got in runs.items():
        assert got == first, name


def _block_bytes(model_dir: Any) -> int:
    """Bytes of one 16-token KV block of an fp32 checkpoint."""
    from pathlib import Path

    c = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return 2 * c["num_hidden_layers"] * 16 * c["num_key_value_heads"] * head_dim * 4


def test_stop_strings_and_max_tokens_end_an_object_early(llm: LLM) -> None:
    schema = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    out = _texts(llm, [Spec(json=schema, disable_any_whitespace=True)], max_tokens=6)[0]
    assert out.finish_reason == "length"
    assert out.text.startswith('{"text"') and len(out.token_ids) == 6  # a prefix of valid JSON, cut short
    out = _texts(llm, [Spec(json=schema, disable_any_whitespace=True)], max_tokens=80, stop=['"text"'])[0]
    assert out.finish_reason == "stop" and out.stop_reason == '"text"' and out.text == "{"


def test_bad_specs_are_refused_before_anything_runs(llm: LLM) -> None:
    from tokenmill.structured.compiler import GrammarError

    engine = llm.engine
    with pytest.raises(GrammarError, match="uniqueItems"):
        llm.generate([PROMPT, PROMPT], [SamplingParams(), SamplingParams(structured_outputs=Spec(
            json={"type": "array", "uniqueItems": True}))])  # fmt: skip
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(structured_outputs=Spec(regex="a"), ignore_eos=True)
    assert not engine.has_unfinished() and engine.scheduler.kv.pool.num_used == 0
