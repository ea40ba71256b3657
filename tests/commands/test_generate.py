"""``tokenmill generate``: every SamplingParams field of a JSONL line is honoured, bad lines are refused
with their line, sizes take units as ``serve`` does, and a model without tokenizer files says so."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tokenmill.cli import main


def write_jsonl(path: Path, *lines: dict[str, Any]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def generate(model: Path, tmp_path: Path, *lines: dict[str, Any], flags: tuple[str, ...] = ()) -> list[dict]:
    src, out = write_jsonl(tmp_path / "in.jsonl", *lines), tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(model), "--input", str(src), "--output", str(out),
                 "--kv-cache-memory", "4MiB", *flags]) == 0  # fmt: skip
    return [json.loads(x) for x in out.read_text().splitlines()]


def test_jsonl_sampling_fields_are_honoured(tiny_model_dir: Any, tmp_path: Path) -> None:
    model = tiny_model_dir("llama")
    base = {"prompt": "the scheduler moved", "max_tokens": 8, "ignore_eos": True}
    (ref,) = generate(model, tmp_path, base)
    tokens = ref["outputs"][0]["token_ids"]
    assert len(tokens) == 8 and "logprobs" not in ref["outputs"][0]
    stop_id = tokens[2]
    first = tokens.index(stop_id)
    stopped, held, logprobs, by_ids = generate(
        model, tmp_path,
        {**base, "stop_token_ids": [stop_id]},
        {**base, "stop_token_ids": [stop_id], "min_tokens": first + 3},
        {**base, "logprobs": 2},
        {"prompt_token_ids": ref["outputs"][0]["token_ids"][:3], "max_tokens": 2},
    )  # fmt: skip
    # stop_token_ids ends the sample at the stop token; min_tokens holds it back until then.
    assert stopped["outputs"][0]["token_ids"] == tokens[: first + 1]
    assert stopped["outputs"][0]["finish_reason"] == "stop"
    assert len(held["outputs"][0]["token_ids"]) >= first + 3
    # logprobs: the sampled token and the top 2 for each generated token.
    sample = logprobs["outputs"][0]
    assert len(sample["logprobs"]) == 8
    for tok, step in zip(sample["token_ids"], sample["logprobs"], strict=True):
        assert tok in [e["token_id"] for e in step] and 2 <= len(step) <= 3
        assert all(e["logprob"] <= 0 for e in step)
    assert sample["cumulative_logprob"] == pytest.approx(
        sum(next(e["logprob"] for e in step if e["token_id"] == t) for t, step in zip(sample["token_ids"], sample["logprobs"], strict=True)),
        abs=1e-4,
    )  # fmt: skip
    assert by_ids["num_prompt_tokens"] == 3 and len(by_ids["outputs"][0]["token_ids"]) == 2


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ({"prompt": "x", "bogus": 1}, ["in.jsonl:2", "unknown field 'bogus'", "stop_token_ids"]),
        ({"prompt": "x", "temperature": "hot"}, ["in.jsonl:2", "temperature"]),
        ({"prompt": "x", "max_tokens": 2.5}, ["in.jsonl:2", "max_tokens"]),
        ({"prompt": "x", "stop_token_ids": ["a"]}, ["in.jsonl:2", "stop_token_ids"]),
        ({"prompt": "x", "top_p": 0}, ["in.jsonl:2", "top_p"]),
        ({"prompt": "x", "min_tokens": 99, "max_tokens": 4}, ["in.jsonl:2", "min_tokens"]),
        ({"prompt": 5}, ["in.jsonl:2", "prompt"]),
        ({"text": "x"}, ["in.jsonl:2", "prompt"]),
    ],
)
def test_bad_lines_are_refused_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    line: dict[str, Any], words: list[str]) -> None:  # fmt: skip
    # A model path that does not exist: the lines are refused before the model would be looked at.
    src = write_jsonl(tmp_path / "in.jsonl", {"prompt": "fine"}, line)
    assert main(["generate", "--model", str(tmp_path / "no-model"), "--input", str(src)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ")
    for w in words:
        assert w in err, err


def test_kv_cache_memory_takes_units(tiny_model_dir: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model", str(tiny_model_dir("llama")), "--kv-cache-memory", "1MiB",
                 "--max-tokens", "2", "hello"]) == 0  # fmt: skip
    assert capsys.readouterr().out.startswith("hello")
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--kv-cache-memory", "lots", "hello"])
    assert exc.value.code == 2


def test_model_without_tokenizer_files(tiny_model_dir: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir("llama") / f, tmp_path / f)
    assert main(["generate", "--model", str(tmp_path), "hello"]) == 2
    err = capsys.readouterr().err
    assert f"no tokenizer files in {tmp_path}" in err and "sentencepiece" not in err


def test_missing_input_and_unwritable_output(tiny_model_dir: Any, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    assert main(["generate", "--input", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl" in capsys.readouterr().err
    src = write_jsonl(tmp_path / "in.jsonl", {"prompt": "x"})
    assert main(["generate", "--model", str(tiny_model_dir("llama")), "--input", str(src),
                 "--output", str(tmp_path / "no-dir" / "out.jsonl")]) == 2  # fmt: skip
    assert "no-dir" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("\n")
    assert main(["generate", "--input", str(tmp_path / "empty.jsonl")]) == 2
    assert "no prompts" in capsys.readouterr().err


def test_trace_file_holds_each_requests_timeline(tiny_model_dir: Any, tmp_path: Path) -> None:
    from tests.core.test_timeline import check_trace
    from tokenmill.sim.trace_file import read_trace

    trace = tmp_path / "t.json"
    generate(tiny_model_dir("llama"), tmp_path, {"prompt": "one two", "max_tokens": 5, "ignore_eos": True},
             {"prompt": "three", "max_tokens": 3, "ignore_eos": True, "n": 2},
             flags=("--trace-file", str(trace)))  # fmt: skip
    check_trace(json.loads(trace.read_text()))
    timelines = read_trace(trace)
    assert len(timelines) == 3  # the n=2 request is two core requests
    assert sorted(r.output_tokens for r in timelines.values()) == [3, 3, 5]
    for r in timelines.values():
        assert r.prefill and r.arrival <= r.first_token <= r.finish and r.reason == "length"
def test_kv_eviction_flags_reach_the_engine(tiny_model_dir: Any, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from tokenmill.core.kv_eviction import KVEviction
    from tokenmill.engine import Engine

    seen = []
    init = Engine.__init__

    def spy(self: Engine, config: Any, *args: Any, **kwargs: Any) -> None:
        seen.append(config.kv_eviction)
        init(self, config, *args, **kwargs)

    monkeypatch.setattr(Engine, "__init__", spy)
    model = str(tiny_model_dir("llama"))
    assert main(["generate", "--model", model, "--max-tokens", "30", "--kv-eviction", "h2o", "--kv-budget", "12",
                 "--kv-sinks", "2", "hello"]) == 0  # fmt: skip
    assert seen == [KVEviction("h2o", 12, sinks=2)]
    assert capsys.readouterr().out.startswith("hello")
    assert main(["generate", "--model", model, "--kv-eviction", "streaming", "--kv-budget", "4", "hello"]) == 2
    assert "--kv-budget 4 is smaller than --kv-sinks + --kv-recent" in capsys.readouterr().err


def test_structured_output_flags_and_jsonl_field(tiny_model_dir: Any, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    import re

    import jsonschema

    model = tiny_model_dir("llama")
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9},
                                               "w": {"enum": ["a", "b"]}}, "required": ["n", "w"]}  # fmt: skip
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    base = {"prompt": "x", "max_tokens": 40, "temperature": 1.0, "seed": 1}
    from_file, regex_line = generate(
        model, tmp_path, base, {**base, "structured_outputs": {"regex": "[a-c]{4}"}},
        flags=("--json-schema", f"@{tmp_path / 'schema.json'}", "--disable-any-whitespace"),
    )  # fmt: skip
    out = from_file["outputs"][0]
    assert out["finish_reason"] == "stop"
    jsonschema.validate(json.loads(out["text"]), schema)
    assert re.fullmatch("[a-c]{4}", regex_line["outputs"][0]["text"])  # the line's own field wins
    capsys.readouterr()
    assert main(["generate", "--model", str(model), "--kv-cache-memory", "4MiB", "--choice", "yes",
                 "--choice", "no", "--temperature", "1", "hi"]) == 0  # fmt: skip
    assert capsys.readouterr().out.strip() in ("hiyes", "hino")
    assert main(["generate", "--model", str(model), "--regex", "a(", "hi"]) == 2
    assert "regex" in capsys.readouterr().err
    assert main(["generate", "--model", str(model), "--json-schema", "{not json", "hi"]) == 2
    assert "--json-schema is not valid JSON" in capsys.readouterr().err
