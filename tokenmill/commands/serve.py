"""``tokenmill serve [MODEL]``: the OpenAI-compatible server (bundled model by default).

Safe defaults: it listens on loopback only (and then, without an API key,
answers only to loopback ``Host`` names), bounds the waiting queue, the
request body, the prompts and what a chat template may do, runs no template
sent with a request, and drains on SIGTERM. Pass ``--host 0.0.0.0`` to serve
other machines, and then set ``--api-key``.

LoRA adapters (``--lora-modules NAME=PATH ...``) are loaded and checked before
the server starts listening, and served as models of their own names; the
adapter endpoints that load or unload them later (and so read directories on
the server's disk) are off unless ``--enable-lora-runtime-updates``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from tokenmill.commands.engine_args import add_engine_arguments, engine_config, engine_value
from tokenmill.commands.options import (
    UsageError,
    add_kv_eviction_flags,
    add_speculative_arguments,
    check_device,
    check_model,
    check_policy,
    check_speculative,
    key_value,
    kv_eviction_from_args,
    lora_module,
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
    add_engine_arguments(p, defaults={"device": "auto"})
    add_speculative_arguments(p)
    add_kv_eviction_flags(p)
    p.add_argument("--lora-modules", nargs="+", action="extend", type=lora_module, default=[],
                   metavar="NAME=PATH",
                   help="LoRA adapters (PEFT directories) to serve as models named NAME; also "
                        "'{\"name\": ..., \"path\": ...}', or a bundled adapter's name alone (psalms)")
    p.add_argument("--enable-lora", action="store_true",
                   help="accepted for vLLM compatibility (LoRA needs no switch here)")
    p.add_argument("--enable-lora-runtime-updates", action="store_true",
                   help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (they load "
                        "directories on this machine: for trusted clients)")
    c = p.add_argument_group("cluster (Ray; pip install 'tokenmill[cluster]')")
    c.add_argument("--replicas", type=positive_int, default=None,
                   help="serve with N engine replicas, each a Ray actor (default: one engine in this process)")
    c.add_argument("--pd", default=None, metavar="P:D",
                   help="prefill/decode disaggregation: P prefill and D decode replicas, KV moved between them")
    c.add_argument("--threads-per-replica", type=positive_int, default=1,
                   help="CPU cores (torch threads) each replica reserves (default 1)")
    c.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (e.g. HEAD_IP:6379 after 'ray start --head'); default: start Ray here")
    c.add_argument("--router", default="round_robin",
                   help="replica choice: round_robin, least_outstanding_tokens or prefix_aware "
                        "(with --pd: of prefill replicas; decode replicas use least_outstanding_tokens)")
    c.add_argument("--router-option", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                   help="an option of the router (repeatable), e.g. balance_abs_threshold=4096")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")
    p.add_argument("--trace-file", help="on shutdown, write request timelines (queued, prefill chunks, decode "
                                        "steps, preemptions, first token, finish) as Chrome trace JSON, for Perfetto")
    p.add_argument("--trace-max-requests", type=positive_int, default=10000,
                   help="requests a --trace-file records (the first ones; bounds its memory)")
    p.add_argument("--tool-call-parser", default="hermes", choices=["hermes", "none"],
                   help="how tool calls are read from the model's text for tool_choice auto "
                        "(hermes: <tool_call> JSON blocks; none: refuse auto)")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("tokenmill.server")
    try:
        config, names = _engine_config(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.trace_file and not os.path.isdir(os.path.dirname(os.path.abspath(args.trace_file))):
        print(f"error: --trace-file: no directory for {args.trace_file}", file=sys.stderr)
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
        enable_lora_runtime_updates=args.enable_lora_runtime_updates,
        tool_call_parser=None if args.tool_call_parser == "none" else args.tool_call_parser,
    )
    if args.replicas is not None or args.pd is not None or args.ray_address is not None:
        if args.lora_modules or args.enable_lora_runtime_updates:
            print("error: LoRA adapters are served by one engine; --replicas, --pd and --ray-address "
                  "do not take them yet", file=sys.stderr)  # fmt: skip
            return 2
        from tokenmill.cluster.serve import serve_cluster

        return serve_cluster(args, config, names, settings)
    try:
        engine = Engine(config)
    except (ValueError, OSError, RuntimeError) as exc:
        # The flags were checked; what is left is the checkpoint itself or the device
        # (out of memory, a bad weight file): one line, the traceback at debug level.
        log.debug("engine start failed", exc_info=True)
        print(f"error: cannot load the model: {_first_line(exc)}", file=sys.stderr)
        return 2
    from tokenmill.lora.errors import LoraError

    for name, path in args.lora_modules:
        try:
            if name in names:
                raise LoraError(f"{name!r} is the base model's served name; give the adapter another")
            engine.add_lora(name, path)
        except LoraError as exc:
            print(f"error: --lora-modules {name}={path}: {exc}", file=sys.stderr)
            return 2
    state = build_state(engine, settings)
    app = create_app(state)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach it can use it", args.host)
    log.info(
        "serving %s (%s) at http://%s:%d/v1 (context %d tokens, %d KV blocks, policy %s)",
        names[0], config.model, args.host, args.port, engine.max_model_len, engine.executor.num_blocks, config.policy,
    )
    rc = run_server(app, state, args.host, args.port, log_level=args.log_level, access_log=args.access_log)
    if args.trace_file:
        from tokenmill.sim.trace_file import write_trace

        n = write_trace(args.trace_file, [engine.scheduler.timeline], {"command": "tokenmill serve"})
        log.info("wrote %d timeline events to %s", n, args.trace_file)
    return rc


def _engine_config(args: argparse.Namespace) -> tuple[Any, list[str]]:
    """The engine's configuration and the served names, from flags checked before any weight is loaded."""
    from tokenmill.engine import resolve_model_path

    if args.model and args.model_flag and args.model != args.model_flag:
        raise UsageError("give the model once (positional MODEL or --model)")
    model = args.model or args.model_flag
    check_policy(engine_value(args, "policy"), engine_value(args, "policy_options"))
    path = resolve_model_path(model)
    dtype = engine_value(args, "dtype")
    model_config = check_model(path, dtype, args.max_model_len)
    device = check_device(engine_value(args, "device"), model_config.dtype)
    if args.served_model_name:
        names = list(args.served_model_name)
    elif model is None:
        from tokenmill.models import DEFAULT_MODEL_NAME

        names = [DEFAULT_MODEL_NAME]
    else:
        names = [model]
    speculative = check_speculative(args, model_config)
    timeline = args.trace_max_requests if args.trace_file else 0
    return engine_config(args, model=path, device=device, max_waiting=args.max_queue or None,
                         timeline_requests=timeline, kv_eviction=kv_eviction_from_args(args), **speculative), names


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
