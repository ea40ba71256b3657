"""The ``tokenmill`` command line: one sub-command per module under ``tokenmill/commands/``.

Each command module exposes ``register(subparsers)``, which adds its parser
and sets ``func`` (called with the parsed arguments; returns an exit code).
Command modules import their heavy dependencies inside ``func`` so that
``tokenmill --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = [
    "tokenmill.commands.generate",
    "tokenmill.commands.serve",
    "tokenmill.commands.bench",
    "tokenmill.commands.sim",
    "tokenmill.commands.profile",
    "tokenmill.commands.model_path",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description="LLM inference serving with a digital twin.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
