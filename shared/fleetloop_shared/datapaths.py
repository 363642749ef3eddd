"""Where the real recordings are: ``--data DIR``, else ``$FLEETLOOP_DATA``, else ``../shared/data/real``.

The recordings are never part of the repository. Without them, firmware-sim generates comparable signals
and every command says which it used (``"data": "recordings"`` or ``"simulated"``).
"""

from __future__ import annotations

import os
from pathlib import Path

from fleetloop_shared.errors import ConfigError

ENV_VAR = "FLEETLOOP_DATA"
#: Subdirectories a usable recordings directory must hold.
REQUIRED = ("comma2k19", "opendbc", "skab", "xio-fusion-imu")


def _checkout_root() -> Path:
    # shared/fleetloop_shared/datapaths.py -> checkout root (only meaningful for a source checkout)
    return Path(__file__).resolve().parent.parent.parent


def _usable(path: Path) -> bool:
    return path.is_dir() and all((path / sub).is_dir() for sub in REQUIRED)


def find_recordings(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The recordings directory, or None when there is none (then signals are simulated).

    An explicit ``--data`` that is not a usable directory is a user error, not a silent fallback.
    """
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not _usable(path):
            raise ConfigError(
                f"--data {path}: not a recordings directory (needs subdirectories {', '.join(REQUIRED)})"
            )
        return path.resolve()
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if not _usable(path):
            raise ConfigError(
                f"${ENV_VAR}={env}: not a recordings directory (needs subdirectories {', '.join(REQUIRED)})"
            )
        return path.resolve()
    for base in (Path.cwd(), _checkout_root()):
        candidate = base.parent / "shared" / "data" / "real"
        if _usable(candidate):
            return candidate.resolve()
    return None


def comma2k19_segment(root: Path) -> Path:
    """The comma2k19 drive segment directory (the one holding ``processed_log``)."""
    hits = sorted(p.parent for p in (root / "comma2k19").rglob("processed_log"))
    if not hits:
        raise ConfigError(f"{root / 'comma2k19'}: no processed_log directory found")
    return hits[0]
