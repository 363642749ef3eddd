"""Crash-safe file replacement, used wherever state must survive a power cut.

Write to a temporary file beside the target, fsync it, rename it over the target, fsync the directory:
after a crash the target holds either its old or its new content, never a mix. A full disk is a
:class:`StorageFullError` and leaves no temporary file behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path

from fleetloop_shared.errors import StorageFullError

_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX needs the directory itself synced)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` durably; ``mode`` applies from the first byte (keys use 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if exc.errno in _FULL:
            raise StorageFullError(f"disk full writing {path}") from None
        raise
