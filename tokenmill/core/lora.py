"""Which LoRA adapter a request runs with, as plain data, and the cache namespace it implies.

A ``LoRARequest`` (vLLM's name and fields) names an adapter registered with the
engine: ``lora_name`` is what clients send as ``model``, ``lora_int_id`` is
unique for every adapter ever registered (a name loaded again from another
directory gets a new id), ``lora_path`` is where its PEFT files are, so that an
executor in another process can load it. Requests carry it, plans carry it in
a sequence's ``SeqSetup`` (and its id on every ``ScheduledSeq``), and the
scheduler counts the distinct adapters that run at once (``max_loras``).

KV computed under an adapter is that adapter's: the same prompt gives other
keys and values. Each adapter is its own prefix-cache namespace
(``cache_namespace``), built so that no cache salt a client sends can name it.
"""

from __future__ import annotations

from dataclasses import dataclass

_LORA_PREFIX = "\x00lora\x00"


@dataclass(frozen=True, slots=True)
class LoRARequest:
    """An adapter as requests and plans refer to it (``lora_int_id`` > 0)."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be >= 1, got {self.lora_int_id}")


def cache_namespace(salt: str, lora: LoRARequest | None) -> str:
    """The prefix-cache namespace of a request with cache salt ``salt`` under ``lora``.

    Base requests keep their salt as it is unless it starts with NUL, which is
    doubled; adapter namespaces start with NUL + "lora". So salts map to
    distinct namespaces, none of them an adapter's, and adapters never share.
    """
    if lora is not None:
        return f"{_LORA_PREFIX}{lora.lora_int_id}\x00{salt}"
    return "\x00" + salt if salt.startswith("\x00") else salt
