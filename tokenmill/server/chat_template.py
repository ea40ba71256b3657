"""Chat templates rendered in a sandbox with bounds on size, work and time.

Every template the server renders — the model's own and, with
``--trust-request-chat-template``, one sent in a request — runs here. The
environment is what transformers renders chat templates with (jinja2's
``ImmutableSandboxedEnvironment``: no attribute escapes, no mutation of the
data; ``trim_blocks``/``lstrip_blocks``; ``raise_exception``, ``tojson``,
``strftime_now``, ``namespace``, ``dict``, ``{% generation %}``, loop
controls), so templates from the Hub render to the same text. The jinja
sandbox stops escapes, not resource use: ``{{ 'a' * 10**9 }}`` builds a
gigabyte, and two nested ``range(100000)`` loops run for hours. So, on top:

- **size**: no string, list, dict or range longer than ``max_chars`` is
  built. The operations that can amplify (``*``, ``**``, ``%``, ``+``, ``~``,
  ``str.format``, ``replace``, ``join``, ``center``, ``indent``, ``range`` ...)
  are checked *before* they run, from the sizes of their operands; values
  about to be turned into text (output, ``~``, ``tojson``, ``join`` ...) are
  measured first, so a list of many references to one long string cannot
  explode into text either;
- **work**: the sizes of every value built plus every loop iteration add up
  to at most ``work_factor * max_chars``;
- **depth**: calls (macros, recursive loops) nest at most ``max_depth`` deep;
- **time**: the deadline is checked at every loop iteration, call,
  attribute lookup, operator, filter and output chunk, so a render stops
  within a few microseconds of ``timeout_s``;
- **output**: the rendered text is at most ``max_output_chars``.

Going past a bound raises ``TemplateLimitError``; ``raise_exception`` in a
template raises ``TemplateRefusal`` (the template's author refusing the
input); both are ``jinja2.TemplateError``, as are syntax errors.
"""

from __future__ import annotations

import functools
import json
import re
import string
import time
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import _PassArg

__all__ = [
    "TemplateError",
    "TemplateLimitError",
    "TemplateLimits",
    "TemplateRefusal",
    "render_chat_template",
]


class TemplateLimitError(TemplateError):
    """The template went past a bound: a value or the output too big, too much work, too deep, too slow."""


class TemplateRefusal(TemplateError):
    """The template called ``raise_exception``: its author refuses these messages."""


@dataclass(frozen=True)
class TemplateLimits:
    max_chars: int = 1 << 20  # largest string / list / dict / range the template may build
    max_output_chars: int = 1 << 20  # largest rendered text
    timeout_s: float = 1.0
    work_factor: int = 32  # total size of everything built, in units of max_chars
    max_range: int = 100_000  # jinja's own cap, made explicit
    max_depth: int = 64  # nested calls (macros, recursive loops)
    max_int_bits: int = 4096


# ------------------------------------------------------------------ budget


class _Budget:
    """What one render has spent; the environment's hooks consult the one of the current render."""

    __slots__ = ("limits", "deadline", "work", "max_work", "depth")

    def __init__(self, limits: TemplateLimits) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.timeout_s
        self.work = 0
        self.max_work = limits.work_factor * limits.max_chars
        self.depth = 0

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"the chat template took longer than {self.limits.timeout_s:g} s to render")

    def spend(self, units: int) -> None:
        self.work += units
        if self.work > self.max_work:
            raise TemplateLimitError(
                f"the chat template did too much work (over {self.max_work} characters built or loop iterations)"
            )

    def ensure(self, size: int, what: str) -> None:
        """Refuse an operation whose result would be ``size`` long, before it runs."""
        if size > self.limits.max_chars:
            raise TemplateLimitError(
                f"the chat template would build {what} of size {size}, over the limit of {self.limits.max_chars}"
            )

    def ensure_text(self, value: Any, what: str) -> None:
        """Refuse to turn ``value`` into text when the text would be too long (measured, not built)."""
        if not isinstance(value, str):
            self.ensure(_weight(value, self.limits.max_chars), what)

    def ensure_int(self, value: Any) -> None:
        if isinstance(value, int) and not isinstance(value, bool):
            if value.bit_length() > self.limits.max_int_bits:
                raise TemplateLimitError(f"the chat template built an integer over {self.limits.max_int_bits} bits")

    def ensure_args(self, args: Iterable[Any]) -> None:
        """Integer arguments are widths, counts, sizes: none may exceed the size limit."""
        limit = self.limits.max_chars
        for a in args:
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > limit:
                raise TemplateLimitError(f"the chat template passed {a}, over the size limit of {limit}")

    def charge(self, value: Any, what: str = "a value") -> Any:
        """Count a value just built against the bounds (its own length: what it took to build)."""
        size = _shallow_size(value)
        if size:
            self.ensure(size, what)
            self.spend(size)
        elif isinstance(value, int):
            self.ensure_int(value)
        return value


_BUDGET: ContextVar[_Budget | None] = ContextVar("tokenmill_chat_template_budget", default=None)
_DEFAULT_LIMITS = TemplateLimits()


def _budget() -> _Budget:
    budget = _BUDGET.get()
    if budget is None:
        # Outside a render: jinja folds constant expressions while compiling. A
        # fresh budget with the default bounds keeps that bounded too.
        budget = _Budget(_DEFAULT_LIMITS)
    return budget


def _shallow_size(value: Any) -> int:
    if isinstance(value, (str, list, tuple, dict, set, frozenset)):
        return len(value)
    if isinstance(value, range):
        return _range_len(value)
    return 0


def _range_len(r: range) -> int:
    try:
        return len(r)
    except OverflowError:  # longer than sys.maxsize
        return 1 << 63


def _weight(value: Any, limit: int) -> int:
    """The length of ``value`` as text, roughly (containers count their items); stops once past ``limit``.

    Shared references count each time they occur: that is what printing them costs.
    """
    total = 0
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, (list, tuple, set, frozenset)):
            total += len(v) + 2
            stack.extend(v)
        elif isinstance(v, dict):
            total += 2 * len(v) + 2
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, range):
            total += _range_len(v)
        elif isinstance(v, jinja2.utils.Namespace):
            stack.append(v._Namespace__attrs)  # type: ignore[attr-defined]
        else:
            total += 1
        if total > limit:
            return total
    return total


# ------------------------------------------------------------ amplifiers


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0 +-]*(\d+|\*)?(?:\.(\d+|\*))?[hlL]?[a-zA-Z%]")
_DIGITS = re.compile(r"\d+")


def _check_percent_format(budget: _Budget, fmt: str, args: Any) -> None:
    """``'%10000000d' % x``: widths and precisions in the format cannot exceed the size limit."""
    limit = budget.limits.max_chars
    for m in _PERCENT_SPEC.finditer(fmt):
        for g in m.groups():
            if g and g.isdigit() and (len(g) > 12 or int(g) > limit):
                raise TemplateLimitError(f"the chat template's format width {g} is over the size limit of {limit}")
    budget.ensure_text(args, "formatted text")
    budget.ensure_args(args if isinstance(args, tuple) else (args,))
    budget.ensure(len(fmt) + _weight(args, limit), "formatted text")


def _check_brace_format(budget: _Budget, fmt: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """``'{:>10000000}'.format(x)``: the same for ``str.format`` and ``format_map``."""
    limit = budget.limits.max_chars
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # str.format will raise the same error
    for _, _, spec, _ in parsed:
        for digits in _DIGITS.findall(spec or ""):
            if len(digits) > 12 or int(digits) > limit:
                raise TemplateLimitError(f"the chat template's format width {digits} is over the size limit of {limit}")
    budget.ensure_args((*args, *kwargs.values()))
    budget.ensure(len(fmt) + _weight((args, kwargs), limit), "formatted text")


def _replace_size(s: str, old: str, new: str, count: int = -1) -> int:
    hits = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * max(0, len(new) - len(old))


def _join_size(sep: str, items: Any, limit: int) -> tuple[int, Any]:
    """The length of ``sep.join(items)``; an iterator is read (at most ``limit`` + 1 items) into a list."""
    if not isinstance(items, (list, tuple, str, dict, set, frozenset, range)):
        items = list(_take(items, limit + 1))
    n = _shallow_size(items)
    return _weight(items, limit) + len(sep) * max(0, n - 1), items


def _take(it: Iterable[Any], n: int) -> Iterator[Any]:
    for i, item in enumerate(it):
        if i >= n:
            raise TemplateLimitError(f"the chat template built a sequence of more than {n - 1} items")
        yield item


# str methods a template may call. Each is linear in its inputs, or checked
# before it runs below; others (translate, expandtabs, ...) can amplify.
_STR_METHODS = frozenset(
    "strip lstrip rstrip split rsplit splitlines partition rpartition startswith endswith "
    "find rfind index rindex count upper lower title capitalize casefold swapcase removeprefix "
    "removesuffix isdigit isalpha isalnum isspace islower isupper isnumeric isdecimal istitle "
    "isidentifier isascii isprintable replace join format format_map center ljust rjust zfill".split()
)


def _check_str_method(budget: _Budget, s: str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Pre-check a str method call; returns replacement args where an iterator had to be read."""
    limit = budget.limits.max_chars
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        budget.ensure(_replace_size(s, *args[:3]), "a replaced string")
    elif name == "join" and len(args) == 1:
        size, items = _join_size(s, args[0], limit)
        budget.ensure(size, "a joined string")
        return (items,)
    return args


# ------------------------------------------------------------ environment


class _GuardedCodeGenerator(CodeGenerator):
    """Routes ``~`` (string concatenation) through the environment, where its size is checked first."""

    def visit_Concat(self, node: jinja2.nodes.Concat, frame: Frame) -> None:
        self.write("environment.guarded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask tag): renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """transformers' namespace (no underscore attributes), with stored values counted."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja's signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check_name(name)
        _budget().charge(value, "a namespace value")
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"chat templates cannot set underscore attributes on a namespace ({name!r})")


class _TemplateDict:
    """``dict(...)`` in templates, without the type itself (no ``dict.__class__`` tricks)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: Any) -> None:
    raise TemplateRefusal(str(message))


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
    # transformers' tojson: no HTML escaping (jinja's would turn < into \u003c), and its options.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


# Filters that turn their input into text: the input is measured before.
_TEXT_FILTERS = frozenset(
    "tojson pprint string join e escape forceescape safe urlize striptags indent center wordwrap replace "
    "format truncate title upper lower capitalize trim wordcount urlencode xmlattr filesizeformat".split()
)


def _filter_estimate(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], limit: int) -> int:
    """The size of a filter's result, for the filters whose result can be much larger than their input."""
    if not args:
        return 0
    value, rest = args[0], args[1:]
    text_len = len(value) if isinstance(value, str) else _weight(value, limit)
    if name == "replace" and len(rest) >= 2 and isinstance(value, str):
        return _replace_size(value, str(rest[0]), str(rest[1]), rest[2] if len(rest) > 2 else -1)
    if name == "indent":
        width = rest[0] if rest else kwargs.get("width", 4)
        w = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        return text_len + (text_len + 1) * w if not isinstance(value, str) else text_len + (value.count("\n") + 1) * w
    if name == "wordwrap":
        width = rest[0] if rest else kwargs.get("width", 79)
        wrap = rest[2] if len(rest) > 2 else kwargs.get("wrapstring") or "\n"
        width = width if isinstance(width, int) and width > 0 else 1
        return text_len + (text_len // width + 1) * len(str(wrap))
    if name == "join":
        sep = rest[0] if rest else kwargs.get("d", "")
        return text_len + len(str(sep)) * _shallow_size(value)
    return text_len


def _guard_filter(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    pass_arg = _PassArg.from_obj(fn)
    skip = 0 if pass_arg is None else 1  # a context / eval context / environment comes first
    text_filter = name in _TEXT_FILTERS

    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.tick()
        values = args[skip:]
        budget.ensure_args((*values[1:], *kwargs.values()))
        if text_filter:
            budget.ensure(_filter_estimate(name, values, kwargs, budget.limits.max_chars), f"the result of |{name}")
        if name == "join" and values and not isinstance(values[0], (list, tuple, str, dict, set, frozenset, range)):
            args = (*args[:skip], list(_take(values[0], budget.limits.max_chars + 1)), *values[1:])
        return budget.charge(fn(*args, **kwargs), f"the result of |{name}")

    return guarded


def _guard_iter(iterable: Any) -> Iterator[Any]:
    budget = _budget()
    for item in iterable:
        budget.tick()
        budget.spend(1)
        yield item


def _safe_range(*args: int) -> range:
    budget = _budget()
    r = range(*args)
    n = _range_len(r)
    if n > budget.limits.max_range:
        raise TemplateLimitError(f"range() of {n} items is over the chat template limit of {budget.limits.max_range}")
    return r


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    code_generator_class = _GuardedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self) -> None:
        super().__init__(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_GenerationTag, jinja2.ext.loopcontrols],
            finalize=self._finalize,
        )
        self.filters["tojson"] = _tojson
        self.filters = {name: _guard_filter(name, fn) for name, fn in self.filters.items()}
        self.filters["tokenmill_guard_iter"] = _guard_iter
        self.globals.pop("lipsum", None)  # lipsum(n, max=...) makes n * max words
        self.globals.update(
            raise_exception=_raise_exception,
            strftime_now=_strftime_now,
            dict=_TemplateDict(),
            namespace=_Namespace,
            range=_safe_range,
        )

    # Every {% for %} iterates through the guard: one deadline check per iteration.
    def _parse(self, source: str, name: str | None, filename: str | None) -> jinja2.nodes.Template:
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(jinja2.nodes.For):
            loop.iter = jinja2.nodes.Filter(loop.iter, "tokenmill_guard_iter", [], [], None, None)
        return tree

    @staticmethod
    def _finalize(value: Any) -> Any:
        budget = _budget()
        budget.tick()
        budget.ensure_text(value, "output")
        return value

    def guarded_concat(self, parts: tuple[Any, ...]) -> str:
        budget = _budget()
        budget.tick()
        limit = budget.limits.max_chars
        size = 0
        for p in parts:
            size += len(p) if isinstance(p, str) else _weight(p, limit)
        budget.ensure(size, "a concatenated string")
        budget.spend(size)
        return "".join(map(str, parts))

    def concat(self, parts: Iterable[str]) -> str:  # type: ignore[override]
        """Join rendered chunks (the whole output, a macro's, a captured block's), counting as they come."""
        budget = _budget()
        limit = budget.limits.max_chars
        size = 0
        chunks = []
        for chunk in parts:
            budget.tick()
            size += len(chunk)
            if size > limit:
                raise TemplateLimitError(f"the chat template rendered more than {limit} characters")
            chunks.append(chunk)
        budget.spend(size)
        return "".join(chunks)

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if isinstance(obj, str) and callable(value) and attr not in _STR_METHODS:
            return False
        return super().is_safe_attribute(obj, attr, value)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _budget().tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _budget().tick()
        return super().getitem(obj, argument)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        budget.tick()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(n, int) and isinstance(seq, (str, list, tuple)):
                    budget.ensure(_shallow_size(seq) * max(n, 0), "a repeated sequence")
            if isinstance(left, int) and isinstance(right, int):
                if left.bit_length() + right.bit_length() > budget.limits.max_int_bits:
                    raise TemplateLimitError(f"the chat template built an integer over {budget.limits.max_int_bits} bits")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                if left.bit_length() * min(right, 1 << 40) > budget.limits.max_int_bits:
                    raise TemplateLimitError(f"the chat template built an integer over {budget.limits.max_int_bits} bits")
        elif operator == "%":
            if isinstance(left, str):
                _check_percent_format(budget, left, right)
        elif operator == "+":
            if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                budget.ensure(len(left) + len(right), "a concatenated sequence")
        return budget.charge(super().call_binop(context, operator, left, right), "the result of an operator")

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """``str.format`` / ``format_map`` as the sandbox wraps them, with widths and sizes checked first."""
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        fmt: str = value.__self__
        is_map = value.__name__ == "format_map"

        def checked(*args: Any, **kwargs: Any) -> str:
            budget = _budget()
            if is_map:
                mapping = args[0] if args and isinstance(args[0], dict) else {}
                _check_brace_format(budget, fmt, (), mapping)
            else:
                _check_brace_format(budget, fmt, args, kwargs)
            return budget.charge(wrapper(*args, **kwargs), "formatted text")

        return functools.update_wrapper(checked, value)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - jinja's signature
        budget = _budget()
        budget.tick()
        budget.ensure_args((*args, *kwargs.values()))
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            args = _check_str_method(budget, owner, getattr(__obj, "__name__", ""), args, kwargs)
        if budget.depth >= budget.limits.max_depth:
            raise TemplateLimitError(f"the chat template nests calls more than {budget.limits.max_depth} deep")
        budget.depth += 1
        try:
            result = super().call(__context, __obj, *args, **kwargs)
        finally:
            budget.depth -= 1
        return budget.charge(result, "the result of a call")


# ------------------------------------------------------------------ render


_ENV = _BoundedSandbox()


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    try:
        return _ENV.from_string(source)
    except RecursionError:
        raise TemplateError("the chat template is nested too deeply to compile") from None


_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
_RESERVED = frozenset({"messages", "tools", "documents", "add_generation_prompt", "continue_final_message", "chat_template"})


def render_chat_template(
    source: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool,
    continue_final_message: bool = False,
    variables: dict[str, Any] | None = None,
    limits: TemplateLimits = _DEFAULT_LIMITS,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """Render ``messages`` as transformers' ``apply_chat_template(..., tokenize=False)`` would, within ``limits``.

    ``variables`` are the special tokens (``bos_token`` ...) and the
    request's ``chat_template_kwargs``; names the template's own arguments
    use are ignored. ``tools`` are the request's tools (OpenAI's shape), or None. Raises ``TemplateLimitError``, ``TemplateRefusal`` or
    another ``TemplateError``; a ``ValueError`` for a final message that
    cannot be continued.
    """
    budget = _Budget(limits)
    token = _BUDGET.set(budget)
    try:
        template = _compile(source)
        # transformers drops None values: templates test for a missing key, not for None.
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        final = None
        if continue_final_message:
            final = chat[-1].get("content")
            if not isinstance(final, str):
                raise ValueError("continue_final_message needs a final message with text content")
            if "content" not in source:
                raise ValueError("continue_final_message is set but the chat template does not render 'content'")
            chat[-1] = {**chat[-1], "content": final + _CONTINUE_TAG}
        extra = {k: v for k, v in (variables or {}).items() if k not in _RESERVED}
        try:
            text = template.render(
                messages=chat, tools=tools, documents=None, add_generation_prompt=add_generation_prompt, **extra
            )
        except RecursionError:
            raise TemplateLimitError("the chat template recursed too deeply") from None
        except MemoryError:
            raise TemplateLimitError("the chat template ran out of memory") from None
    finally:
        _BUDGET.reset(token)
    if final is not None:
        tag = _CONTINUE_TAG.strip()
        if final.strip() not in text or tag not in text:
            raise ValueError("continue_final_message is set but the chat template drops the final message")
        at = text.rindex(tag)
        text = text[:at] if text[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()
    if len(text) > limits.max_output_chars:
        raise TemplateLimitError(
            f"the chat template rendered {len(text)} characters, over the limit of {limits.max_output_chars}"
        )
    return text
