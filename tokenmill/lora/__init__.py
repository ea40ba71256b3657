"""LoRA adapters on a served base model, many at once in one batch.

- ``adapter``: read and check a PEFT adapter directory against the model;
- ``batch``: an adapter laid out for the ops backend, and the rows of one
  forward pass grouped by adapter (the compiled kernel's input);
- ``manager``: the executor's resident adapters, loaded on demand, LRU;
- ``registry``: the engine's adapters by name (what requests send as ``model``);
- ``errors``: ``LoraError`` and the cases callers tell apart.

``LoRARequest`` itself is plain data in ``core.lora`` (the scheduler counts
adapters, plans carry them).
"""

from tokenmill.core.lora import LoRARequest
from tokenmill.lora.errors import LoraError, LoraLoadError, LoraNotFoundError

__all__ = ["LoRARequest", "LoraError", "LoraLoadError", "LoraNotFoundError"]
