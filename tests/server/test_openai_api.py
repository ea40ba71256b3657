"""The server through the official ``openai`` client: completions, chat, streaming, parameters, usage."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server.helpers import MODEL_NAME, ServerProcess, metric

PROMPT = "In the beginning the serving engine"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def tokenizer(server_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(server_model_dir)


def _stream_completion_text(client: Any, **kw: Any) -> tuple[dict[int, str], dict[int, str | None], Any]:
    texts: dict[int, str] = {}
    reasons: dict[int, str | None] = {}
    usage = None
    for chunk in client.completions.create(model=MODEL_NAME, stream=True, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason is not None:
                assert reasons.get(c.index) is None, "a choice finished twice"
                reasons[c.index] = c.finish_reason
    return texts, reasons, usage


def _stream_chat_text(client: Any, **kw: Any) -> tuple[dict[int, str], dict[int, str | None], Any]:
    texts: dict[int, str] = {}
    reasons: dict[int, str | None] = {}
    usage = None
    for chunk in client.chat.completions.create(model=MODEL_NAME, stream=True, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason is not None:
                reasons[c.index] = c.finish_reason
    return texts, reasons, usage


def test_models_and_health(server: ServerProcess, openai_client: Any) -> None:
    models = openai_client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    # The served name only: the model's path on the server's disk is not the client's business.
    raw = httpx.get(f"{server.base_url}/v1/models", headers=server.headers).json()
    assert raw["data"][0]["root"] == MODEL_NAME
    assert "/" not in str(raw)
    assert httpx.get(f"{server.base_url}/health").json() == {"status": "ok"}


def test_completion_usage_and_finish(openai_client: Any, tokenizer: Any) -> None:
    out = openai_client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    (choice,) = out.choices
    assert choice.finish_reason == "length"
    assert out.usage.prompt_tokens == len(tokenizer(PROMPT)["input_ids"])
    assert out.usage.completion_tokens == 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12
    assert out.usage.prompt_tokens_details.cached_tokens >= 0


def test_prefix_cache_shows_in_cached_tokens(openai_client: Any) -> None:
    prompt = "tokenmill caches shared prefixes in blocks of sixteen tokens " * 4
    first = openai_client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2, temperature=0)
    second = openai_client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens >= 16
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens_details.cached_tokens


def test_chat_completion(openai_client: Any) -> None:
    out = openai_client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_completion_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    (choice,) = out.choices
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    assert out.usage.completion_tokens == 10


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_streamed_text_equals_non_streamed(openai_client: Any, endpoint: str) -> None:
    kw: dict[str, Any] = dict(max_tokens=24, temperature=0.9, seed=7, n=2)
    if endpoint == "completions":
        full = openai_client.completions.create(model=MODEL_NAME, prompt=PROMPT, **kw)
        texts, reasons, usage = _stream_completion_text(
            openai_client, prompt=PROMPT, stream_options={"include_usage": True}, **kw
        )
        expected = {c.index: c.text for c in full.choices}
    else:
        full = openai_client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, **kw)
        texts, reasons, usage = _stream_chat_text(
            openai_client, messages=MESSAGES, stream_options={"include_usage": True}, **kw
        )
        expected = {c.index: c.message.content for c in full.choices}
    assert texts == expected
    assert reasons == {c.index: c.finish_reason for c in full.choices}
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_stream_without_include_usage_has_no_usage(openai_client: Any) -> None:
    chunks = list(openai_client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, stream=True))
    assert chunks and all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason is not None


def test_n_samples_and_seed_reproducibility(openai_client: Any) -> None:
    kw = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=16, temperature=1.0, n=2, extra_body={"ignore_eos": True})
    a = openai_client.completions.create(seed=1234, **kw)
    b = openai_client.completions.create(seed=1234, **kw)
    c = openai_client.completions.create(seed=99, **kw)
    assert [x.index for x in a.choices] == [0, 1]
    assert [x.text for x in a.choices] == [x.text for x in b.choices]
    # Each sample gets its own seed, so the two samples differ, and another seed differs.
    assert a.choices[0].text != a.choices[1].text
    assert [x.text for x in a.choices] != [x.text for x in c.choices]
    assert a.usage.completion_tokens == 32


def _pick_stop(text: str) -> str:
    """A short substring from the middle of ``text`` (printable if there is one)."""
    for m in re.finditer(r"[A-Za-z0-9 ]{2,}", text[3:]):
        return m.group(0)[:2]
    return text[len(text) // 2 : len(text) // 2 + 2]


@pytest.mark.parametrize("as_list", [False, True])
def test_stop_strings(openai_client: Any, as_list: bool) -> None:
    base = openai_client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=40, temperature=0, extra_body={"ignore_eos": True}
    )
    text = base.choices[0].text
    stop = _pick_stop(text)
    assert len(stop) == 2, text
    stops: str | list[str] = [stop, "\x00never"] if as_list else stop
    out = openai_client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=40, temperature=0, stop=stops)
    assert out.choices[0].text == text[: text.index(stop)]
    assert out.choices[0].finish_reason == "stop"
    streamed, reasons, _ = _stream_completion_text(openai_client, prompt=PROMPT, max_tokens=40, temperature=0, stop=stops)
    assert streamed[0] == out.choices[0].text
    assert reasons[0] == "stop"


def test_completion_logprobs(openai_client: Any) -> None:
    out = openai_client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    n = out.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    for value, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert value <= 0.0
        assert 1 <= len(top) <= 4
        # Greedy: the sampled token is the most likely one.
        assert max(top.values()) == pytest.approx(value, abs=1e-4)
    assert lp.text_offset == sorted(lp.text_offset)


def test_chat_logprobs_stream_and_not(openai_client: Any) -> None:
    kw = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    out = openai_client.chat.completions.create(**kw)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0.0 and isinstance(item.token, str)
        assert len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
    streamed = []
    for chunk in openai_client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            if c.logprobs is not None and c.logprobs.content:
                streamed.extend(c.logprobs.content)
    assert [x.token for x in streamed] == [x.token for x in content]
    assert [x.logprob for x in streamed] == pytest.approx([x.logprob for x in content], abs=1e-5)


def test_echo_and_batched_prompts(openai_client: Any, tokenizer: Any) -> None:
    prompts = ["first prompt", "second one"]
    out = openai_client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=3, n=2, echo=True, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    for c in out.choices:
        assert c.text.startswith(prompts[c.index // 2])
    assert out.usage.prompt_tokens == sum(len(tokenizer(p)["input_ids"]) for p in prompts)
    ids = tokenizer("token ids")["input_ids"]
    out = openai_client.completions.create(model=MODEL_NAME, prompt=[ids, ids], max_tokens=2, temperature=0)
    assert len(out.choices) == 2 and out.choices[0].text == out.choices[1].text
    assert out.usage.prompt_tokens == 2 * len(ids)


def test_penalties_extra_params_and_client_id(server: ServerProcess, openai_client: Any) -> None:
    out = openai_client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPT,
        max_tokens=8,
        temperature=0.8,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        user="alice",
        extra_headers={"X-Client-Id": "tenant-a"},
        extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1, "priority": 1, "ttft_slo": 2.0, "tpot_slo": 0.5},
    )
    assert out.choices[0].finish_reason in ("stop", "length")


def test_metrics_page(server: ServerProcess, openai_client: Any) -> None:
    openai_client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0)
    m = server.metrics()
    for name in (
        "tokenmill_time_to_first_token_seconds_count",
        "tokenmill_inter_token_latency_seconds_count",
        "tokenmill_e2e_request_latency_seconds_count",
        "tokenmill_request_queue_time_seconds_count",
        "tokenmill_num_requests_running",
        "tokenmill_num_requests_waiting",
        "tokenmill_kv_cache_usage_ratio",
        "tokenmill_kv_blocks_total",
        "tokenmill_num_preemptions_total",
        "tokenmill_prompt_tokens_total",
        "tokenmill_generation_tokens_total",
        "tokenmill_prefix_cache_hits_total",
        "tokenmill_prefix_cache_queries_total",
    ):
        assert name in m, name
    assert m["tokenmill_time_to_first_token_seconds_count"] >= 1
    assert metric(m, "tokenmill_request_finished_total", finish_reason="length") >= 1
    assert m["tokenmill_generation_tokens_total"] >= 4
    blocks = {s: metric(m, "tokenmill_kv_blocks", state=s) for s in ("used", "cached", "free")}
    assert sum(blocks.values()) == m["tokenmill_kv_blocks_total"]
