"""Executors turn a ``StepPlan`` into a ``StepResult``: the real model, or (elsewhere) a cost model."""

from tokenmill.executor.model_executor import ModelExecutor

__all__ = ["ModelExecutor"]
