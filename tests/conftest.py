"""Shared fixtures: tiny Hugging Face checkpoints made from seeded random weights.

Nothing is downloaded: each model is a transformers config with random
weights saved as safetensors, plus a small byte-level BPE tokenizer trained
here, so the engine loads it exactly as it would a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TOKENIZER_TEXT = (
    "In the beginning the serving engine was without form, and void; and the scheduler moved upon the "
    "face of the queue. And it said, let there be blocks: and there were blocks. Numbers 0123456789, "
    "punctuation !?.,;:'\"()[]{} and a few words of other tongues: café, naïve, straße, 東京, 😀."
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(path: Path, vocab_size: int = 320) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TOKENIZER_TEXT] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


ARCH_CONFIGS = {
    "llama": dict(
        cls="LlamaConfig",
        kw=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False),
    ),
    "qwen2": dict(
        cls="Qwen2Config",
        kw=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True),
    ),
    "mistral": dict(
        cls="MistralConfig",
        kw=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=1, max_position_embeddings=256, sliding_window=None,
                tie_word_embeddings=False),
    ),
}  # fmt: skip


def make_tiny_model(path: Path, arch: str = "llama", seed: int = 0, vocab_size: int = 320) -> Path:
    import torch
    import transformers

    spec = ARCH_CONFIGS[arch]
    config = getattr(transformers, spec["cls"])(vocab_size=vocab_size, eos_token_id=0, bos_token_id=0, **spec["kw"])
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init is tiny; scale up so that greedy choices are far from ties, and
    # make biases and norm weights non-trivial so that loading them is tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
            elif "bias" in name:
                p.normal_(0.0, 0.1)
            else:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    make_tokenizer(path, vocab_size)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """A factory: ``tiny_model_dir("qwen2")`` -> path of a cached tiny checkpoint."""
    cache: dict[str, Path] = {}

    def get(arch: str = "llama") -> Path:
        if arch not in cache:
            cache[arch] = make_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch)
        return cache[arch]

    return get
