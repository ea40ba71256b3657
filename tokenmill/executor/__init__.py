"""Executors turn a ``StepPlan`` into a ``StepResult``: the real model, or a cost model (``sim_executor``).

``ModelExecutor`` is imported on first use, so that the simulator's executor
(and everything that imports it) does not pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from tokenmill.core.plan import StepPlan, StepResult

if TYPE_CHECKING:
    from tokenmill.executor.model_executor import ModelExecutor


class Executor(Protocol):
    """What an ``Engine`` needs of an executor: the model facts and ``execute``.

    ``execute(plan, on_substep)`` runs a plan (``on_substep``, when given, is
    called after each sub-step but the last of a multi-step plan with the
    tokens sampled so far, for streaming).
    """

    num_blocks: int
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]

    def execute(self, plan: StepPlan, on_substep: Any = None) -> StepResult: ...


def __getattr__(name: str) -> Any:
    if name == "ModelExecutor":
        from tokenmill.executor.model_executor import ModelExecutor

        return ModelExecutor
    raise AttributeError(f"module 'tokenmill.executor' has no attribute {name!r}")


__all__ = ["Executor", "ModelExecutor"]
