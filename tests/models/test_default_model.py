"""The bundled default model: files, tokenizer, chat template, and that it learned English.

The checkpoint under ``tokenmill/models/default`` is package data made by
``scripts/train_default_model.py``; these tests check it with transformers only
(tokenmill's own parity test lives with the model code). All run in seconds.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch

from tokenmill.models import DEFAULT_MODEL_NAME, DEFAULT_MODEL_PATH, HELDOUT_SAMPLE_PATH

REPO_ROOT = Path(__file__).resolve().parents[2]
REQUIRED_FILES = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "README.md",
    "heldout_sample.txt",
]
SPECIALS = {"<|endoftext|>": 0, "<|system|>": 1, "<|user|>": 2, "<|assistant|>": 3, "<|end|>": 4}


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEFAULT_MODEL_PATH, local_files_only=True)


@pytest.fixture(scope="module")
def model() -> Any:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(
        DEFAULT_MODEL_PATH, local_files_only=True, dtype=torch.float32
    )
    m.eval()
    return m


def test_default_model_is_named_once() -> None:
    import tokenmill

    assert DEFAULT_MODEL_NAME == "tokenmill-default"
    assert DEFAULT_MODEL_PATH.name == "default"
    assert Path(tokenmill.DEFAULT_MODEL) == DEFAULT_MODEL_PATH


def test_files_exist_and_are_small() -> None:
    for name in REQUIRED_FILES:
        assert (DEFAULT_MODEL_PATH / name).is_file(), name
    total = sum(f.stat().st_size for f in DEFAULT_MODEL_PATH.iterdir() if f.is_file())
    assert total < 30 * 1024 * 1024
    assert not list(DEFAULT_MODEL_PATH.glob("*.bin")), "weights must be safetensors only"


def test_files_are_package_data() -> None:
    """Every file of the model matches a package-data glob, so wheels carry it."""
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["tokenmill"]
    package_root = REPO_ROOT / "tokenmill"
    for f in DEFAULT_MODEL_PATH.iterdir():
        rel = f.relative_to(package_root).as_posix()
        assert any(fnmatch.fnmatch(rel, g) for g in globs), rel


def test_config_shape() -> None:
    cfg = json.loads((DEFAULT_MODEL_PATH / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["vocab_size"] == 4096
    assert cfg["num_attention_heads"] % cfg["num_key_value_heads"] == 0
    assert cfg["tie_word_embeddings"] is True
    assert cfg["rope_theta"] == 10000.0
    assert cfg["max_position_embeddings"] == 1024
    gen = json.loads((DEFAULT_MODEL_PATH / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [SPECIALS["<|endoftext|>"], SPECIALS["<|end|>"]]


def test_parameter_count(model: Any) -> None:
    n = sum(p.numel() for p in model.parameters())
    assert 5_000_000 <= n <= 20_000_000


def test_tokenizer_is_byte_level_bpe(tokenizer: Any) -> None:
    spec = json.loads((DEFAULT_MODEL_PATH / "tokenizer.json").read_text())
    assert spec["model"]["type"] == "BPE"
    assert spec["pre_tokenizer"]["type"] == "ByteLevel"
    assert spec["decoder"]["type"] == "ByteLevel"
    assert len(tokenizer) == 4096
    for token, idx in SPECIALS.items():
        assert tokenizer.convert_tokens_to_ids(token) == idx
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == tokenizer.pad_token_id == 0
    text = "Grüße, 東京! 😀 tabs\tand\nnewlines  ~{}"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer("And God said", add_special_tokens=True)["input_ids"][0] != 0  # no BOS added


def test_chat_template(tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Peace be unto you."},
        {"role": "user", "content": [{"type": "text", "text": "And then?"}]},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nHello<|end|>\n"
        "<|assistant|>\nPeace be unto you.<|end|>\n<|user|>\nAnd then?<|end|>\n<|assistant|>\n"
    )
    no_prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False)
    assert no_prompt.endswith("<|end|>\n")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(SPECIALS["<|end|>"]) == 4 and ids[-2] == SPECIALS["<|assistant|>"]


def test_heldout_loss_far_below_uniform(tokenizer: Any, model: Any) -> None:
    """Held-out loss is far below uniform (ln 4096 = 8.32 nats/token).

    The bound is half of ln(vocab), i.e. perplexity under sqrt(vocab) = 64; the
    shipped model scores about 3.1 on this slice (3.39 on the whole held-out
    split). A third of ln(vocab) (2.77 nats/token, about 1.0 bit per character
    at 3.98 characters per token) would need a far larger training budget.
    """
    text = HELDOUT_SAMPLE_PATH.read_text()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 1000
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 512):
            x = torch.tensor([ids[start : start + 512]])
            if x.shape[1] < 2:
                continue
            logits = model(input_ids=x).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
            count += x.shape[1] - 1
    loss = total / count
    assert loss < math.log(len(tokenizer)) / 2, loss


def test_greedy_continuation_is_english(tokenizer: Any, model: Any) -> None:
    enc = tokenizer("And God said", return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=40, do_sample=False)
    text = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    words = re.findall(r"[A-Za-z]+", text)
    assert len(words) >= 15, text
    common = {"the", "and", "of", "unto", "that", "he", "to", "shall", "in", "is", "be", "i"}
    assert sum(w.lower() in common for w in words) >= 4, text


def test_model_card_reports_corpus_and_perplexity() -> None:
    card = (DEFAULT_MODEL_PATH / "README.md").read_text()
    assert "King James" in card and "public domain" in card
    assert re.search(r"perplexity \d+(\.\d+)?", card)
