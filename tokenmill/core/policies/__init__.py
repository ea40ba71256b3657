"""Scheduling policies, one small file each, registered by name."""

from tokenmill.core.policies import (  # noqa: F401  (importing registers them)
    bins,
    dlpm,
    fcfs,
    lpm,
    slo,
    vtc,
)
from tokenmill.core.policies.base import (
    SchedulingPolicy,
    available_policies,
    make_policy,
    register_policy,
)

__all__ = ["SchedulingPolicy", "available_policies", "make_policy", "register_policy"]
