"""``tokenmill serve`` refuses bad flags with one line naming the problem (exit code 2), never a traceback.

Every case runs the command in-process; the server runner is replaced by one
that fails the test, so a flag that slips through cannot start a server.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tokenmill.cli import main


@pytest.fixture(autouse=True)
def no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> int:
        raise AssertionError("the server started")

    monkeypatch.setattr("tokenmill.server.runner.run_server", refuse)


def one_line_error(capsys: pytest.CaptureFixture[str], *words: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err
    for w in words:
        assert w in last, last
    return last


@pytest.fixture
def cpu_only_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's torch as a CPU-only build, whatever the machine has."""
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def one_gpu_without_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")


@pytest.mark.usefixtures("cpu_only_torch")
def test_cuda_on_a_cpu_only_torch(tiny_model_dir: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", str(tiny_model_dir("llama")), "--device", "cuda"]) == 2
    one_line_error(capsys, "--device cuda", "CUDA")


@pytest.mark.usefixtures("one_gpu_without_bf16")
@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--device", "cuda:3"], ["--device cuda:3", "1 CUDA device"]),
        (["--device", "cuda", "--dtype", "bfloat16"], ["--dtype bfloat16", "Tesla T4"]),
    ],
)
def test_cuda_device_and_dtype_checks(tiny_model_dir: Any, capsys: pytest.CaptureFixture[str], flags: list[str],
                                      words: list[str]) -> None:  # fmt: skip
    assert main(["serve", str(tiny_model_dir("llama")), *flags]) == 2
    one_line_error(capsys, *words)


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--device", "tpu"], ["--device tpu"]),
        (["--device", "cuda:x"], ["--device cuda:x"]),
        (["--policy", "vtc", "--policy-option", "quantum=5"], ["quantum", "vtc", "input_weight"]),
        (["--policy", "fcfs", "--policy-option", "quantum=5"], ["quantum", "fcfs", "takes no options"]),
        (["--policy", "bins", "--policy-option", "bin_edges=[64, 8]"], ["bins", "bin_edges"]),
        (["--policy", "nope"], ["nope", "fcfs"]),
        (["--max-model-len", "99999"], ["--max-model-len 99999", "256"]),
        (["--kv-cache-memory", "1KiB"], ["KV block"]),
        (["--kv-eviction", "h2o"], ["--kv-eviction h2o", "--kv-budget"]),
        (["--kv-budget", "64"], ["--kv-budget", "--kv-eviction"]),
        (["--kv-eviction", "streaming", "--kv-budget", "8", "--kv-recent", "16"], ["--kv-budget 8", "--kv-sinks"]),
    ],
)
def test_bad_flags_end_in_one_line(tiny_model_dir: Any, capsys: pytest.CaptureFixture[str], flags: list[str],
                                   words: list[str]) -> None:  # fmt: skip
    assert main(["serve", str(tiny_model_dir("llama")), *flags]) == 2
    one_line_error(capsys, *words)


@pytest.mark.parametrize(
    "flags",
    [["--max-model-len", "0"], ["--max-model-len", "-5"], ["--block-size", "0"], ["--port", "99999"],
     ["--max-num-seqs", "0"], ["--max-decode-steps", "0"], ["--kv-cache-memory", "lots"], ["--max-queue", "-1"],
     ["--kv-cache-dtype", "int3"], ["--kv-eviction", "lru"], ["--kv-budget", "0"]],
)  # fmt: skip
def test_out_of_range_numbers_are_usage_errors(capsys: pytest.CaptureFixture[str], flags: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"argument {flags[0]}" in err


def test_bad_model_directories(tmp_path: Path, tiny_model_dir: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", str(tmp_path / "missing")]) == 2
    one_line_error(capsys, "does not exist", "missing")
    assert main(["serve", str(tmp_path)]) == 2
    one_line_error(capsys, "config.json")
    # Weights and config but no tokenizer files: say so, not what transformers guesses.
    model = tmp_path / "no-tokenizer"
    model.mkdir()
    for f in tiny_model_dir("llama").iterdir():
        if f.name in ("config.json", "model.safetensors"):
            shutil.copy(f, model / f.name)
    assert main(["serve", str(model)]) == 2
    one_line_error(capsys, "no tokenizer files", str(model))


def test_trace_file_written_when_the_server_stops(tiny_model_dir: Any, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import json

    from tokenmill.core.request import SamplingParams
    from tokenmill.sim.trace_file import read_trace

    def serve_two(app: Any, state: Any, *args: Any, **kwargs: Any) -> int:
        engine = state.async_engine.engine  # what the engine thread would run while serving
        for rid in ("a", "b"):
            engine.add_request(rid, [1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True))
        while engine.has_unfinished():
            engine.step()
        return 0

    monkeypatch.setattr("tokenmill.server.runner.run_server", serve_two)
    trace = tmp_path / "serve.json"
    assert main(["serve", str(tiny_model_dir("llama")), "--kv-cache-memory", "4MiB", "--trace-file", str(trace)]) == 0
    assert {r.request_id: r.output_tokens for r in read_trace(trace).values()} == {"a": 4, "b": 4}
    assert json.loads(trace.read_text())["otherData"]["command"] == "tokenmill serve"


def test_trace_file_in_a_missing_directory_is_refused(tiny_model_dir: Any, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    assert main(["serve", str(tiny_model_dir("llama")), "--trace-file", str(tmp_path / "no" / "t.json")]) == 2
    one_line_error(capsys, "--trace-file")
