"""``echo`` with ``logprobs`` on /v1/completions: the prompt's logprobs come first, as in vLLM and OpenAI.

The first prompt token has no logprob (null, and null top_logprobs); every
later prompt token has its logprob under the model and the top-N, checked here
against transformers' log_softmax over the same tiny checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.server.helpers import MODEL_NAME

PROMPT = "In the beginning the serving engine"


@pytest.fixture(scope="module")
def reference(server_model_dir: Path) -> tuple[list[int], Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(server_model_dir)
    model = AutoModelForCausalLM.from_pretrained(server_model_dir, dtype=torch.float32)
    ids = tok(PROMPT)["input_ids"]
    with torch.no_grad():
        lps = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    return ids, lps, tok


def test_echo_with_logprobs_starts_with_the_prompt_logprobs(openai_client: Any, reference: Any) -> None:
    ids, ref, tok = reference
    plain = openai_client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, logprobs=2, temperature=0)
    out = openai_client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, logprobs=2,
                                           temperature=0, echo=True)  # fmt: skip
    c = out.choices[0]
    assert c.text == PROMPT + plain.choices[0].text
    lp = c.logprobs
    p = len(ids)
    assert len(lp.tokens) == p + 4
    assert lp.tokens[:p] == [tok.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = [ref[j - 1, ids[j]].item() for j in range(1, p)]
    assert lp.token_logprobs[1:p] == pytest.approx(want, abs=1e-4)
    for j in range(1, p):
        top = lp.top_logprobs[j]
        best = ref[j - 1].topk(2).indices.tolist()
        assert {tok.decode([t]) for t in best} <= set(top)
        assert len(top) <= 3  # the top 2 and the prompt token
    # the generated part is what the same request without echo returns
    assert lp.tokens[p:] == plain.choices[0].logprobs.tokens
    assert lp.token_logprobs[p:] == pytest.approx(plain.choices[0].logprobs.token_logprobs, abs=1e-5)
    offsets = lp.text_offset
    assert offsets[0] == 0 and offsets[p] == len(PROMPT)
    assert all(b - a == len(t) for a, b, t in zip(offsets, offsets[1:], lp.tokens, strict=False))


def test_streamed_echo_with_logprobs_equals_the_whole_answer(openai_client: Any) -> None:
    kw = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=5, logprobs=1, temperature=0, echo=True)
    whole = openai_client.completions.create(**kw).choices[0]
    text, tokens, token_logprobs, offsets = "", [], [], []
    for chunk in openai_client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            text += c.text
            if c.logprobs is not None:
                tokens += c.logprobs.tokens
                token_logprobs += c.logprobs.token_logprobs
                offsets += c.logprobs.text_offset
    assert text == whole.text
    assert tokens == whole.logprobs.tokens
    assert offsets == whole.logprobs.text_offset
    assert token_logprobs[0] is None
    assert token_logprobs[1:] == pytest.approx(whole.logprobs.token_logprobs[1:], abs=1e-5)
