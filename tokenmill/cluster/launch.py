"""How a cluster starts: Ray, the replica actors, the routers, and the server state around them.

``start_cluster`` joins the Ray cluster at ``ray_address`` (``ray start
--head`` on one machine, ``--address`` on the others), or starts a local
Ray instance when none is given, without its dashboard. Each replica is an
actor that reserves ``threads_per_replica`` CPUs (and limits torch to as
many threads) and that Ray restarts when it dies (``max_restarts``); the
front end brings it back into its router when it answers again
(``frontend.py``). With ``pd=(P, D)`` the first P replicas prefill and the
other D decode; the prefill pool routes with ``router`` and the decode pool
with least outstanding tokens, as the twin's disaggregated pools do
(``tokenmill sim run --disagg``).

Every machine needs tokenmill installed in the same Python environment and
the model directory at the same path.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from tokenmill.cluster.frontend import ClusterEngine, ReplicaHandle
from tokenmill.cluster.metrics import ClusterMetrics
from tokenmill.core.router import make_router
from tokenmill.engine import EngineConfig

logger = logging.getLogger("tokenmill.cluster")

DECODE_ROUTER = "least_outstanding_tokens"


def parse_pd(text: str) -> tuple[int, int]:
    """``P:D`` -> (P, D), both at least 1."""
    try:
        p, d = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"--pd takes P:D, the prefill and decode replica counts (e.g. 1:1), got {text!r}") from None
    if p < 1 or d < 1:
        raise ValueError(f"--pd needs at least one prefill and one decode replica, got {text!r}")
    return p, d


@dataclass
class ClusterSpec:
    replicas: int = 1  # colocated replicas (ignored with pd)
    pd: tuple[int, int] | None = None  # (prefill, decode) replicas
    threads_per_replica: int = 1
    ray_address: str | None = None  # None: start a local Ray instance
    router: str = "round_robin"
    router_options: dict[str, Any] = field(default_factory=dict)
    max_restarts: int = -1  # times Ray restarts a dead replica (-1: always)
    startup_timeout: float = 600.0  # seconds for every replica to load its model
    object_store_memory: int | None = None  # bytes of Ray's object store when it starts here

    @property
    def roles(self) -> list[str]:
        if self.pd is not None:
            return ["prefill"] * self.pd[0] + ["decode"] * self.pd[1]
        return ["both"] * self.replicas


def init_ray(spec: ClusterSpec) -> bool:
    """Connect to Ray (or start it locally); returns whether this call started it."""
    import ray

    if ray.is_initialized():
        return False
    if spec.ray_address:
        ray.init(address=spec.ray_address, logging_level=logging.WARNING)
        return True
    needed = len(spec.roles) * spec.threads_per_replica
    cores = os.cpu_count() or 1
    if needed > cores:
        logger.warning("%d replicas x %d threads want %d cores; this machine has %d", len(spec.roles),
                       spec.threads_per_replica, needed, cores)  # fmt: skip
    ray.init(num_cpus=max(cores, needed), include_dashboard=False, logging_level=logging.WARNING,
             object_store_memory=spec.object_store_memory)  # fmt: skip
    return True


class Cluster:
    """Replica actors this process started and the ``ClusterEngine`` over them."""

    def __init__(self, engine: ClusterEngine, actors: list[Any], owns_ray: bool) -> None:
        self.engine = engine
        self.actors = actors
        self.owns_ray = owns_ray

    def shutdown(self) -> None:
        """Stop the replicas (and Ray, if this process started it)."""
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if self.owns_ray:
            ray.shutdown()


def start_cluster(spec: ClusterSpec, config: EngineConfig, model_name: str) -> Cluster:
    """Start the replicas (each loads the model) and the front end; raises ``RuntimeError``
    with the first replica's error when one cannot start."""
    import ray

    roles = spec.roles
    if spec.threads_per_replica < 1:
        raise ValueError(f"--threads-per-replica must be >= 1, got {spec.threads_per_replica}")
    options = dict(spec.router_options)
    if spec.router == "prefix_aware":
        options.setdefault("block_size", config.block_size)
    # Check the router and its options before any model is loaded.
    make_router(spec.router, len(roles), **options)
    owns_ray = init_ray(spec)
    try:
        actors, infos = launch_replicas(len(roles), config, model_name, spec.threads_per_replica,
                                        spec.max_restarts, spec.startup_timeout)  # fmt: skip
    except BaseException:
        if owns_ray:
            ray.shutdown()
        raise
    return Cluster(front_end(spec, actors, infos, model_name), actors, owns_ray)


def launch_replicas(n: int, config: EngineConfig, model_name: str, threads: int = 1, max_restarts: int = -1,
                    timeout: float = 600.0) -> tuple[list[Any], list[dict[str, Any]]]:  # fmt: skip
    """Start ``n`` replica actors on the connected Ray cluster and wait until each serves;
    returns the actors and what each said about itself (``Replica.info``)."""
    import ray

    from tokenmill.cluster.replica import Replica

    actor_cls = ray.remote(Replica)
    actors = [
        actor_cls.options(num_cpus=threads, max_restarts=max_restarts, max_task_retries=0,
                          max_concurrency=1000).remote(i, config, threads, model_name)
        for i in range(n)
    ]  # fmt: skip
    try:
        infos = ray.get([a.start.remote() for a in actors], timeout=timeout)
    except Exception as exc:
        for a in actors:
            ray.kill(a, no_restart=True)
        if isinstance(exc, ray.exceptions.GetTimeoutError):
            raise RuntimeError(f"the replicas did not start within {timeout:.0f} s (does the Ray cluster have "
                               f"{n} x {threads} free CPUs?)") from None
        cause = getattr(exc, "cause", None) or exc
        raise RuntimeError(f"a replica could not start: {type(cause).__name__}: {_first_line(cause)}") from None
    return actors, infos


def front_end(spec: ClusterSpec, actors: list[Any], infos: list[dict[str, Any]], model_name: str) -> ClusterEngine:
    """A ``ClusterEngine`` over started replica actors, in the roles ``spec`` gives them."""
    roles = spec.roles
    if len(actors) != len(roles):
        raise ValueError(f"{len(roles)} roles for {len(actors)} replicas")
    options = dict(spec.router_options)
    if spec.router == "prefix_aware":
        options.setdefault("block_size", infos[0]["block_size"])
    handles = [ReplicaHandle(i, role, a, info) for i, (role, a, info) in enumerate(zip(roles, actors, infos, strict=True))]
    if spec.pd is not None:
        p, d = spec.pd
        prefill_router = make_router(spec.router, p, **options)
        router = make_router(DECODE_ROUTER, d)
    else:
        prefill_router = None
        router = make_router(spec.router, len(roles), **options)
    return ClusterEngine(handles, router, prefill_router, ClusterMetrics(model_name, roles))


def cluster_state(engine: ClusterEngine, settings: Any, tokenizer: Any = None) -> Any:
    """The HTTP server's state around a cluster (as ``server.app.build_state`` around one engine).

    Admission counts the replicas that hold requests longest (the colocated
    or decode ones): each takes its ``--max-queue`` waiting and ``--max-num-seqs``
    running sequences.
    """
    from tokenmill.server.app import server_state

    info = engine.replicas[engine.pool[0]].info
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(info["tokenizer"], local_files_only=True, trust_remote_code=False)
    n = len(engine.pool)
    max_waiting = None if info["max_waiting"] is None else info["max_waiting"] * n
    return server_state(engine, engine.metrics, tokenizer, settings, max_model_len=engine.max_model_len,
                        vocab_size=engine.vocab_size, max_waiting=max_waiting,
                        max_running=info["max_num_seqs"] * n)  # fmt: skip


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
