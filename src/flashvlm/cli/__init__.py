"""The ``flashvlm`` command line. Each subcommand is one module with ``add_parser`` and ``run``.

Bad input (a budget out of range, a missing image, an unsupported model) and a failed
file operation (a full disk, a read-only folder) print one line naming the problem and
exit with status 2, without a traceback.
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
    except FlashVLMError as error:
        return _fail(args.command, str(error))
    except OSError as error:  # a missing file, a full disk (ENOSPC), a read-only folder
        return _fail(args.command, os_error_message(error))
    except KeyboardInterrupt as interrupt:  # a subcommand may say what it kept
        print(f"flashvlm {args.command}: interrupted" + (f"; {interrupt}" if str(interrupt) else ""), file=sys.stderr)
        return 130


def _fail(command: str, message: str) -> int:
    one_line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    print(f"flashvlm {command}: error: {one_line}", file=sys.stderr)
    return 2


def os_error_message(error: OSError) -> str:
    """One line for an OSError: its own text without the ``[Errno N]`` prefix, naming the file when it has one."""
    if not error.strerror:
        return str(error)
    if error.filename is not None:
        return f"{error.filename}: {error.strerror}"
    return error.strerror


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
