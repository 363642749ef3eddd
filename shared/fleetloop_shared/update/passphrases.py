"""Where a release key's passphrase comes from, apart from a prompt: a file or the environment.

Kept apart from :mod:`fleetloop_shared.update.release_keys` (TUF, securesystemslib, cryptography) so that
the command line can name ``$FLEETLOOP_KEY_PASSPHRASE`` in its help without importing those for every
command it runs.
"""

from __future__ import annotations

import os
from pathlib import Path

from fleetloop_shared.errors import UserError

#: Environment variable a passphrase may come from (scripts, CI); a prompt or a file otherwise.
PASSPHRASE_ENV = "FLEETLOOP_KEY_PASSPHRASE"
#: Shortest passphrase accepted when a key is made.
MIN_PASSPHRASE = 8


def read_passphrase_file(path: Path) -> bytes:
    """The first line of ``path`` (a passphrase kept in a file for automation)."""
    try:
        return path.read_bytes().splitlines()[0] if path.stat().st_size else b""
    except OSError as exc:
        raise UserError(f"cannot read passphrase file {path}: {exc.strerror}") from None


def passphrase_from_env() -> bytes | None:
    value = os.environ.get(PASSPHRASE_ENV)
    return value.encode() if value else None
