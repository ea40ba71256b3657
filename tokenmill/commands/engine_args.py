"""The engine's flags, made from ``EngineConfig`` itself: written once, shared by ``serve`` and ``generate``.

Every ``EngineConfig`` field with ``cli`` metadata becomes ``--field-name``
(underscores to dashes) with the field's own default in its help. A flag
left out stays ``None`` in the parsed arguments, so ``engine_config()``
passes only what was given and every default lives in the dataclass. A
command may change a default shown to its users (``generate`` keeps a
smaller KV cache) through ``defaults``.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, Field, fields
from typing import Any

from tokenmill.commands.options import key_value, positive_int, size_in, threads


def _engine_fields() -> list[Field]:
    from tokenmill.engine import EngineConfig

    return [f for f in fields(EngineConfig) if "cli" in f.metadata]


def _default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


def _shown(value: Any, kind: str) -> str:
    if kind == "size" and isinstance(value, int) and value >= 1 << 20 and value % (1 << 20) == 0:
        return f"{value >> 30}GiB" if value % (1 << 30) == 0 else f"{value >> 20}MiB"
    if kind == "bool":
        return "on" if value else "off"
    return str(value)


class _KeyValues(argparse.Action):
    """A repeatable ``KEY=VALUE`` flag collected into a dict (a later KEY wins)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:  # fmt: skip
        key, value = values
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest, None) or {}), key: value})


def add_engine_arguments(parser: argparse.ArgumentParser, defaults: dict[str, Any] | None = None) -> None:
    """Add a flag for every ``EngineConfig`` field that has one; ``defaults`` overrides a field's default."""
    defaults = defaults or {}
    group = parser.add_argument_group("engine")
    for f in _engine_fields():
        spec = f.metadata["cli"]
        kind = spec["kind"]
        flag = spec.get("flag", "--" + f.name.replace("_", "-"))
        default = defaults.get(f.name, _default(f))
        help_text = spec["help"]
        if default is not None and "(default" not in help_text and kind not in ("key_value", "flag"):
            help_text += f" (default: {_shown(default, kind)})"
        common: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        if kind == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
            for alias in spec.get("aliases", []):
                group.add_argument(alias, dest=f.name, action="store_false", default=None,
                                   help=f"same as --no-{flag[2:]}")  # fmt: skip
        elif kind == "flag":
            group.add_argument(flag, action="store_true", **common)
        elif kind == "key_value":
            group.add_argument(flag, action=_KeyValues, type=key_value, metavar="KEY=VALUE", **common)
        elif kind == "choice":
            group.add_argument(flag, choices=spec["choices"], **common)
        elif kind == "policy":
            from tokenmill.core.policies import available_policies

            common["help"] += ": " + ", ".join(sorted(available_policies()))
            group.add_argument(flag, **common)
        else:
            types = {"size": size_in(1), "positive": positive_int, "str": str, "threads": threads}
            metavars = {"size": "SIZE", "positive": "N", "str": None, "threads": "auto|N"}
            group.add_argument(flag, type=types[kind], metavar=metavars[kind], **common)
    parser.set_defaults(_engine_defaults=defaults)


def engine_value(args: argparse.Namespace, name: str) -> Any:
    """A field's value as the command runs with it: the flag, else the command's default, else the field's."""
    value = getattr(args, name, None)
    if value is not None:
        return value
    defaults = getattr(args, "_engine_defaults", {})
    if name in defaults:
        return defaults[name]
    return _default(next(f for f in _engine_fields() if f.name == name))


def engine_config(args: argparse.Namespace, **fixed: Any) -> Any:
    """``EngineConfig`` from the flags given (and the command's defaults), with ``fixed`` fields on top."""
    from tokenmill.engine import EngineConfig

    given: dict[str, Any] = {}
    defaults = getattr(args, "_engine_defaults", {})
    for f in _engine_fields():
        if getattr(args, f.name, None) is not None or f.name in defaults:
            given[f.name] = engine_value(args, f.name)
    given.update(fixed)
    return EngineConfig(**given)
