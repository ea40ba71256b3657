"""The bundled LoRA adapter ``psalms`` (made by ``scripts/train_psalms_lora.py``): its files, its
size, that tokenmill and peft score the held-out psalms alike, and that it beats the base there."""

from __future__ import annotations

import fnmatch
import json
import math
import re
import tomllib
from pathlib import Path

import pytest
import torch

from tokenmill.models import BUNDLED_ADAPTERS, DEFAULT_MODEL_PATH

REPO_ROOT = Path(__file__).resolve().parents[2]
PSALMS = BUNDLED_ADAPTERS["psalms"]
TOKENS = 512  # of the held-out psalms, scored by both


@pytest.fixture(scope="module")
def heldout_ids() -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL_PATH, local_files_only=True)
    return tok((PSALMS / "heldout_psalms.txt").read_text(), add_special_tokens=False)["input_ids"][:TOKENS]


def test_files_size_and_package_data() -> None:
    names = {f.name for f in PSALMS.iterdir()}
    assert names == {"adapter_config.json", "adapter_model.safetensors", "README.md", "heldout_psalms.txt"}
    assert sum(f.stat().st_size for f in PSALMS.iterdir()) <= 2 * 10**6
    cfg = json.loads((PSALMS / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["base_model_name_or_path"] == "tokenmill-default"
    globs = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["tokenmill"]
    for f in PSALMS.iterdir():
        rel = f.relative_to(REPO_ROOT / "tokenmill").as_posix()
        assert any(fnmatch.fnmatch(rel, g) for g in globs), rel


def tokenmill_losses(ids: list[int]) -> dict[str | None, float]:
    from tokenmill import LLM, SamplingParams

    llm = LLM(kv_cache_memory=16 << 20, lora_modules={"psalms": str(PSALMS)})
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": ids}] * 2, params, lora=[None, "psalms"])
    losses: dict[str | None, float] = {}
    for lora, out in zip((None, "psalms"), outs, strict=True):
        lps = [entry[t].logprob for t, entry in zip(ids[1:], out.prompt_logprobs[1:], strict=True)]
        losses[lora] = -sum(lps) / len(lps)
    return losses


def peft_losses(ids: list[int]) -> dict[str | None, float]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_PATH, dtype=torch.float32), PSALMS)
    x = torch.tensor([ids])
    with torch.no_grad():
        with model.disable_adapter():
            base = float(model(input_ids=x, labels=x).loss)
        return {None: base, "psalms": float(model(input_ids=x, labels=x).loss)}


def test_tokenmill_and_peft_agree_and_the_adapter_helps(heldout_ids: list[int]) -> None:
    got, want = tokenmill_losses(heldout_ids), peft_losses(heldout_ids)
    assert got[None] == pytest.approx(want[None], abs=2e-3)
    assert got["psalms"] == pytest.approx(want["psalms"], abs=2e-3)
    assert got["psalms"] < got[None] - 0.03
    # the card reports the full held-out figures: the adapter's is lower there too
    card = (PSALMS / "README.md").read_text()
    rows = re.findall(r"\| held-out psalms.*?\| (\d+\.\d+) / [\d.]+ \| (\d+\.\d+) / [\d.]+ \|", card)
    card_base, card_lora = map(float, rows[0])
    assert card_lora < card_base and math.isfinite(card_lora)
