"""The adapters an executor holds: loaded on demand, at most ``max_loras``, LRU among the idle.

The scheduler never runs more than ``max_loras`` distinct adapters at once
(``SchedulerConfig.max_loras``), so when a plan admits a request whose
adapter is not resident, an adapter that no running request uses can make
room: the least recently used one is unloaded (S-LoRA's adapter cache; vLLM
unloads by LRU too). An adapter is read from its directory again when a
later request needs it. Adapters are prepared for the model's current ops
(``batch.prepare_adapter``); after a backend switch they are prepared again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import torch

from tokenmill.core.lora import LoRARequest
from tokenmill.lora.adapter import load_adapter
from tokenmill.lora.batch import LoraBatch, PreparedAdapter, prepare_adapter
from tokenmill.model.config import ModelConfig
from tokenmill.model.decoder import DecoderModel


class LoraManager:
    def __init__(self, model: DecoderModel, config: ModelConfig, max_loras: int, max_rank: int) -> None:
        if max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {max_loras}")
        if max_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {max_rank}")
        self.model = model
        self.config = config
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.resident: OrderedDict[int, PreparedAdapter] = OrderedDict()  # least recently used first
        self.num_loads = 0
        self.num_evictions = 0

    def __contains__(self, lora_id: int) -> bool:
        return lora_id in self.resident

    def load(self, lora: LoRARequest, in_use: Iterable[int] = ()) -> PreparedAdapter:
        """The prepared adapter, read from ``lora.lora_path`` unless resident; marks it used.

        Raises ``LoraError`` (a malformed directory, a different base model, a rank over
        ``max_rank``). Unloads least recently used adapters outside ``in_use`` while more
        than ``max_loras`` are resident.
        """
        got = self.resident.get(lora.lora_int_id)
        if got is not None and got.lora == lora and got.ops is self.model.ops:
            self.resident.move_to_end(lora.lora_int_id)
            return got
        weights = load_adapter(
            lora.lora_path, self.config, max_rank=self.max_rank, dtype=self.model.dtype, name=lora.lora_name
        )
        if self.model.device.type != "cpu":
            for module in weights.modules.values():
                module.a = module.a.to(self.model.device)
                for part in module.parts:
                    part.b = part.b.to(self.model.device)
        prepared = prepare_adapter(lora, weights, self.model.ops, self.config.num_layers)
        self.resident[lora.lora_int_id] = prepared
        self.resident.move_to_end(lora.lora_int_id)
        self.num_loads += 1
        self._shrink({*in_use, lora.lora_int_id})
        return prepared

    def _shrink(self, keep: set[int]) -> None:
        while len(self.resident) > self.max_loras:
            victim = next((i for i in self.resident if i not in keep), None)
            if victim is None:
                return  # every resident adapter runs (the scheduler keeps this from happening)
            del self.resident[victim]
            self.num_evictions += 1

    def remove(self, lora_id: int) -> bool:
        """Unload an adapter now (its requests, if any run, must be gone)."""
        return self.resident.pop(lora_id, None) is not None

    def batch(self, segments: list[tuple[LoRARequest, int, int]], device: torch.device) -> LoraBatch:
        """The ``LoraBatch`` of one forward pass: ``(adapter, first row, rows)`` per sequence."""
        slots: dict[int, int] = {}
        adapters: list[PreparedAdapter] = []
        runs: list[tuple[int, int, int]] = []
        for lora, start, n in segments:
            slot = slots.get(lora.lora_int_id)
            if slot is None:
                slot = slots[lora.lora_int_id] = len(adapters)
                adapters.append(self.load(lora, slots))
            runs.append((slot, start, n))
        return LoraBatch(adapters, runs, device)
