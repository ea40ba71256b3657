"""``tokenmill model-path``: print the bundled model's folder, for tools that need its tokenizer.

Load generators such as guidellm and aiperf count prompt and output tokens
with the served model's tokenizer, which they look up by the model's name.
``tokenmill-default`` is not a Hugging Face Hub name, so they are given the
folder instead: ``--processor "$(tokenmill model-path)"`` (guidellm) or
``--tokenizer "$(tokenmill model-path)"`` (aiperf).
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "model-path", help="print the bundled model's folder (its tokenizer, for load tools such as guidellm)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokenmill.models import DEFAULT_MODEL_PATH

    print(DEFAULT_MODEL_PATH)
    return 0
