"""The digital twin: the engine's own scheduler, KV manager and router in virtual time.

``tokenmill.sim`` drives the unchanged ``tokenmill.core`` objects with a
cost-model executor (``tokenmill.executor.sim_executor``) and an event-driven
virtual clock: workloads (``workload``), cost models (``roofline``,
``profiled``), the simulator with clusters and prefill/decode disaggregation
(``simulator``), metrics and reports (``metrics``, ``report``), a
configuration search (``search``) and the checks against the real engine
(``replay``, ``validate``).
"""
