"""Files that are whole or absent: outputs written atomically, and a folder proved writable.

A report written in place and interrupted (Ctrl-C, a full disk) leaves a truncated file
where a good one stood. :func:`atomic_write` writes a temporary file beside the target,
flushes it to disk and renames it over the target (``os.replace`` is atomic within one
file system), so a reader sees the old file or the new one, never half of either.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it replaces ``path``, on failure it is removed.

    ``mode`` is ``"w"`` (text; pass ``encoding``, ``newline``) or ``"wb"``. A new file gets the
    permissions ``open`` would give it (0666 less the umask); a rewritten file keeps its own, and
    its owner and group where the user may give them (root may; others keep a group they are in).
    A symbolic link is followed, as ``open`` follows it: the file it points to is written, and
    the link stays (renaming over it would have turned the link into a file of its own).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb'; got {mode!r}")
    path = write_target(Path(path))
    try:
        descriptor, temporary = _create_beside(path)
    except OSError as error:
        raise type(error)(error.errno, f"cannot write {path}: {error.strerror}") from None
    try:
        with os.fdopen(descriptor, mode, **open_kwargs) as file:
            if path.exists():  # a rewritten file keeps its permissions, and its owner where we may say so
                existing = os.stat(path)
                with contextlib.suppress(OSError):
                    os.chown(temporary, existing.st_uid, existing.st_gid)
                os.chmod(temporary, stat.S_IMODE(existing.st_mode))
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(error, OSError) and error.strerror:  # a write's OSError names no file
            raise type(error)(error.errno, f"cannot write {path}: {error.strerror}") from None
        raise


def write_target(path: Path) -> Path:
    """The file that writing ``path`` replaces: where a symbolic link (chain) points, else ``path``."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _create_beside(path: Path) -> tuple[int, Path]:
    """A new, empty, uniquely named file beside ``path``, open for writing: (descriptor, its path).

    Created with mode 0666 less the umask, as ``open`` creates files; ``tempfile.mkstemp``
    would make every output private (0600) whatever the user's umask.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(temporary, flags, 0o666), temporary
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name beside {path}")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """``Path.write_text`` (UTF-8), atomically."""
    with atomic_write(path, encoding="utf-8") as file:
        file.write(text)


def check_writable_folder(folder: str | os.PathLike) -> None:
    """Raise an ``OSError`` naming ``folder`` unless a file can be created in it.

    A real probe file rather than ``os.access``, which says yes to root on a read-only
    mount and knows nothing of full disks or quotas.
    """
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".flashvlm-probe-"):
            pass
    except OSError as error:
        raise type(error)(error.errno, f"cannot write in {folder}: {error.strerror}") from None


def update_markdown_section(path: str | os.PathLike, section: str, body: str, preamble: str = "") -> None:
    """Replace (or append) the block between ``<!-- generated:SECTION:start/end -->`` in ``path``
    (a missing file starts as ``preamble``)."""
    path = Path(path)
    text = path.read_text() if path.exists() else preamble
    start, end = f"<!-- generated:{section}:start -->", f"<!-- generated:{section}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _match: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)  # an interrupted write must not truncate the document
