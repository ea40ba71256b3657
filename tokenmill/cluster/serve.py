"""``tokenmill serve MODEL --replicas N | --pd P:D``: the same HTTP server in front of a Ray cluster."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any


def spec_from_args(args: argparse.Namespace) -> Any:
    """The ``ClusterSpec`` the serve flags describe; raises ``ValueError`` naming the flag at fault."""
    from tokenmill.cluster.launch import ClusterSpec, parse_pd
    from tokenmill.core.router import available_routers

    pd = parse_pd(args.pd) if args.pd is not None else None
    replicas = args.replicas
    if pd is not None and replicas is not None and replicas != sum(pd):
        raise ValueError(f"--replicas {replicas} disagrees with --pd {args.pd} ({sum(pd)} replicas)")
    if args.router not in available_routers():
        raise ValueError(f"unknown --router {args.router!r}; available: {', '.join(available_routers())}")
    return ClusterSpec(replicas=replicas or (sum(pd) if pd else 1), pd=pd,
                       threads_per_replica=args.threads_per_replica, ray_address=args.ray_address,
                       router=args.router, router_options=dict(args.router_option))  # fmt: skip


def serve_cluster(args: argparse.Namespace, config: Any, names: list[str], settings: Any) -> int:
    log = logging.getLogger("tokenmill.server")
    try:
        spec = spec_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        import ray  # noqa: F401
    except ImportError:
        print("error: serving on replicas needs Ray: pip install 'tokenmill[cluster]'", file=sys.stderr)
        return 2
    from tokenmill.cluster.launch import cluster_state, start_cluster
    from tokenmill.server.app import create_app
    from tokenmill.server.runner import run_server

    log.info("starting %d replicas (%s) on Ray (%s)...", len(spec.roles), ", ".join(spec.roles),
             spec.ray_address or "local")  # fmt: skip
    try:
        cluster = start_cluster(spec, config, names[0])
    except (ValueError, RuntimeError, ConnectionError) as exc:
        log.debug("cluster start failed", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        state = cluster_state(cluster.engine, settings)
        app = create_app(state)
        engine = cluster.engine
        log.info("serving %s (%s) at http://%s:%d/v1 on %d replicas (%s; router %s)", names[0], config.model,
                 args.host, args.port, len(engine.replicas), ", ".join(spec.roles), spec.router)  # fmt: skip
        return run_server(app, state, args.host, args.port, log_level=args.log_level, access_log=args.access_log)
    finally:
        cluster.shutdown()
