"""The artifact store: release images, their deltas and signed manifests on local disk.

Files are content-addressed (``files/<sha256>``): the name *is* the integrity check, the same bytes are
stored once however many releases use them, and the HTTP server can hand a device any file by hash
without a lookup table. For every image already installed in the fleet (a *base*), a release carries a
bsdiff4 delta when it is smaller than the full image, so most devices download a fraction of it.

Releases only move forward: a version that is not greater than the newest release of the same name and
hardware is refused, which is the cloud half of the rollback defence (the device refuses older versions
too).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from pathlib import Path

from fleetloop_shared.artifact import (
    PayloadRef,
    ReleaseManifest,
    ReleaseSigner,
    manifest_to_bytes,
    sha256_hex,
)
from fleetloop_shared.delta import DELTA_ALGORITHM, make_delta
from fleetloop_shared.durable import write_atomically
from fleetloop_shared.errors import IntegrityError, NotFoundError, StateError, UserError

#: Largest image accepted (refused above, before anything is written).
MAX_IMAGE_BYTES = 1 << 30
#: bsdiff needs ~17x the old image in memory; above this size a release is full-image only
#: (policy "full-only"), which is always correct, just bigger to download.
DELTA_MAX_IMAGE_BYTES = 64 * 1024 * 1024
#: At most this many deltas per release (policy "first bases win": bases after these, in the order the
#: caller gives them, get the full image).
MAX_DELTA_BASES = 32

_SHA256 = re.compile(r"[0-9a-f]{64}")
_FILE_RELPATH = re.compile(r"files/([0-9a-f]{64})")
_VERSION = re.compile(r"\d{1,9}(\.\d{1,9}){0,7}")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def version_key(version: str) -> tuple[int, ...]:
    """Numeric comparison key of a dotted version ("1.10.0" > "1.9.2"); trailing zeros do not count,
    so "2.0" and "2.0.0" are the same version."""
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        raise UserError(f"version {version!r}: expected dotted numbers like 1.4.2")
    parts = [int(p) for p in version.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def _safe(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise UserError(
            f"{what} {value!r}: use 1-128 letters, digits, '.', '_' or '-', not starting with '.' or '-'"
        )
    return value


class ArtifactStore:
    """Stores images and deltas by hash and signs one manifest per release."""

    def __init__(self, root: Path, signer: ReleaseSigner, *, validity_days: int = 30) -> None:
        if isinstance(validity_days, bool) or not isinstance(validity_days, int) or validity_days < 1:
            raise UserError(f"validity_days must be a whole number of days >= 1, got {validity_days!r}")
        self._root = Path(root)
        self._files = self._root / "files"
        self._releases = self._root / "releases"
        self._files.mkdir(parents=True, exist_ok=True)
        self._releases.mkdir(parents=True, exist_ok=True)
        self._signer = signer
        self._validity_s = validity_days * 86400
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ content-addressed files

    def _put_file(self, data: bytes) -> str:
        sha = sha256_hex(data)
        path = self._files / sha
        if not (path.is_file() and path.stat().st_size == len(data)):
            write_atomically(path, data)
        return sha

    def add_image(self, image: bytes) -> str:
        """Store an installed base image (e.g. v1 as provisioned) so later releases can delta from it."""
        self._check_image(image)
        return self._put_file(bytes(image))

    def image(self, sha256: str) -> bytes:
        """The stored bytes with this hash; NotFoundError if absent, IntegrityError if the disk lies."""
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise NotFoundError(f"no image {sha256!r}: expected a lowercase hex sha256")
        path = self._files / sha256
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"no image with sha256 {sha256}") from None
        actual = sha256_hex(data)
        if actual != sha256:
            raise IntegrityError(f"artifact file {path} is corrupt: its sha256 is {actual}")
        return data

    def file_path(self, relpath: str) -> Path:
        """Absolute path of ``files/<sha256>`` for the file server; NotFoundError for anything else."""
        match = _FILE_RELPATH.fullmatch(relpath) if isinstance(relpath, str) else None
        if match is None:
            raise NotFoundError(f"no artifact file {relpath!r}")
        path = self._files / match.group(1)
        if not path.is_file():
            raise NotFoundError(f"no artifact file {relpath!r}")
        return path

    # ------------------------------------------------------------------ releases

    @staticmethod
    def _check_image(image: bytes) -> None:
        if not isinstance(image, bytes | bytearray | memoryview):
            raise UserError(f"an image must be bytes, got {type(image).__name__}")
        if len(image) == 0:
            raise UserError("the image is empty")
        if len(image) > MAX_IMAGE_BYTES:
            raise UserError(f"the image is {len(image)} bytes; the limit is {MAX_IMAGE_BYTES}")

    def _release_dir(self, name: str, hardware_id: str) -> Path:
        return self._releases / _safe(name, "release name") / _safe(hardware_id, "hardware id")

    def versions(self, name: str, hardware_id: str) -> list[str]:
        """Released versions of ``name`` for ``hardware_id``, oldest first."""
        directory = self._release_dir(name, hardware_id)
        if not directory.is_dir():
            return []
        found = []
        for p in directory.glob("*.manifest.json"):
            version = p.name.removesuffix(".manifest.json")
            if _VERSION.fullmatch(version):
                found.append(version)
        return sorted(found, key=version_key)

    def release(self, name: str, hardware_id: str, version: str) -> tuple[bytes, bytes]:
        """(manifest bytes, signature) of one stored release; NotFoundError if there is none."""
        version_key(version)
        directory = self._release_dir(name, hardware_id)
        try:
            return (
                (directory / f"{version}.manifest.json").read_bytes(),
                (directory / f"{version}.sig").read_bytes(),
            )
        except FileNotFoundError:
            raise NotFoundError(f"no release {name} {version} for hardware {hardware_id}") from None

    def add_release(
        self,
        image: bytes,
        *,
        name: str,
        version: str,
        hardware_id: str,
        bases: Sequence[bytes],
        now: float,
    ) -> tuple[bytes, bytes]:
        """Store the image and its deltas, sign the manifest; returns (manifest bytes, signature).

        One bsdiff4 delta per distinct base (bases identical to the new image are skipped), kept only
        when smaller than the full image. StateError for a duplicate or a version not greater than the
        newest existing release of this name and hardware.
        """
        self._check_image(image)
        image = bytes(image)
        key = version_key(version)
        directory = self._release_dir(name, hardware_id)
        with self._lock:
            existing = self.versions(name, hardware_id)
            for old in existing:
                if version_key(old) == key:
                    raise StateError(f"release {name} {version} for hardware {hardware_id} already exists")
            if existing and version_key(existing[-1]) > key:
                raise StateError(
                    f"release {name} {version} for hardware {hardware_id} is not newer than the existing "
                    f"{existing[-1]}; versions only move forward"
                )
            target_sha = self._put_file(image)
            payloads = [PayloadRef("full", "none", f"files/{target_sha}", target_sha, len(image), None)]
            seen = {target_sha}
            for base in bases:
                if len(seen) > MAX_DELTA_BASES or len(image) > DELTA_MAX_IMAGE_BYTES:
                    break
                self._check_image(base)
                base = bytes(base)
                base_sha = sha256_hex(base)
                if base_sha in seen:
                    continue
                seen.add(base_sha)
                self._put_file(base)
                if len(base) > DELTA_MAX_IMAGE_BYTES:
                    continue
                patch = make_delta(base, image)
                if len(patch) >= len(image):
                    continue
                patch_sha = self._put_file(patch)
                payloads.append(
                    PayloadRef(
                        "delta", DELTA_ALGORITHM, f"files/{patch_sha}", patch_sha, len(patch), base_sha
                    )
                )
            created = int(now)
            manifest = ReleaseManifest(
                name=name,
                version=version,
                hardware_id=hardware_id,
                target_sha256=target_sha,
                target_size=len(image),
                payloads=tuple(payloads),
                created_unix=created,
                expires_unix=created + self._validity_s,
            )
            manifest_bytes = manifest_to_bytes(manifest)
            signature = self._signer.sign(manifest_bytes)
            directory.mkdir(parents=True, exist_ok=True)
            # Signature first, manifest last: the manifest's presence is what marks the release as existing.
            write_atomically(directory / f"{version}.sig", signature)
            write_atomically(directory / f"{version}.manifest.json", manifest_bytes)
        return manifest_bytes, signature
