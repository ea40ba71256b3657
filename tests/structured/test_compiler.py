"""Grammar compilation: every kind compiles, is cached, fails with a named error, and only
ever allows output that its spec accepts (random walks through the masks, no model)."""

from __future__ import annotations

import json
import random
import re
from typing import Any

import jsonschema
import pytest

from tests.structured.walk import walk
from tokenmill.structured.compiler import GrammarCompiler, GrammarError, xgrammar_message
from tokenmill.structured.params import StructuredOutputsParams as Spec
from tokenmill.structured.testing import random_schema


def _walks(compiler: Any, tokenizer: Any, spec: Spec, n: int, seed: int = 0, **kw: Any) -> list[str]:
    compiled = compiler.compiled_grammar(spec)
    rng = random.Random(seed)
    texts = [walk(compiler, compiled, tokenizer, rng, **kw) for _ in range(n)]
    return [t for t, done in texts if done]


def test_each_kind_compiles_and_is_cached(compiler: GrammarCompiler) -> None:
    specs = [
        Spec(json={"type": "object", "properties": {"a": {"type": "integer"}}}),
        Spec(json_object=True),
        Spec(regex=r"\d{3}-[a-z]+"),
        Spec(choice=["yes", "no"]),
        Spec(grammar='root ::= "a" | "b" root'),
        Spec(grammar='start: "x" | "y" start'),  # Lark
        Spec(structural_tag={"type": "structural_tag", "format": {"type": "const_string", "value": "ok"}}),
    ]
    for spec in specs:
        bound = compiler.compile(spec)
        assert bound.compiled is not None and bound.compiled_by is compiler and spec.compiled is None
        assert compiler.compile(bound) is bound
    before = compiler.num_compiled
    for spec in specs:
        compiler.compile(Spec(**{spec.kind: getattr(spec, spec.kind)}))  # equal spec, new object
    assert compiler.num_compiled == before


@pytest.mark.parametrize(
    "spec, match",
    [
        (Spec(regex="a(b"), r"structured_outputs.regex: Regex parsing error at position \d+: The parenthesis is not closed"),
        (Spec(regex="(?<=a)b"), "Lookbehind is not supported"),
        (Spec(grammar="root ::= foo"), 'structured_outputs.grammar: .*Rule "foo" is not defined'),
        (Spec(grammar="start: foo"), "structured_outputs.grammar: .*unknown name 'foo'"),
        (Spec(json={"type": "strin"}), 'structured_outputs.json: Unsupported type "strin"'),
        (Spec(json={"type": "array", "uniqueItems": True}), "structured_outputs.json: #: 'uniqueItems'"),
        (Spec(json={"type": "string", "minLength": 5, "maxLength": 2}), "minLength 5 is greater than maxLength 2"),
        (Spec(structural_tag={"type": "structural_tag", "format": {"type": "bogus"}}), "structured_outputs.structural_tag"),
        (Spec(structural_tag={"type": "structural_tag", "format": {"type": "json_schema",
                                                                     "json_schema": {"not": {}}}}), "'not'"),
    ],
)
def test_bad_specs_fail_with_a_named_error(compiler: GrammarCompiler, spec: Spec, match: str) -> None:
    with pytest.raises(GrammarError, match=match) as info:
        compiler.compile(spec)
    assert "/project/cpp" not in str(info.value)  # xgrammar's source locations are dropped


def test_xgrammar_message_drops_the_source_location() -> None:
    assert xgrammar_message(RuntimeError("[17:39:02] /project/cpp/x.cc:12: Bad thing\nmore")) == "Bad thing"


def test_random_schemas_only_allow_valid_json(compiler: GrammarCompiler, bundled_tokenizer: Any) -> None:
    rng = random.Random(7)
    checker = jsonschema.FormatChecker()
    finished = 0
    # 200 generated schemas (the acceptance set; on the bundled model itself in
    # `tokenmill bench structured`), one walk each: every walk that ends is valid JSON
    for i in range(200):
        schema = random_schema(rng)
        for text in _walks(compiler, bundled_tokenizer, Spec(json=schema, disable_any_whitespace=i % 2 == 0), 1, seed=i):
            jsonschema.validate(json.loads(text), schema, format_checker=checker)
            finished += 1
    assert finished >= 150


def test_length_bounded_strings_are_json_strings(compiler: GrammarCompiler, bundled_tokenizer: Any) -> None:
    # xgrammar 0.2.8's own rule for them lets raw control characters in (and escapes out)
    schema = {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 6}, "maxItems": 4}
    texts = _walks(compiler, bundled_tokenizer, Spec(json=schema), 40, p_stop=0.8)
    assert len(texts) >= 30
    for text in texts:
        value = json.loads(text)  # strict: no raw control characters
        jsonschema.validate(value, schema)
        assert "\ufffd" not in text  # no byte sequence that is not UTF-8 (surrogates)


def test_regex_and_choice_outputs_always_match(compiler: GrammarCompiler, bundled_tokenizer: Any) -> None:
    pattern = r"(\d{2,3}-[a-z]{1,4}|[A-Z]+!)"
    texts = _walks(compiler, bundled_tokenizer, Spec(regex=pattern), 30)
    assert len(texts) >= 20 and all(re.fullmatch(pattern, t) for t in texts)
    choices = ['café "quoted"', "back\\slash", "new\nline", "😀 emoji", "yes"]
    texts = _walks(compiler, bundled_tokenizer, Spec(choice=choices), 30, p_stop=1.0)
    assert len(texts) >= 20 and set(texts) <= set(choices) and len(set(texts)) > 1


def test_json_object_is_any_object(compiler: GrammarCompiler, bundled_tokenizer: Any) -> None:
    texts = _walks(compiler, bundled_tokenizer, Spec(json_object=True, disable_any_whitespace=True), 30, p_stop=0.9)
    assert len(texts) >= 20
    assert all(isinstance(json.loads(t), dict) for t in texts)
    assert any(json.loads(t) for t in texts)  # not only {}


def test_special_tokens_are_never_text(compiler: GrammarCompiler, bundled_tokenizer: Any) -> None:
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(compiler.compiled_grammar(Spec(json={"type": "string"})), override_stop_tokens=[0, 4])
    assert matcher.accept_string('"')
    mask = xgr.allocate_token_bitmask(1, compiler.vocab_size)
    matcher.fill_next_token_bitmask(mask, 0)
    for token in ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|endoftext|>"):
        tid = bundled_tokenizer.convert_tokens_to_ids(token)
        assert not (int(mask[0, tid // 32]) >> (tid % 32)) & 1, token
