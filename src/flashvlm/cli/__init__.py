"""The ``flashvlm`` command line. Each subcommand is one module with ``add_parser`` and ``run``.

Bad input (a budget out of range, a missing image, an unsupported model) prints one
line naming the problem and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import FlashVLMError
from . import bench, bench_selection, compare, demo, generate

#: Subcommand modules, in the order ``--help`` lists them.
SUBCOMMANDS = [demo, generate, compare, bench, bench_selection]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashvlm", description="Text-guided visual token selection for Hugging Face VLMs."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 on malformed arguments
    try:
        return args.run(args) or 0
    except (FlashVLMError, FileNotFoundError, IsADirectoryError, PermissionError) as error:
        print(f"flashvlm {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flashvlm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
