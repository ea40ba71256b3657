"""Grammar compilation on xgrammar, for one tokenizer, cached by spec.

``GrammarCompiler.compile(params)`` checks a ``StructuredOutputsParams``,
compiles it against the tokenizer's vocabulary and returns a copy of the
params carrying the compiled grammar. Compiled grammars are kept in an LRU
keyed by ``params.key()`` (one compiler per tokenizer, so the key is (spec,
tokenizer)); xgrammar keeps its own cache below. Compilation is thread-safe
and releases the GIL in xgrammar's C++: the server runs it on its prompt
thread pool before a request reaches the engine, so a bad spec is a 400 and
the step loop never waits for a compile.

Errors are ``GrammarError`` (a ``ValueError``) naming the spec kind and the
problem: a schema keyword the grammar cannot enforce (``schema.py``), a
regex or EBNF syntax error, an unsupported feature.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from tokenmill.structured.params import StructuredOutputsParams
from tokenmill.structured.schema import SchemaError, check_schema

# Compiled grammars kept per compiler; a JSON schema's is typically 10-500 KB.
DEFAULT_CACHE_SIZE = 512

# xgrammar prefixes its errors with "[time] /path/file.cc:line: "
_XGR_PREFIX = re.compile(r"^\s*\[[0-9:]+\]\s*\S+:\d+:\s*")


class GrammarError(ValueError):
    """A structured-output spec that cannot be compiled; the message names the problem."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"structured_outputs.{kind}: {message}")
        self.kind = kind
        self.detail = message


def xgrammar_message(exc: BaseException) -> str:
    """xgrammar's error text without its source-location prefix."""
    text = str(exc).strip()
    return _XGR_PREFIX.sub("", text.splitlines()[0] if text else type(exc).__name__)


def tokenizer_info(tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> Any:
    """xgrammar's view of a Hugging Face tokenizer's vocabulary.

    Special tokens (``<|user|>``, ``<|end|>`` ...) are blanked, so that no grammar
    ever admits them as text (the detokenizer would drop them from the output);
    stop tokens are allowed where the grammar ends, whatever their text.
    """
    import xgrammar as xgr

    stops = sorted({int(t) for t in stop_token_ids if 0 <= int(t) < vocab_size})
    detected = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stops or None)
    if detected.vocab_type is not xgr.VocabType.BYTE_LEVEL and detected.vocab_type is not xgr.VocabType.BYTE_FALLBACK:
        return detected  # RAW vocabularies (tiktoken ...): taken as xgrammar reads them
    encoded = [""] * vocab_size
    for text, i in tokenizer.get_vocab().items():
        if 0 <= i < vocab_size:
            encoded[i] = text
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    for i, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            special.add(i)
    for i in special:
        if 0 <= i < vocab_size:
            encoded[i] = ""
    return xgr.TokenizerInfo(
        encoded,
        detected.vocab_type,
        vocab_size=vocab_size,
        stop_token_ids=stops or detected.stop_token_ids,
        add_prefix_space=detected.add_prefix_space,
    )


class GrammarCompiler:
    """Compiles structured-output specs for one tokenizer (see the module docstring)."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: Sequence[int] = (),
        *,
        max_threads: int = 2,
        cache_size: int = DEFAULT_CACHE_SIZE,
        disable_any_whitespace: bool = False,
    ) -> None:
        import xgrammar as xgr

        self.vocab_size = vocab_size
        self.disable_any_whitespace = disable_any_whitespace  # for params that leave it None
        self.info = tokenizer_info(tokenizer, vocab_size, stop_token_ids)
        self._xgr = xgr.GrammarCompiler(self.info, max_threads=max_threads)
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.num_compiled = 0  # cache misses
        self.compile_seconds = 0.0  # spent on them

    def compile(self, params: StructuredOutputsParams) -> StructuredOutputsParams:
        """``params`` bound to its compiled grammar (a copy; itself if already bound here)."""
        if params.compiled is not None and params.compiled_by is self:
            return params
        return params.bind(self.compiled_grammar(params), self)

    def compiled_grammar(self, params: StructuredOutputsParams) -> Any:
        """The ``xgrammar.CompiledGrammar`` of ``params``, from the cache or compiled now."""
        key = params.key(self.disable_any_whitespace)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        start = time.perf_counter()
        compiled = self._compile(params)
        elapsed = time.perf_counter() - start
        with self._lock:
            self.num_compiled += 1
            self.compile_seconds += elapsed
            self._cache[key] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, params: StructuredOutputsParams) -> Any:
        kind = params.kind
        compact = params.key(self.disable_any_whitespace)[2]
        try:
            if kind == "json":
                schema = params.json
                if isinstance(schema, str):
                    schema = json.loads(schema)
                check_schema(schema)  # type: ignore[arg-type]
                return self._compile_schema(json.dumps(schema), not compact)
            if kind == "json_object":
                import xgrammar as xgr

                # any object: strict mode would allow only the properties the schema lists (none)
                return self._compile_fixed(
                    xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=not compact, strict_mode=False)
                )
            if kind == "regex":
                return self._xgr.compile_regex(params.regex)  # type: ignore[arg-type]
            if kind == "choice":
                return self._xgr.compile_grammar(choice_grammar(params.choice or []))
            if kind == "grammar":
                text = params.grammar or ""
                if "::=" in text:
                    return self._xgr.compile_grammar(text)
                return self._xgr.compile_lark(text)
            if kind == "structural_tag":
                import xgrammar as xgr

                tag = params.structural_tag
                text = tag if isinstance(tag, str) else json.dumps(tag)
                tag = json.loads(text)
                _check_tag_schemas(tag)
                if compact:
                    _compact_tag(tag)
                    text = json.dumps(tag)
                return self._compile_fixed(xgr.Grammar.from_structural_tag(text))
        except SchemaError as exc:
            raise GrammarError(kind, str(exc)) from None
        except GrammarError:
            raise
        except (RuntimeError, ValueError, TypeError) as exc:
            raise GrammarError(kind, xgrammar_message(exc)) from None
        raise GrammarError(kind, "unknown kind")


    def _compile_schema(self, schema: str, any_whitespace: bool) -> Any:
        import xgrammar as xgr

        return self._compile_fixed(
            xgr.Grammar.from_json_schema(schema, any_whitespace=any_whitespace, strict_mode=True)
        )

    def _compile_fixed(self, grammar: Any) -> Any:
        """Compile ``grammar`` with the fixes below applied to its JSON string characters."""
        text = str(grammar)
        fixed = _CONTROL_CLASS.sub(_no_surrogates, text.replace(_LENGTH_CHAR_RULE, _JSON_CHAR_RULE))
        return self._xgr.compile_grammar(fixed if fixed != text else grammar)


# xgrammar 0.2.8 writes the characters of a string with minLength / maxLength as this rule,
# which lets raw control characters in (invalid JSON). It becomes one character other than
# '"', '\\' and controls: as upstream, such strings hold no escapes (an escape alternative
# makes the bounded repetition's masks ten times slower to compute).
_LENGTH_CHAR_RULE = r'(([^\"\\\r\n]))'
_JSON_CHAR_RULE = r'(([^\"\\\0-\x1f]))'

# The character classes of JSON strings (those that exclude the control characters) take
# any UTF-8 sequence that decodes to a code point, surrogates included (ED A0 80 ...):
# bytes no UTF-8 decoder accepts, which turn into U+FFFD and break lengths and patterns.
_CONTROL_CLASS = re.compile(r"\[\^([^\]]*\\0-\\x1f[^\]]*)\]")


def _no_surrogates(m: re.Match[str]) -> str:
    return f"[^{m.group(1)}\\uD800-\\uDFFF]"


def _check_tag_schemas(node: Any) -> None:
    """``check_schema`` on every JSON schema a structural tag holds."""
    if isinstance(node, dict):
        if node.get("type") == "json_schema" and "json_schema" in node:
            check_schema(node["json_schema"])
        for value in node.values():
            _check_tag_schemas(value)
    elif isinstance(node, list):
        for value in node:
            _check_tag_schemas(value)


def _compact_tag(node: Any) -> None:
    """At most one whitespace character in a row in the JSON a structural tag holds (its
    JSON formats have no switch for none)."""
    if isinstance(node, dict):
        if node.get("type") == "json_schema" and node.get("max_whitespace_cnt") is None:
            node["max_whitespace_cnt"] = 1
        for value in node.values():
            _compact_tag(value)
    elif isinstance(node, list):
        for value in node:
            _compact_tag(value)


def choice_grammar(choices: Sequence[str]) -> str:
    """EBNF for exactly one of ``choices``, verbatim."""
    return "root ::= " + " | ".join(_ebnf_literal(c) for c in choices)


def _ebnf_literal(text: str) -> str:
    # xgrammar's EBNF string literals take JSON's escapes; non-ASCII stays as UTF-8
    return json.dumps(text, ensure_ascii=False)
