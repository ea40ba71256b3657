"""``tokenmill serve [MODEL]``: the OpenAI-compatible server (bundled model by default).

Safe defaults: it listens on loopback only, bounds the waiting queue and the
request body size, and drains on SIGTERM. Pass ``--host 0.0.0.0`` to serve
other machines, and then set ``--api-key``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from typing import Any

from tokenmill.server.defaults import (
    DEFAULT_DRAIN_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_QUEUE,
)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from ``1073741824``, ``512MiB``, ``2GiB``, ``1.5G`` (binary units)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 536870912, 512MiB, 2GiB)")
    value = float(m.group(1)) * 1024 ** "_kmgt".index((m.group(2) or "_").lower())
    return int(value)


def _policy_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _policies() -> list[str]:
    from tokenmill.core.policies import available_policies

    return sorted(available_policies())


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model over the OpenAI API (bundled model by default)",
        description="Serve a model behind an OpenAI-compatible HTTP API.",
    )
    p.add_argument("model", nargs="?", default=None, help="local Hugging Face model directory (default: the bundled model)")
    p.add_argument("--model", dest="model_flag", default=None, help=argparse.SUPPRESS)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", action="append", default=None,
                   help="name(s) clients use as 'model' (repeatable; default: tokenmill-default, or MODEL as given)")
    p.add_argument("--api-key", default=os.environ.get("TOKENMILL_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $TOKENMILL_API_KEY, else none)")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help=f"waiting sequences before new requests get 429 (default {DEFAULT_MAX_QUEUE}; 0: unbounded)")
    p.add_argument("--max-body-bytes", type=parse_size, default=DEFAULT_MAX_BODY_BYTES,
                   help="largest request body, bytes or e.g. 4MiB (default 4MiB; 0: unlimited)")
    p.add_argument("--drain-timeout", type=float, default=DEFAULT_DRAIN_TIMEOUT_S,
                   help="seconds in-flight requests may finish after SIGTERM before they are aborted")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "int8"])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--kv-cache-memory", type=parse_size, default=None,
                   help="KV cache size, bytes or e.g. 512MiB, 4GiB (default 1GiB)")
    p.add_argument("--expert-cache-memory", type=parse_size, default=None,
                   help="MoE models: RAM for experts, e.g. 8GiB; the rest stay memory-mapped "
                        "(default: every expert in RAM)")
    p.add_argument("--block-size", type=int, default=None, help="tokens per KV block (default 16)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="sequences per step (default 64)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="tokens per step (default 2048)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--policy", default="fcfs", help="scheduling policy: " + ", ".join(_policies()))
    p.add_argument("--policy-option", action="append", type=_policy_option, default=[], metavar="KEY=VALUE",
                   help="an option of the policy (repeatable; VALUE parsed as JSON when it is)")
    p.add_argument("--no-prefix-caching", action="store_true", help="turn the radix prefix cache off")
    p.add_argument("--max-decode-steps", type=int, default=None,
                   help="decode steps one plan may cover when nothing can change (default 8)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("tokenmill.server")
    if args.model and args.model_flag and args.model != args.model_flag:
        print("error: give the model once (positional MODEL or --model)", file=sys.stderr)
        return 2
    model = args.model or args.model_flag
    if args.policy not in _policies():
        print(f"error: unknown policy {args.policy!r}; available: {', '.join(_policies())}", file=sys.stderr)
        return 2

    from tokenmill.engine import Engine, EngineConfig, resolve_model_path
    from tokenmill.server.app import build_state, create_app
    from tokenmill.server.runner import run_server
    from tokenmill.server.state import ServerSettings

    if args.served_model_name:
        names = list(args.served_model_name)
    elif model is None:
        from tokenmill.models import DEFAULT_MODEL_NAME

        names = [DEFAULT_MODEL_NAME]
    else:
        names = [model]
    overrides = {
        "kv_cache_memory": args.kv_cache_memory,
        "expert_cache_memory": args.expert_cache_memory,
        "block_size": args.block_size,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_decode_steps": args.max_decode_steps,
    }
    config = EngineConfig(
        model=resolve_model_path(model),
        dtype=args.dtype,
        device=_device(args.device),
        max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching,
        max_waiting=args.max_queue or None,
        policy=args.policy,
        policy_options=dict(args.policy_option),
        **{k: v for k, v in overrides.items() if v is not None},
    )
    try:
        engine = Engine(config)
    except (ValueError, FileNotFoundError, NotADirectoryError, OSError) as exc:
        print(f"error: cannot load the model: {exc}", file=sys.stderr)
        return 2
    settings = ServerSettings(
        served_model_names=names,
        api_key=args.api_key or None,
        max_body_bytes=args.max_body_bytes or None,
        drain_timeout=args.drain_timeout,
    )
    state = build_state(engine, settings)
    app = create_app(state)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach it can use it", args.host)
    log.info(
        "serving %s (%s) at http://%s:%d/v1 (context %d tokens, %d KV blocks, policy %s)",
        names[0], config.model, args.host, args.port, engine.max_model_len, engine.executor.num_blocks, args.policy,
    )
    return run_server(app, state, args.host, args.port, log_level=args.log_level, access_log=args.access_log)


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
