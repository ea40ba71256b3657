"""Flag types and startup checks that the commands share: sizes, counts, the model, the device, the policy.

A bad flag ends a command with one line that names the flag and what is
wrong with it, and exit code 2 (argparse's convention for usage errors),
never a traceback. Range errors in numbers are caught by argparse through
the types here; what needs the model or torch (its context length, the
device, the policy's options) raises ``UsageError`` from the checks, which
the commands print as ``error: ...``. Torch and the model code are imported
inside the checks so that ``tokenmill --help`` stays fast.
"""

from __future__ import annotations

import argparse
import inspect
import re
from collections.abc import Callable
from typing import Any

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
MiB = 1 << 20


class UsageError(Exception):
    """A flag (or a combination of flags) the command cannot run with; the message is one line."""


def parse_size(text: str, bare_unit: int = 1) -> int:
    """Bytes from ``1073741824``, ``512MiB``, ``2GiB``, ``1.5G`` (binary units).

    A bare number is in ``bare_unit`` bytes: 1 for ``serve`` and ``generate``,
    MiB for the profiler and the simulator, whose flags always took MiB.
    """
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 536870912, 512MiB, 2GiB)")
    unit = m.group(2).lower()
    scale = 1024 ** "_kmgt".index(unit) if unit else (bare_unit if not m.group(3) else 1)
    return int(float(m.group(1)) * scale)


def size_in(bare_unit: int) -> Callable[[str], int]:
    """An argparse type: a size in bytes, a bare number counting ``bare_unit`` bytes."""

    def size(text: str) -> int:
        return parse_size(text, bare_unit)

    return size


def _int_at_least(low: int) -> Callable[[str], int]:
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return check


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def threads(text: str) -> int | None:
    """``--threads``: ``auto`` (None: fitted to the cores the process gets) or a fixed count."""
    if text.strip().lower() == "auto":
        return None
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e} (a thread count, or auto)") from None


def port(text: str) -> int:
    value = non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {value} (0-65535)")
    return value


def key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE parsed as JSON when it is JSON (``5``, ``[64, 256]``), else a string."""
    import json

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def lora_module(text: str) -> tuple[str, str]:
    """``NAME=PATH``, vLLM's JSON ``{"name": ..., "path": ...}``, or a bundled adapter's NAME alone."""
    import json

    from tokenmill.models import BUNDLED_ADAPTERS

    if text.lstrip().startswith("{"):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"not JSON: {text!r} ({exc.msg})") from None
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(spec.get("path"), str):
            raise argparse.ArgumentTypeError(f'expected {{"name": ..., "path": ...}}, got {text!r}')
        name, path = spec["name"], spec["path"]
    else:
        name, sep, path = text.partition("=")
        if not sep:
            if text in BUNDLED_ADAPTERS:
                return text, str(BUNDLED_ADAPTERS[text])
            bundled = ", ".join(BUNDLED_ADAPTERS)
            raise argparse.ArgumentTypeError(f"expected NAME=PATH or a bundled adapter ({bundled}), got {text!r}")
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH with both set, got {text!r}")
    return name, path


# ---------------------------------------------------------------- checks


def check_model(path: str, dtype: str, max_model_len: int | None = None) -> Any:
    """The checkpoint's ``ModelConfig``, read without loading weights; refuses a missing or unusable directory."""
    from tokenmill.model.loader import read_model_config

    try:
        config = read_model_config(path, dtype)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load the model: {exc}") from None
    if max_model_len is not None and max_model_len > config.max_model_len:
        raise UsageError(
            f"--max-model-len {max_model_len} is longer than the model's context ({config.max_model_len} tokens)"
        )
    return config


def check_device(name: str, dtype: Any = None) -> str:
    """The device to run on (``auto``: cuda when torch sees one), refused if this torch cannot use it.

    ``dtype`` is the torch dtype the model will compute in (for the check that
    the GPU has bfloat16).
    """
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name}: not a device (use cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: tokenmill runs on cpu or cuda")
    if device.type == "cpu":
        return name
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        raise UsageError(f"--device {name}: this torch ({torch.__version__}) was built without CUDA; "
                         "install a CUDA build of torch or use --device cpu")  # fmt: skip
    if not torch.cuda.is_available():
        raise UsageError(f"--device {name}: torch sees no CUDA device (check the driver and CUDA_VISIBLE_DEVICES)")
    count = torch.cuda.device_count()
    index = device.index or 0
    if index >= count:
        raise UsageError(f"--device {name}: torch sees {count} CUDA device{'s' if count != 1 else ''}")
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        gpu = torch.cuda.get_device_name(index)
        raise UsageError(f"--dtype bfloat16 (the checkpoint's or asked for): {gpu} has no bfloat16; "
                         "use --dtype float16 or float32")  # fmt: skip
    return name


def check_policy(name: str, options: dict[str, Any]) -> None:
    """Refuse an unknown policy, an option it does not take, or a value it rejects."""
    from tokenmill.core.policies import available_policies, make_policy

    names = available_policies()
    if name not in names:
        raise UsageError(f"--policy {name}: unknown policy; available: {', '.join(names)}")
    try:
        make_policy(name, **options)
        return
    except (TypeError, ValueError) as exc:
        error = exc
    params = inspect.signature(type(make_policy(name)).__init__).parameters
    accepted = [p for p, v in params.items() if p != "self" and v.kind is not inspect.Parameter.VAR_KEYWORD]
    unknown = [k for k in options if k not in accepted]
    if unknown:
        takes = f"it takes {', '.join(accepted)}" if accepted else "it takes no options"
        raise UsageError(f"--policy-option {unknown[0]}: policy {name!r} has no option {unknown[0]!r} ({takes})")
    raise UsageError(f"--policy-option: policy {name!r} refused {options}: {error}")


def add_speculative_arguments(p: argparse.ArgumentParser) -> None:
    """``--speculative`` and ``--num-speculative-tokens``, shared by serve and generate."""
    p.add_argument("--speculative", default=None, metavar="METHOD",
                   help="speculative decoding: ngram, draft:PATH, draft:default (the bundled model's "
                        "draft) or self-int8 (the model's own int8 weights as the draft)")  # fmt: skip
    p.add_argument("--num-speculative-tokens", default=None, metavar="K|auto",
                   help="draft tokens per step: K, or auto (default): chosen per request and step, "
                        "backing off when the batch is compute bound")  # fmt: skip


def check_speculative(args: argparse.Namespace, target: Any) -> dict[str, Any]:
    """The ``EngineConfig`` speculative fields from the flags; a draft's vocabulary is checked
    against ``target`` (the model's ``ModelConfig``) before any weight is loaded."""
    from tokenmill.spec import parse_num_speculative_tokens, parse_speculative

    method, k = args.speculative, args.num_speculative_tokens
    if method is None:
        if k is not None:
            raise UsageError("--num-speculative-tokens needs --speculative")
        return {}
    try:
        kind, path = parse_speculative(method)
        num = parse_num_speculative_tokens(k)
    except ValueError as exc:
        flag = "--speculative" if "method" in str(exc) else "--num-speculative-tokens"
        raise UsageError(f"{flag}: {exc}") from None
    if kind == "draft":
        from tokenmill.model.loader import read_model_config

        try:
            draft = read_model_config(path)  # type: ignore[arg-type]
        except (OSError, ValueError) as exc:
            raise UsageError(f"--speculative {method}: cannot load the draft model: {exc}") from None
        if draft.vocab_size != target.vocab_size:
            raise UsageError(f"--speculative {method}: the draft's vocabulary has {draft.vocab_size} tokens, "
                             f"the model's {target.vocab_size}: a draft must share the model's tokenizer")  # fmt: skip
    return {"speculative": method, "num_speculative_tokens": num}
# ---------------------------------------------------------------- KV eviction


def add_kv_eviction_flags(p: argparse.ArgumentParser) -> None:
    """``--kv-eviction`` and its budget: every request's default (``core/kv_eviction.py``)."""
    p.add_argument("--kv-eviction", default="none", choices=["none", "streaming", "h2o"],
                   help="evict KV past --kv-budget tokens per sequence: streaming (StreamingLLM: sinks + "
                        "recent window) or h2o (heavy hitters by attention mass); default none")  # fmt: skip
    p.add_argument("--kv-budget", type=positive_int, default=None, help="KV tokens a sequence keeps at most")
    p.add_argument("--kv-sinks", type=non_negative_int, default=4, help="first tokens always kept (default 4)")
    p.add_argument("--kv-recent", type=positive_int, default=None,
                   help="newest tokens always kept (default: budget - sinks for streaming, budget / 2 for h2o)")


def kv_eviction_from_args(args: argparse.Namespace) -> Any:
    """The ``KVEviction`` the flags ask for (None: none); a bad combination is a ``UsageError``."""
    from tokenmill.core.kv_eviction import KVEviction

    if args.kv_eviction == "none":
        if args.kv_budget is not None or args.kv_recent is not None:
            raise UsageError("--kv-budget and --kv-recent need --kv-eviction streaming or h2o")
        return None
    if args.kv_budget is None:
        raise UsageError(f"--kv-eviction {args.kv_eviction} needs --kv-budget TOKENS")
    try:
        return KVEviction(args.kv_eviction, args.kv_budget, sinks=args.kv_sinks, recent=args.kv_recent)
    except ValueError as e:
        raise UsageError(str(e).replace("kv_", "--kv-")) from None
