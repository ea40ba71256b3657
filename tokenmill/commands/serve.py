"""``tokenmill serve [MODEL]``: the OpenAI-compatible server (bundled model by default).

Safe defaults: it listens on loopback only (and then, without an API key,
answers only to loopback ``Host`` names), bounds the waiting queue, the
request body, the prompts and what a chat template may do, runs no template
sent with a request, and drains on SIGTERM. Pass ``--host 0.0.0.0`` to serve
other machines, and then set ``--api-key``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from tokenmill.commands.options import (
    UsageError,
    add_speculative_arguments,
    check_device,
    check_model,
    check_policy,
    check_speculative,
    key_value,
    non_negative_int,
    port,
    positive_int,
    size_in,
)
from tokenmill.server.defaults import (
    DEFAULT_CHARS_PER_TOKEN,
    DEFAULT_CHAT_TEMPLATE_TIMEOUT_S,
    DEFAULT_DRAIN_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_PROMPTS_PER_REQUEST,
    DEFAULT_MAX_QUEUE,
)
from tokenmill.server.hosts import allowed_hosts_for


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
    p.add_argument("--port", type=port, default=8000)
    p.add_argument("--served-model-name", action="append", default=None,
                   help="name(s) clients use as 'model' (repeatable; default: tokenmill-default, or MODEL as given)")
    p.add_argument("--api-key", default=os.environ.get("TOKENMILL_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $TOKENMILL_API_KEY, else none)")
    p.add_argument("--max-queue", type=non_negative_int, default=DEFAULT_MAX_QUEUE,
                   help=f"waiting sequences before new requests get 429 (default {DEFAULT_MAX_QUEUE}; 0: unbounded)")
    p.add_argument("--max-body-bytes", type=size_in(1), default=DEFAULT_MAX_BODY_BYTES,
                   help="largest request body, bytes or e.g. 4MiB (default 4MiB; 0: unlimited)")
    p.add_argument("--drain-timeout", type=float, default=DEFAULT_DRAIN_TIMEOUT_S,
                   help="seconds in-flight requests may finish after SIGTERM before they are aborted")
    p.add_argument("--max-prompt-chars", type=int, default=None,
                   help="longest prompt in characters, refused before tokenizing "
                        f"(default: the context length x {DEFAULT_CHARS_PER_TOKEN})")
    p.add_argument("--max-prompts-per-request", type=int, default=DEFAULT_MAX_PROMPTS_PER_REQUEST,
                   help=f"prompts in one completions request (default {DEFAULT_MAX_PROMPTS_PER_REQUEST})")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="run chat templates sent with requests ('chat_template', "
                        "'chat_template_kwargs.chat_template'); refused by default")
    p.add_argument("--chat-template-timeout", type=float, default=DEFAULT_CHAT_TEMPLATE_TIMEOUT_S,
                   help=f"seconds a chat template may take to render (default {DEFAULT_CHAT_TEMPLATE_TIMEOUT_S:g})")
    p.add_argument("--allowed-hosts", default=None, metavar="HOST[,HOST...]",
                   help="Host header values to answer to (name, name:port, *.domain; '*': any). Default: "
                        "loopback names only when listening on loopback without --api-key, else any")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "int8"])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--kv-cache-memory", type=size_in(1), default=None,
                   help="KV cache size, bytes or e.g. 512MiB, 4GiB (default 1GiB)")
    p.add_argument("--block-size", type=positive_int, default=None, help="tokens per KV block (default 16)")
    p.add_argument("--max-num-seqs", type=positive_int, default=None, help="sequences per step (default 64)")
    p.add_argument("--max-num-batched-tokens", type=positive_int, default=None, help="tokens per step (default 2048)")
    p.add_argument("--max-model-len", type=positive_int, default=None, help="context length (default: the model's)")
    p.add_argument("--max-seqs-per-request", type=positive_int, default=None,
                   help="running slots the n samples of one request keep while other requests wait (default 8)")
    p.add_argument("--max-tokens-per-request", type=positive_int, default=None,
                   help="refuse requests whose n x max_tokens exceeds this (default: no bound)")
    p.add_argument("--expert-cache-memory", type=size_in(1), default=None,
                   help="MoE models: RAM for experts, e.g. 8GiB; the rest stay memory-mapped "
                        "(default: every expert in RAM)")
    p.add_argument("--policy", default="fcfs", help="scheduling policy: " + ", ".join(_policies()))
    p.add_argument("--policy-option", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                   help="an option of the policy (repeatable; VALUE parsed as JSON when it is)")
    p.add_argument("--no-prefix-caching", action="store_true", help="turn the radix prefix cache off")
    p.add_argument("--max-decode-steps", type=positive_int, default=None,
                   help="decode steps one plan may cover when nothing can change (default 8)")
    add_speculative_arguments(p)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("tokenmill.server")
    try:
        config, names = _engine_config(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for flag, value in (("--max-prompts-per-request", args.max_prompts_per_request),
                        ("--max-prompt-chars", args.max_prompt_chars),
                        ("--chat-template-timeout", args.chat_template_timeout)):  # fmt: skip
        if value is not None and value <= 0:
            print(f"error: {flag} must be positive, got {value}", file=sys.stderr)
            return 2

    from tokenmill.engine import Engine
    from tokenmill.server.app import build_state, create_app
    from tokenmill.server.runner import run_server
    from tokenmill.server.state import ServerSettings

    try:
        engine = Engine(config)
    except (ValueError, OSError, RuntimeError) as exc:
        # The flags were checked; what is left is the checkpoint itself or the device
        # (out of memory, a bad weight file): one line, the traceback at debug level.
        log.debug("engine start failed", exc_info=True)
        print(f"error: cannot load the model: {_first_line(exc)}", file=sys.stderr)
        return 2
    settings = ServerSettings(
        served_model_names=names,
        api_key=args.api_key or None,
        max_body_bytes=args.max_body_bytes or None,
        drain_timeout=args.drain_timeout,
        trust_request_chat_template=args.trust_request_chat_template,
        chat_template_timeout=args.chat_template_timeout,
        max_prompt_chars=args.max_prompt_chars,
        max_prompts_per_request=args.max_prompts_per_request,
        allowed_hosts=allowed_hosts_for(args.host, args.port, api_key=args.api_key or None, flag=args.allowed_hosts),
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


def _engine_config(args: argparse.Namespace) -> tuple[Any, list[str]]:
    """The engine's configuration and the served names, from flags checked before any weight is loaded."""
    from tokenmill.engine import EngineConfig, resolve_model_path

    if args.model and args.model_flag and args.model != args.model_flag:
        raise UsageError("give the model once (positional MODEL or --model)")
    model = args.model or args.model_flag
    options = dict(args.policy_option)
    check_policy(args.policy, options)
    path = resolve_model_path(model)
    model_config = check_model(path, args.dtype, args.max_model_len)
    device = check_device(args.device, model_config.dtype)
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
        "max_seqs_per_request": args.max_seqs_per_request,
        "max_tokens_per_request": args.max_tokens_per_request,
    }
    config = EngineConfig(
        model=path,
        dtype=args.dtype,
        device=device,
        max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching,
        max_waiting=args.max_queue or None,
        policy=args.policy,
        policy_options=options,
        **check_speculative(args, model_config),
        **{k: v for k, v in overrides.items() if v is not None},
    )
    return config, names


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
