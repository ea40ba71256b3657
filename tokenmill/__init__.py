"""tokenmill: an LLM inference serving engine with a digital twin.

``from tokenmill import LLM, SamplingParams`` is the offline API
(``StructuredOutputsParams`` constrains an output's form). The heavy
parts (torch, the model) load only when ``LLM`` is first touched, so the
core and the simulator import quickly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tokenmill.core.request import SamplingParams
from tokenmill.structured.params import StructuredOutputsParams

__version__ = "0.1.0"

if TYPE_CHECKING:
    from tokenmill.llm import LLM
    from tokenmill.outputs import CompletionOutput, RequestOutput


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from tokenmill.llm import LLM

        return LLM
    if name in ("RequestOutput", "CompletionOutput"):
        from tokenmill import outputs

        return getattr(outputs, name)
    if name == "DEFAULT_MODEL":
        from tokenmill.models import DEFAULT_MODEL_PATH

        return str(DEFAULT_MODEL_PATH)
    raise AttributeError(f"module 'tokenmill' has no attribute {name!r}")


__all__ = [
    "LLM",
    "SamplingParams",
    "StructuredOutputsParams",
    "RequestOutput",
    "CompletionOutput",
    "DEFAULT_MODEL",
    "__version__",
]
