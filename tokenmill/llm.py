"""The offline API: ``LLM(model).generate(prompts, params)``, shaped like vLLM's.

LoRA: ``generate(..., lora=...)`` runs prompts with adapters, one for all or one
per prompt (None: the base model): a name registered with ``add_lora`` (or
``LLM(lora_modules={name: path})``), a ``LoRARequest`` (vLLM's
``lora_request=`` is taken too), or an adapter directory.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenmill.core.lora import LoRARequest
from tokenmill.core.request import SamplingParams
from tokenmill.engine import Engine, EngineConfig
from tokenmill.outputs import RequestOutput

PromptLike = str | list[int] | dict[str, Any]
LoraLike = LoRARequest | str | None


class LLM:
    """Load a model once; generate for batches of prompts.

    ``model`` is a local Hugging Face directory (config.json + safetensors and
    tokenizer files); ``None`` means the bundled default model. Other keyword
    arguments are ``EngineConfig`` fields.
    """

    def __init__(
        self, model: str | None = None, *, lora_modules: dict[str, str] | None = None, **engine_options: Any
    ) -> None:
        self.engine = Engine(EngineConfig(model=model, **engine_options))
        self._ids = itertools.count()
        for name, path in (lora_modules or {}).items():
            self.engine.add_lora(name, path)

    def add_lora(self, name: str, path: str) -> LoRARequest:
        """Register the PEFT adapter at ``path`` as ``name`` (``LoraError`` if it cannot run)."""
        return self.engine.add_lora(name, path)

    def remove_lora(self, name: str) -> None:
        self.engine.remove_lora(name)

    def _lora(self, lora: LoraLike) -> LoRARequest | None:
        if isinstance(lora, str) and lora not in self.engine.loras and Path(lora).is_dir():
            return self.engine.add_lora(lora, lora)  # a directory, registered under its path
        return self.engine.resolve_lora(lora)

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLM:
        """An ``LLM`` on an engine built from ``config`` as it is."""
        llm = cls.__new__(cls)
        llm.engine = Engine(config)
        llm._ids = itertools.count()
        return llm

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptLike | Sequence[PromptLike],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
        lora: LoraLike | Sequence[LoraLike] = None,
        lora_request: LoraLike | Sequence[LoraLike] = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in prompt order.

        A prompt is a string, a list of token ids, or ``{"prompt": ...}`` /
        ``{"prompt_token_ids": [...]}``. Every prompt is validated before any
        runs, so bad input raises ``ValueError`` without side effects.
        ``lora`` (or vLLM's ``lora_request``): one adapter for every prompt or a list
        with one per prompt (see the module docstring).
        """
        prompt_list = _as_prompt_list(prompts)
        if isinstance(sampling_params, Sequence):
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(f"got {len(params_list)} sampling params for {len(prompt_list)} prompts")
        else:
            params_list = [sampling_params or SamplingParams()] * len(prompt_list)
        for p in params_list:
            p.validate()
        if lora is not None and lora_request is not None:
            raise ValueError("give lora or lora_request, not both")
        wanted = lora if lora is not None else lora_request
        if isinstance(wanted, Sequence) and not isinstance(wanted, str | LoRARequest):
            loras = list(wanted)
            if len(loras) != len(prompt_list):
                raise ValueError(f"got {len(loras)} LoRA adapters for {len(prompt_list)} prompts")
        else:
            loras = [wanted] * len(prompt_list)
        adapters = [self._lora(x) for x in loras]
        ids = [str(next(self._ids)) for _ in prompt_list]
        added: list[str] = []
        try:
            for rid, prompt, params, adapter in zip(ids, prompt_list, params_list, adapters, strict=True):
                self.engine.add_request(rid, prompt, params, lora=adapter)
                added.append(rid)
        except Exception:
            for rid in added:
                self.engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | None = None,
        **kwargs: Any,
    ) -> list[RequestOutput]:
        """Apply the model's chat template, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.engine.tokenizer
        prompts: list[PromptLike] = [
            tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) for conv in conversations
        ]
        return self.generate(prompts, sampling_params, **kwargs)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        engine = self.engine
        if use_tqdm:
            from rich.console import Console
            from rich.progress import Progress

            # on stderr: stdout may carry results (tokenmill generate --input prints JSONL there)
            with Progress(transient=True, console=Console(stderr=True)) as progress:
                task = progress.add_task("generating", total=len(ids))
                while engine.has_unfinished():
                    for out in engine.step():
                        if out.finished:
                            done[out.request_id] = out
                            progress.advance(task)
        else:
            while engine.has_unfinished():
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = out
        return [done[i] for i in ids]


def _as_prompt_list(prompts: PromptLike | Sequence[PromptLike]) -> list[str | list[int]]:
    if isinstance(prompts, str) or isinstance(prompts, dict):
        items: list[Any] = [prompts]
    elif isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int):
        items = [list(prompts)]  # a single list of token ids
    else:
        items = list(prompts)
    if not items:
        raise ValueError("no prompts given")
    out: list[str | list[int]] = []
    for p in items:
        if isinstance(p, dict):
            if "prompt_token_ids" in p:
                out.append(list(p["prompt_token_ids"]))
            elif "prompt" in p:
                out.append(p["prompt"])
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        elif isinstance(p, str | list):
            out.append(p)
        else:
            raise ValueError(f"a prompt must be a string or a list of token ids, got {type(p).__name__}")
    return out
