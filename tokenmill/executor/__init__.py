"""Executors turn a ``StepPlan`` into a ``StepResult``: the real model, or a cost model (``sim_executor``).

``ModelExecutor`` is imported on first use, so that the simulator's executor
(and everything that imports it) does not pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenmill.executor.model_executor import ModelExecutor


def __getattr__(name: str) -> Any:
    if name == "ModelExecutor":
        from tokenmill.executor.model_executor import ModelExecutor

        return ModelExecutor
    raise AttributeError(f"module 'tokenmill.executor' has no attribute {name!r}")


__all__ = ["ModelExecutor"]
