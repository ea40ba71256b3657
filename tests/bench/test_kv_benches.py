"""Smoke runs of the KV-compression benchmarks (``kv_accuracy``, ``kv_cache``) on a tiny checkpoint."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tokenmill.bench import kv_accuracy, kv_cache


def test_kv_accuracy_reports_every_format_and_policy(tiny_model_dir: Any, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 37} and{i % 11}" for i in range(400)))
    assert kv_accuracy.main(["--model", str(tiny_model_dir("llama")), "--text", str(text), "--window", "48",
                             "--max-windows", "2", "--budget", "0.5", "--sinks", "2",
                             "--eviction-chunk", "4"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    ppl = {m[0].strip(): float(m[1]) for m in re.findall(r"^\s*(.+?): perplexity\s+([\d.]+)", out, re.M)}
    assert set(ppl) == {"kv auto", "kv int8", "kv int4", "kv int2 (simulated)", "kv kivi2 (simulated)",
                        "streaming 24/48", "h2o 24/48"}  # fmt: skip
    assert abs(ppl["kv int8"] / ppl["kv auto"] - 1) < 0.01
    assert ppl["streaming 24/48"] != ppl["kv auto"]  # eviction ran: later tokens lost context


def test_kv_cache_capacity_grows_with_the_format_and_decode_runs(tiny_model_dir: Any) -> None:
    model = str(tiny_model_dir("llama"))
    per_block = kv_cache.capacity(model, "bfloat16", "auto", 1 << 20, 64, 1)["bytes_per_block"]
    memory = 40 * per_block  # 10 sequences of 64 tokens in bf16
    rows = {d: kv_cache.capacity(model, "bfloat16", d, memory, 64, 64) for d in ("auto", "int8", "int4")}
    seqs = {d: r["seqs_at_once"] for d, r in rows.items()}
    assert seqs["auto"] == 10
    assert seqs["auto"] < seqs["int8"] < seqs["int4"] < 64
    assert seqs["int8"] == rows["int8"]["num_blocks"] // 4  # 64 tokens: 4 blocks of 16
    assert kv_cache.decode_speed(model, "float32", "int8", batch=2, context=40, output_len=4) > 0


def test_simulated_two_bit_rounding_is_the_int4_formats_at_four_bits() -> None:
    import torch

    from tokenmill.model.kv_format import dequantize, kv_format, quantize

    x = torch.randn(40, 2, 64)
    fmt = kv_format("int4")
    diff = (kv_accuracy.fake_quant(x, 4) - dequantize(*quantize(x, fmt), fmt)).abs()
    step = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / 15
    # equal but for the int4 format's fp16 scale and zero: a few values round to the next level
    assert (diff > 2e-2).float().mean() < 0.01 and bool((diff <= step * 1.01).all())
    two = kv_accuracy.fake_quant(x, 2)
    assert all(len(torch.unique(row)) <= 4 for row in two.view(-1, 64))
    # per channel over groups of tokens: each (group, head, channel) takes at most 4 values
    grouped = kv_accuracy.fake_quant(x, 2, torch.arange(40) // 16)
    for g in range(3):
        block = grouped[g * 16 : (g + 1) * 16]
        assert all(len(torch.unique(block[:, h, c])) <= 4 for h in range(2) for c in range(64))
