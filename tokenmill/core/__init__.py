"""The decision core shared by the real engine and the simulator.

Everything here is pure Python: no torch, no I/O, no wall clock, no threads.
It decides who runs next and where their KV lives; executors do the work.
"""

from tokenmill.core.plan import ScheduledSeq, SeqUpdate, StepPlan, StepResult
from tokenmill.core.request import FinishReason, Request, RequestStatus, SamplingParams

__all__ = [
    "FinishReason",
    "Request",
    "RequestStatus",
    "SamplingParams",
    "ScheduledSeq",
    "SeqUpdate",
    "StepPlan",
    "StepResult",
]
