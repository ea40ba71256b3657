"""``tokenmill serve --lora-modules ...``: adapters are checked before the server listens; a bad one
ends the command with one line naming it (exit code 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.commands.test_serve import one_line_error
from tokenmill.cli import main
from tokenmill.lora.testing import write_random_adapter


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Replaces the server runner: records the state a started server would have served."""
    seen: dict[str, Any] = {}

    def run(app: Any, state: Any, host: str, port: int, **kw: Any) -> int:
        seen["state"] = state
        seen["paths"] = {route.path for route in app.routes}
        return 0

    monkeypatch.setattr("tokenmill.server.runner.run_server", run)
    return seen


def test_adapters_are_loaded_before_serving(tiny_model_dir: Any, tmp_path: Path, started: dict[str, Any]) -> None:
    model = tiny_model_dir("llama")
    a = write_random_adapter(tmp_path / "a", model, rank=4, targets=("q_proj",))
    b = write_random_adapter(tmp_path / "b", model, rank=8)
    spec = '{"name": "b", "path": "' + str(b) + '"}'
    assert main(["serve", str(model), "--served-model-name", "tiny", "--lora-modules", f"a={a}", spec,
                 "--max-loras", "2", "--max-lora-rank", "8", "--enable-lora-runtime-updates"]) == 0  # fmt: skip
    state = started["state"]
    assert state.loras == {"a": str(a.resolve()), "b": str(b.resolve())}
    engine = state.async_engine.engine
    assert (engine.config.max_loras, engine.config.max_lora_rank) == (2, 8)
    assert "/v1/load_lora_adapter" in started["paths"] and "/v1/unload_lora_adapter" in started["paths"]


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda m, d: f"big={write_random_adapter(d / 'big', m, rank=32)}", ["--lora-modules big=", "rank 32"]),
        (lambda m, d: f"gone={d / 'gone'}", ["--lora-modules gone=", "is not a directory"]),
        (lambda m, d: f"tiny={write_random_adapter(d / 't', m, rank=4)}", ["the base model's served name"]),
    ],
)
def test_a_bad_adapter_stops_the_command(tiny_model_dir: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         started: dict[str, Any], make: Any, words: list[str]) -> None:  # fmt: skip
    model = tiny_model_dir("llama")
    assert main(["serve", str(model), "--served-model-name", "tiny", "--lora-modules", make(model, tmp_path)]) == 2
    one_line_error(capsys, *words)
    assert "state" not in started


@pytest.mark.parametrize("value", ["nosuchbundled", "=path", "name=", '{"name": 1}', "{bad json"])
def test_malformed_lora_module_flags(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--lora-modules", value])
    assert exc.value.code == 2
    assert "--lora-modules" in capsys.readouterr().err
