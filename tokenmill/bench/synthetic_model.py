"""Hugging Face checkpoints with seeded random weights, for benchmarks.

``make_model(path, "smollm-135m")`` writes a SmolLM-135M-shaped Llama (30
layers, hidden 576, intermediate 1536, 9 heads, 3 KV heads, vocab 49152, tied
embeddings) with random weights and a GPT-2-style byte-level BPE tokenizer
whose vocabulary matches the model's, so every engine (tokenmill,
transformers, llama.cpp, vLLM) can load the same directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    "smollm-135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True,
        rope_theta=10000.0, rms_norm_eps=1e-5,
    ),
    "tiny": dict(
        hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=2048, max_position_embeddings=1024, tie_word_embeddings=True,
        rope_theta=10000.0, rms_norm_eps=1e-5,
    ),
}  # fmt: skip

EOS = "<|endoftext|>"


def _byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """A byte-level BPE whose merges are synthetic but valid, filling ``vocab_size`` ids."""
    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {EOS: 0}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    merges: list[list[str]] = []
    # Every earlier token followed by every byte symbol, in order: each merged
    # token is reachable from its parts, and the ids fill the vocabulary.
    tokens = list(alphabet)
    i = 0
    while len(vocab) < vocab_size:
        a, b = tokens[i // len(alphabet)], alphabet[i % len(alphabet)]
        i += 1
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
            tokens.append(a + b)
            merges.append([a, b])
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": 0, "content": EOS, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": merges},
    }  # fmt: skip
    (path / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": EOS,
             "pad_token": EOS, "model_max_length": 2048, "clean_up_tokenization_spaces": False}
        )  # fmt: skip
    )


def make_model(path: str | Path, shape: str = "smollm-135m", seed: int = 0) -> Path:
    """Write the checkpoint to ``path`` unless it is already there; return the path."""
    import torch
    import transformers

    path = Path(path)
    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    kw = dict(SHAPES[shape])
    rope_theta = kw.pop("rope_theta")
    config = transformers.LlamaConfig(**kw, bos_token_id=0, eos_token_id=0)
    config.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.05)
    model.save_pretrained(path, safe_serialization=True)
    write_tokenizer(path, kw["vocab_size"])
    return path


def num_params(config: dict[str, Any]) -> tuple[int, int]:
    """(all parameters, parameters outside the embedding/LM head) of a Llama-family config."""
    h, i, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    hd = config.get("head_dim") or h // heads
    per_layer = h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * i + 2 * h
    body = n * per_layer + h
    emb = config["vocab_size"] * h
    total = body + emb * (1 if config.get("tie_word_embeddings") else 2)
    return total, body
