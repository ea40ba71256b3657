"""``python -m tokenmill.server [MODEL] [options]``: the same as ``tokenmill serve``."""

from __future__ import annotations

import argparse
import sys

from tokenmill.commands import serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenmill.server")
    serve.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
