"""Bundles: updates that need no reboot (software, ONNX model packs, catalogs, configs).

A bundle is a tar archive delivered through the same TUF metadata, director, download and delta path as
firmware (``install: "swap"`` in its signed facts). Instead of an inactive slot it is unpacked beside the
running version and switched to with one atomic rename::

    <root>/<name>/current        -> v-<version>   (a symlink, replaced with rename(2))
    <root>/<name>/v-<version>/   the unpacked files + .fleetloop-bundle.json (name, version, sha256)
    <root>/<name>/v-<version>.tar the archive itself: the base of the next delta

Readers open ``current/...`` and see either the whole old version or the whole new one, never a mix; a
power cut before the rename leaves the old version current, after it the new one (the journal then
re-runs the idempotent install and commits). The previous version is kept (one step back by hand); older
ones are pruned.

Archives come from outside: only regular files and directories with relative names inside the bundle
are accepted, within a size and member-count bound; anything else is an :class:`IntegrityError`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
from pathlib import Path, PurePosixPath

from fleetloop_shared.durable import fsync_directory, write_atomically
from fleetloop_shared.errors import IntegrityError, StorageFullError, UserError
from fleetloop_shared.names import safe_name

MARKER = ".fleetloop-bundle.json"
#: Most members a bundle may have (hostile-archive bound).
MAX_MEMBERS = 10_000
_VERSION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,63}")


def is_bundle_archive(data: bytes) -> bool:
    """True for a (ustar/GNU/pax) tar archive: the cloud's test for "install by swap"."""
    return len(data) >= 512 and data[257:262] == b"ustar"


class BundleStore:
    """Installed bundles under ``root``; each bundle's ``current`` is switched atomically."""

    def __init__(self, root: Path, *, max_bytes: int = 512 * 1024 * 1024) -> None:
        self.root = root
        self.max_bytes = max_bytes

    def _dir(self, name: str) -> Path:
        return self.root / safe_name(name, "bundle name", becomes="a directory")

    def current(self, name: str) -> Path | None:
        """The directory readers should use for ``name`` (``<root>/<name>/current``), if installed."""
        link = self._dir(name) / "current"
        return link if link.exists() else None

    def installed(self, name: str) -> dict[str, str] | None:
        """``{"name", "version", "sha256"}`` of the current version, or None."""
        current = self.current(name)
        if current is None:
            return None
        try:
            doc = json.loads((current / MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    def installed_archive(self, name: str) -> Path | None:
        info = self.installed(name)
        if info is None:
            return None
        path = self._dir(name) / f"v-{info.get('version')}.tar"
        return path if path.is_file() else None

    def install(self, name: str, version: str, archive: Path, sha256: str) -> Path:
        """Unpack ``archive`` as ``version`` of ``name`` and make it current; returns the current path.

        Idempotent: installing the same version again re-unpacks it and leaves it current.
        """
        if not _VERSION.fullmatch(version):
            raise UserError(f"bundle version {version!r} is not a plain version string")
        base = self._dir(name)
        base.mkdir(parents=True, exist_ok=True)
        staging = base / f".staging-{version}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        self._unpack(archive, staging)
        write_atomically(
            staging / MARKER, json.dumps({"name": name, "version": version, "sha256": sha256}).encode()
        )
        fsync_directory(staging)
        final = base / f"v-{version}"
        if final.exists():
            current = base / "current"
            if current.is_symlink() and os.readlink(current) == final.name:
                # the running version: switch readers to the fresh copy first, then replace it
                self._point(base, staging.name)
            shutil.rmtree(final)
        staging.rename(final)
        shutil.copyfile(archive, base / f".v-{version}.tar.tmp")
        os.replace(base / f".v-{version}.tar.tmp", base / f"v-{version}.tar")
        previous = os.readlink(base / "current") if (base / "current").is_symlink() else None
        self._point(base, final.name)
        self._prune(base, keep={final.name, previous or ""})
        return base / "current"

    @staticmethod
    def _point(base: Path, target: str) -> None:
        """Make ``current`` point at ``target`` with one rename (atomic for every reader)."""
        tmp = base / ".current.new"
        tmp.unlink(missing_ok=True)
        os.symlink(target, tmp)
        os.replace(tmp, base / "current")
        fsync_directory(base)

    @staticmethod
    def _prune(base: Path, keep: set[str]) -> None:
        for path in base.iterdir():
            if path.name.startswith("v-") and path.is_dir() and path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)
                (base / f"{path.name}.tar").unlink(missing_ok=True)

    def _unpack(self, archive: Path, dest: Path) -> None:
        total = 0
        try:
            with tarfile.open(archive, "r:") as tar:
                members = []
                for i, m in enumerate(tar):
                    if i >= MAX_MEMBERS:
                        raise IntegrityError(f"bundle has more than {MAX_MEMBERS} members")
                    name = PurePosixPath(m.name)
                    if name.is_absolute() or ".." in name.parts or not name.parts or name.name == MARKER:
                        raise IntegrityError(f"bundle member {m.name!r} is outside the bundle")
                    if not (m.isfile() or m.isdir()):
                        raise IntegrityError(f"bundle member {m.name!r} is not a regular file or directory")
                    total += m.size
                    if total > self.max_bytes:
                        raise StorageFullError(f"bundle unpacks to more than {self.max_bytes} bytes")
                    members.append(m)
                tar.extractall(dest, members=members, filter="data")
        except tarfile.TarError as exc:
            raise IntegrityError(f"bundle is not a valid tar archive: {exc}") from None
        for dirpath, _, filenames in os.walk(dest):
            for filename in filenames:
                fd = os.open(os.path.join(dirpath, filename), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            fsync_directory(Path(dirpath))
