"""The ``flashvlm`` command line. Each subcommand is one module with ``add_parser`` and ``run``.

Bad input (a budget out of range, a missing image, an unsupported model) and a failed
file operation (a full disk, a read-only folder) print one line naming the problem and
exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

from ..errors import FlashVLMError, os_error_message


def build_parser() -> argparse.ArgumentParser:
    # The subcommands import torch and transformers: seconds, during which Ctrl-C must be
    # answered as everywhere else, so they are imported here, from main, not above.
    from . import bench, bench_selection, compare, demo, generate

    parser = argparse.ArgumentParser(
        prog="flashvlm", description="Text-guided visual token selection for Hugging Face VLMs."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (demo, generate, compare, bench, bench_selection):  # the order --help lists them in
        module.add_parser(subparsers)
    return parser


@contextlib.contextmanager
def _ctrl_c_exits_at_once() -> Iterator[None]:
    """Within the block, Ctrl-C ends the process at once with one line and status 130.

    For the imports: nothing is written yet, so there is nothing to keep, and a
    KeyboardInterrupt raised inside a half-imported library can be swallowed there and
    come back as an unrelated error (numpy's, under accelerate's import). Python's own
    handler stays wherever it was replaced or ignored, and off the main thread.
    """
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return

    def exit_interrupted(signum, frame) -> None:
        sys.stderr.write("flashvlm: interrupted\n")
        sys.stderr.flush()
        os._exit(130)

    signal.signal(signal.SIGINT, exit_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    try:
        with _ctrl_c_exits_at_once():
            parser = build_parser()
    except KeyboardInterrupt:
        print("flashvlm: interrupted", file=sys.stderr)
        return 130
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
