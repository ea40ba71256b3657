"""What goes wrong with adapters, as exceptions callers can tell apart (the server maps them)."""

from __future__ import annotations


class LoraError(ValueError):
    """An adapter that cannot be used with this model; the message names it and says why."""


class LoraNotFoundError(LoraError):
    """A request or an unload names an adapter that is not registered (the server's 404)."""


class LoraLoadError(LoraError):
    """Adapters needed by a plan could not be loaded: the requests that need them cannot run.

    Raised by an executor before it computes anything of the plan; ``request_ids``
    are the plan's requests that run with those adapters.
    """

    def __init__(self, message: str, request_ids: list[str], lora_ids: list[int]) -> None:
        super().__init__(message)
        self.request_ids = request_ids
        self.lora_ids = lora_ids
