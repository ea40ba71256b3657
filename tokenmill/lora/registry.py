"""The adapters an engine serves, by name: what ``model`` in a request can name besides the base.

Names map to ``LoRARequest``s; each registration gets a fresh ``lora_int_id``
(so a name unloaded and loaded again from another directory never shares KV
or a resident copy with its past self). The engine checks an adapter with its
executor before it registers it; nothing here reads files.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from tokenmill.core.lora import LoRARequest
from tokenmill.lora.errors import LoraError, LoraNotFoundError

MAX_NAME_CHARS = 256


class LoraRegistry:
    def __init__(self) -> None:
        self._by_name: dict[str, LoRARequest] = {}
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def list(self) -> list[LoRARequest]:
        """Registered adapters, in registration order."""
        return list(self._by_name.values())

    def new(self, name: str, path: str | Path) -> LoRARequest:
        """A request for a new adapter ``name`` at ``path``, not registered yet (see ``add``)."""
        if not isinstance(name, str) or not name.strip():
            raise LoraError("a LoRA adapter needs a non-empty name")
        if len(name) > MAX_NAME_CHARS:
            raise LoraError(f"LoRA adapter names are at most {MAX_NAME_CHARS} characters")
        if name in self._by_name:
            raise LoraError(f"LoRA adapter {name!r} is already loaded; unload it first")
        return LoRARequest(name, next(self._ids), str(Path(path).expanduser().resolve()))

    def add(self, lora: LoRARequest) -> None:
        if lora.lora_name in self._by_name:
            raise LoraError(f"LoRA adapter {lora.lora_name!r} is already loaded; unload it first")
        self._by_name[lora.lora_name] = lora

    def get(self, name: str) -> LoRARequest:
        lora = self._by_name.get(name)
        if lora is None:
            raise LoraNotFoundError(f"LoRA adapter {name!r} is not loaded")
        return lora

    def remove(self, name: str) -> LoRARequest:
        lora = self._by_name.pop(name, None)
        if lora is None:
            raise LoraNotFoundError(f"LoRA adapter {name!r} is not loaded, so it cannot be unloaded")
        return lora

    def drop_ids(self, lora_ids: set[int]) -> list[str]:
        """Forget the adapters with these ids (they can no longer be loaded); their names."""
        gone = [n for n, lora in self._by_name.items() if lora.lora_int_id in lora_ids]
        for n in gone:
            del self._by_name[n]
        return gone
