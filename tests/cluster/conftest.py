"""Fixtures for the cluster tests: one local multi-process Ray cluster and three replicas per session.

Ray starts once (no dashboard, a small object store); three replica actors of
the tiny random-weight Llama (``tests/conftest.py``) are shared by every
test, each of which puts a front end of its own (``launch.front_end``) over
the replicas it needs, in the roles it needs: a replica is the same actor
whether it serves whole requests, prefills or decodes. Tests use prompts
of their own, since the replicas' prefix caches outlive a test.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tokenmill.engine import EngineConfig

MODEL_NAME = "tiny"
# record_steps: the replicas keep each plan's summary and times, for the twin's replay.
ENGINE = dict(dtype="float32", kv_cache_memory=256 * 8192, block_size=16, max_model_len=256, max_num_seqs=16,
              max_num_batched_tokens=256, record_steps=True)  # fmt: skip


@pytest.fixture(scope="session")
def ray_session() -> Iterator[Any]:
    import ray

    ray.init(num_cpus=8, include_dashboard=False, object_store_memory=96 << 20, logging_level=logging.WARNING,
             log_to_driver=False)  # fmt: skip
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def cluster_model_dir(tiny_model_dir: Any) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="session")
def engine_config(cluster_model_dir: Path) -> EngineConfig:
    return EngineConfig(model=str(cluster_model_dir), **ENGINE)


@pytest.fixture(scope="session")
def replicas(ray_session: Any, engine_config: EngineConfig) -> Iterator[tuple[list[Any], list[dict[str, Any]]]]:
    """Three replica actors (Ray restarts one that dies) and their infos."""
    from tokenmill.cluster.launch import launch_replicas

    actors, infos = launch_replicas(3, engine_config, MODEL_NAME, threads=1, timeout=300)
    yield actors, infos
    for a in actors:
        with contextlib.suppress(Exception):
            ray_session.kill(a, no_restart=True)


def front_end(replicas: Any, n: int = 2, **spec: Any) -> Any:
    """A ``ClusterEngine`` over the first ``n`` replicas (``spec``: ``ClusterSpec`` fields), recording its routing."""
    from tokenmill.cluster.launch import ClusterSpec
    from tokenmill.cluster.launch import front_end as make

    actors, infos = replicas
    engine = make(ClusterSpec(replicas=n, **spec), actors[:n], infos[:n], MODEL_NAME)
    engine.routing_log = []
    engine.finish_log = []
    return engine


@contextlib.contextmanager
def http_server(engine: Any, tokenizer_dir: Path) -> Iterator[Any]:
    """The OpenAI server around ``engine`` on a thread of this process (``InProcessServer``)."""
    from tests.server.helpers import InProcessServer
    from tokenmill.cluster.launch import cluster_state
    from tokenmill.server.app import create_app
    from tokenmill.server.state import ServerSettings

    state = cluster_state(engine, ServerSettings(served_model_names=[MODEL_NAME]))
    with InProcessServer(create_app(state), state) as srv:
        yield srv
