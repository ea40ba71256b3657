#!/usr/bin/env python3
"""Train the bundled demonstration LoRA adapter: the default model, specialised on the Psalms.

tokenmill ships one small adapter for its bundled model so that multi-LoRA
serving can be tried offline (``tokenmill serve --lora-modules psalms``). This
script makes it, reproducibly, with ``peft`` (a test extra: ``pip install -e
".[test]"``):

1. **Corpus.** The Book of Psalms from the same KJV text and chapter format as
   ``train_default_model.py`` (Debian's ``bible`` program; ``--corpus FILE``
   reads a saved ``bible -l100000 Gen1:1-Rev22:21`` dump instead).
2. **Split.** Held out from the adapter's training: every tenth psalm
   (10, 20, ..., 150) and the psalms the base model never saw either (those
   its own split held out: chapter index % 50 == 49, i.e. Psalms 22, 72 and
   122). The rest trains the adapter. The base model *did* train on the
   tenth psalms, so the held-out comparison on them favours the base; the
   three psalms unseen by both are the fair comparison, and both are reported.
3. **Adapter.** LoRA of rank 8 (alpha 16, dropout 0.05) on q/k/v/o and
   gate/up/down of all six layers: 222k parameters, 0.9 MB in fp32.
   AdamW (0.9, 0.95, no weight decay), peak LR 2e-3 with 20 warm-up steps
   and a linear decay to zero, batches of 8 windows of 256 tokens,
   ``--epochs`` passes (4) over the training psalms, fp32, seeded.
4. **Output.** ``tokenmill/models/psalms-lora/``: ``adapter_config.json`` and
   ``adapter_model.safetensors`` as peft saves them, ``heldout_psalms.txt``
   (the held-out psalms, for the tests) and a README.md card with the held-out
   loss and perplexity of the base and the adapter, the wall time, and samples.

Run it in the background (about 18 minutes on one thread of a busy 2-core VM)::

    nohup .venv/bin/python scripts/train_psalms_lora.py > psalms.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_default_model as kjv  # noqa: E402 - the corpus code of the base model's script

REPO_ROOT = Path(__file__).resolve().parent.parent
BASE = REPO_ROOT / "tokenmill" / "models" / "default"
DEFAULT_OUT = REPO_ROOT / "tokenmill" / "models" / "psalms-lora"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQ_LEN = 256
BATCH = 8
SEED = 150
SAMPLE_PROMPTS = ["Psalms 151\n\n", "The LORD is my", "Praise ye the LORD."]


def split_psalms(chapters: list[kjv.Chapter]) -> tuple[list[kjv.Chapter], list[kjv.Chapter], list[kjv.Chapter]]:
    """(training psalms, held-out psalms, held-out psalms the base never saw either)."""
    base_held = {i for i in range(len(chapters)) if i % kjv.HELDOUT_EVERY == kjv.HELDOUT_EVERY - 1}
    train, held, unseen = [], [], []
    for i, c in enumerate(chapters):
        if c.book != "Psalms":
            continue
        if i in base_held:
            held.append(c)
            unseen.append(c)
        elif c.number % 10 == 0:
            held.append(c)
        else:
            train.append(c)
    return train, held, unseen


def stream(tokenizer, chapters: list[kjv.Chapter]) -> list[int]:  # noqa: ANN001
    """The chapters as one token stream, each after an end-of-text token (as the base was trained)."""
    out: list[int] = []
    for ids in kjv.encode_docs(tokenizer, [c.text for c in chapters]):
        out.append(0)
        out.extend(ids)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=None, help="a saved `bible -l100000 Gen1:1-Rev22:21` dump")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--epochs", type=float, default=4.0)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    random.seed(SEED)
    torch.manual_seed(SEED)
    t_start = time.perf_counter()
    raw = Path(args.corpus).read_text() if args.corpus else kjv.dump_kjv()
    train, held, unseen = split_psalms(kjv.parse_kjv(raw))
    tokenizer = AutoTokenizer.from_pretrained(BASE)
    train_ids, held_ids, unseen_ids = (stream(tokenizer, cs) for cs in (train, held, unseen))
    print(f"psalms: {len(train)} training ({len(train_ids)} tokens), {len(held)} held out ({len(held_ids)} "
          f"tokens; {len(unseen)} unseen by the base too: {len(unseen_ids)} tokens)", flush=True)  # fmt: skip

    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    base_loss = {"held": kjv.heldout_loss(model, held_ids, SEQ_LEN), "unseen": kjv.heldout_loss(model, unseen_ids, SEQ_LEN)}
    print(f"base held-out loss {base_loss['held']:.4f}, unseen {base_loss['unseen']:.4f}", flush=True)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS, bias="none",
                        task_type="CAUSAL_LM")  # fmt: skip
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    windows_per_epoch = len(train_ids) // SEQ_LEN
    steps = math.ceil(args.epochs * windows_per_epoch / BATCH)
    warmup = 20
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, betas=(0.9, 0.95),
                            weight_decay=0.0)  # fmt: skip
    batches = kjv.epoch_windows(kjv.encode_docs(tokenizer, [c.text for c in train]), SEQ_LEN, BATCH, SEED, eot_id=0)
    model.train()
    t_train = time.perf_counter()
    ema = None
    for step in range(steps):
        lr = args.lr * min((step + 1) / warmup, max(0.0, (steps - step) / max(1, steps - warmup)))
        for group in opt.param_groups:
            group["lr"] = lr
        x = torch.tensor(next(batches))
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        value = loss.item()
        ema = value if ema is None else 0.9 * ema + 0.1 * value
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step + 1}/{steps} loss {value:.4f} (ema {ema:.4f}) lr {lr:.2e}", flush=True)
    train_min = (time.perf_counter() - t_train) / 60
    lora_loss = {"held": kjv.heldout_loss(model, held_ids, SEQ_LEN), "unseen": kjv.heldout_loss(model, unseen_ids, SEQ_LEN)}
    print(f"adapter held-out loss {lora_loss['held']:.4f}, unseen {lora_loss['unseen']:.4f}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out)
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "tokenmill-default"  # not this machine's path
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / "heldout_psalms.txt").write_text("\n".join(c.text for c in held))
    samples = []
    for prompt in SAMPLE_PROMPTS:
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad(), model.disable_adapter():
            base_text = tokenizer.decode(model.generate(ids, max_new_tokens=48, do_sample=False)[0, ids.shape[1]:])
        with torch.no_grad():
            lora_text = tokenizer.decode(model.generate(ids, max_new_tokens=48, do_sample=False)[0, ids.shape[1]:])
        samples.append((prompt, base_text, lora_text))
    size = (out / "adapter_model.safetensors").stat().st_size
    write_card(out, train, held, unseen, len(train_ids), len(held_ids), len(unseen_ids), trainable, size, steps,
               args, base_loss, lora_loss, train_min, (time.perf_counter() - t_start) / 60, samples)  # fmt: skip
    print(f"wrote {out} ({size / 1e6:.2f} MB adapter)", flush=True)
    return 0


def write_card(out, train, held, unseen, n_train, n_held, n_unseen, trainable, size, steps, args,  # noqa: ANN001
               base_loss, lora_loss, train_min, total_min, samples) -> None:  # noqa: ANN001
    def ppl(x: float) -> str:
        return f"{math.exp(x):.1f}"

    rows = "\n".join(
        f"| {what} | {n} | {base_loss[k]:.3f} / {ppl(base_loss[k])} | {lora_loss[k]:.3f} / {ppl(lora_loss[k])} |"
        for what, k, n in (("held-out psalms (every 10th, and 22, 72, 122)", "held", n_held),
                           ("of which unseen by the base too (22, 72, 122)", "unseen", n_unseen))
    )  # fmt: skip
    sample_md = "\n\n".join(
        f"**Prompt:** `{json.dumps(p)[1:-1]}`\n\n- base: {b!r}\n- psalms adapter: {a!r}" for p, b, a in samples
    )
    import torch

    text = f"""---
license: apache-2.0
base_model: tokenmill-default
library_name: peft
tags: [lora, tokenmill, kjv, psalms]
---

# psalms: a LoRA adapter of tokenmill-default

A demonstration adapter for multi-LoRA serving, shipped with tokenmill:
`tokenmill serve --lora-modules psalms` serves it beside the base model as
the model `psalms`. It specialises the bundled KJV model on the Book of
Psalms. Made by `scripts/train_psalms_lora.py` (seed {SEED}).

## Data

The Book of Psalms of the King James Version (public domain; the same text,
chapter format and tokenizer as the base model, see its card). Held out from
this adapter's training: every tenth psalm and the psalms the base model's
own split held out (22, 72, 122), {len(held)} psalms, {n_held} tokens. Trained
on the other {len(train)} psalms ({n_train} tokens), which the base model had
seen in its own training too.

## Adapter

LoRA (peft), rank 8, alpha 16, dropout 0.05 in training, on q/k/v/o and
gate/up/down of all 6 layers: {trainable} parameters, {size / 1e6:.2f} MB of
fp32 safetensors. AdamW (0.9, 0.95, no weight decay), peak LR {args.lr:g}, 20
warm-up steps then linear decay to zero, {steps} steps of {BATCH} x {SEQ_LEN}
tokens ({args.epochs:g} epochs), fp32, gradient clipping 1.0.
Wall time {train_min:.1f} min of training steps ({total_min:.1f} min in all)
on {args.threads} thread(s) of a shared 2-core x86_64 VM, torch {torch.__version__},
Python {platform.python_version()}.

## Results

Next-token loss (nats/token) / perplexity, {SEQ_LEN}-token windows:

| text | tokens | base | base + psalms |
|---|---:|---:|---:|
{rows}

The base model trained on the tenth psalms (not on 22, 72, 122), so the first
row flatters the base; the second compares the two on text neither saw.
`heldout_psalms.txt` holds the held-out psalms, for tests.

## Samples (greedy, 48 new tokens)

{sample_md}
"""
    (out / "README.md").write_text(text)


if __name__ == "__main__":
    raise SystemExit(main())
