"""The engine's flags come from ``EngineConfig``: every flagged field reaches the config, defaults live in one place."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

import pytest

import tokenmill.engine
from tokenmill.cli import main
from tokenmill.commands.engine_args import add_engine_arguments, engine_config
from tokenmill.engine import EngineConfig

# A value for each kind of flag that differs from every field's default.
GIVEN = {"size": ("3MiB", 3 << 20), "positive": ("3", 3), "str": ("x", "x")}


def flagged() -> list[Any]:
    return [f for f in fields(EngineConfig) if "cli" in f.metadata]


def parse(argv: list[str], defaults: dict[str, Any] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser, defaults)
    return parser.parse_args(argv)


def test_no_flags_give_the_dataclass_defaults() -> None:
    assert engine_config(parse([])) == EngineConfig()


def test_every_flag_reaches_its_field() -> None:
    argv: list[str] = []
    expected: dict[str, Any] = {}
    for f in flagged():
        kind = f.metadata["cli"]["kind"]
        flag = f.metadata["cli"].get("flag", "--" + f.name.replace("_", "-"))
        if kind in GIVEN:
            argv += [flag, GIVEN[kind][0]]
            expected[f.name] = GIVEN[kind][1]
        elif kind == "bool":
            argv.append("--no-" + flag[2:])
            expected[f.name] = False
        elif kind == "flag":
            argv.append(flag)
            expected[f.name] = True
        elif kind == "choice":
            argv += [flag, f.metadata["cli"]["choices"][-1]]
            expected[f.name] = f.metadata["cli"]["choices"][-1]
        elif kind == "policy":
            argv += [flag, "vtc"]
            expected[f.name] = "vtc"
        elif kind == "key_value":
            argv += [flag, "a=1", flag, "b=[2]"]
            expected[f.name] = {"a": 1, "b": [2]}
        else:
            pytest.fail(f"no test value for kind {kind!r} of {f.name}")
    config = engine_config(parse(argv))
    for name, value in expected.items():
        assert getattr(config, name) == value, name
        assert getattr(EngineConfig(), name) != value, name


def test_command_defaults_and_aliases() -> None:
    assert engine_config(parse([], {"kv_cache_memory": 5 << 20})).kv_cache_memory == 5 << 20
    assert engine_config(parse(["--kv-cache-memory", "1GiB"], {"kv_cache_memory": 5 << 20})).kv_cache_memory == 1 << 30
    assert engine_config(parse(["--no-prefix-caching"])).enable_prefix_caching is False
    assert engine_config(parse([]), policy="lpm").policy == "lpm"


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_both_commands_build_the_engine_from_the_same_flags(command: str, tiny_model_dir: Any,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    seen: list[EngineConfig] = []

    class Stop(Exception):
        pass

    def fake_engine(config: EngineConfig, *args: Any, **kwargs: Any) -> None:
        seen.append(config)
        raise Stop

    # tokenmill.llm first: importing it takes tokenmill.engine.Engine, which must still be the real one
    # (else the fake is what monkeypatch restores there, for every later test)
    monkeypatch.setattr("tokenmill.llm.Engine", fake_engine)
    monkeypatch.setattr(tokenmill.engine, "Engine", fake_engine)
    model = str(tiny_model_dir("llama"))
    flags = ["--max-decode-steps", "2", "--no-enable-chunked-prefill", "--policy", "lpm", "--device", "cpu"]
    argv = ["serve", model, *flags] if command == "serve" else ["generate", "--model", model, *flags, "hi"]
    with pytest.raises(Stop):
        main(argv)
    config = seen[0]
    assert (config.max_decode_steps, config.enable_chunked_prefill, config.policy) == (2, False, "lpm")
    assert config.model == model and config.device == "cpu"
    assert config.kv_cache_memory == (1 << 30 if command == "serve" else 256 << 20)
