"""The artifact store: release images, their deltas and signed manifests in the object store.

The objects (``files/``, ``releases/``, ``staged/``; the TUF metadata beside them under ``tuf/``) live
where the coordinator's object store is: the data directory's ``artifacts/`` folder (the embedded
default, the layout it always had) or a bucket every coordinator shares, so a release uploaded through
one coordinator is served by all.

Files are content-addressed (``files/<sha256>``): the name *is* the integrity check, the same bytes are
stored once however many releases use them, and the HTTP server can hand a device any file by hash
without a lookup table. For every image already installed in the fleet (a *base*), a release carries a
delta (:mod:`fleetloop_shared.update.delta`) in each format that devices on that base prefer — FLDELTA2
(whole-image matching) for current agents, FLDELTA1 for agents that read only it — when it is smaller
than the full image, so most devices download a fraction of it.

What devices trust is the TUF image repository (:mod:`fleetloop_cloud.ota.tuf_repository`): every image and
delta becomes a signed target there, with its hash, length, hardware id, version and (for a delta) base
hash. Where release managers hold its targets keys, a release is *staged* (stored, its targets proposed)
and published once they have signed (:meth:`ArtifactStore.stage_release`, ``publish_staged``).
The Ed25519 release manifest is kept as the cloud's own record of a release (rollouts read it);
devices no longer verify it.

Releases only move forward: a version that is not greater than the newest release of the same name and
hardware is refused, which is the cloud half of the rollback defence (the device refuses older versions
too).
"""

from __future__ import annotations

import base64
import json
import logging
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetloop_cloud.ota.tuf_repository import TufRepositories, target_file
from fleetloop_cloud.storage import ObjectStore
from fleetloop_shared.errors import IntegrityError, NotFoundError, StateError, UserError
from fleetloop_shared.names import safe_name
from fleetloop_shared.update.artifact import (
    PayloadRef,
    ReleaseManifest,
    ReleaseSigner,
    manifest_from_bytes,
    manifest_to_bytes,
    sha256_file,
    sha256_hex,
)
from fleetloop_shared.update.delta import FLDELTA2, FORMATS, make_delta_file
from fleetloop_shared.update.firmware_image import MAGIC as IMAGE_MAGIC
from fleetloop_shared.update.firmware_image import image_info
from fleetloop_shared.update.tuf_metadata import (
    delta_facts,
    delta_target_path,
    image_facts,
    image_target_path,
)

log = logging.getLogger(__name__)

#: Largest image accepted (refused above, before anything is written).
MAX_IMAGE_BYTES = 1 << 30
#: Every image size up to the limit gets deltas (FLDELTA2 indexes the whole base: ~5× its size in memory).
DELTA_MAX_IMAGE_BYTES = MAX_IMAGE_BYTES
#: At most this many deltas per release (policy "first bases win": bases after these, in the order the
#: caller gives them, get the full image).
MAX_DELTA_BASES = 32

_SHA256 = re.compile(r"[0-9a-f]{64}")
_STAGED = re.compile(r"staged/(\d{20})-([0-9a-f]{16})\.json")
_FILE_RELPATH = re.compile(r"files/([0-9a-f]{64})")
_VERSION = re.compile(r"\d{1,9}(\.\d{1,9}){0,7}")
_STAGING_ID = re.compile(r"[0-9a-f]{16}")
#: Most staged releases waiting for release managers' signatures (policy: the oldest is dropped).
MAX_STAGED = 16


@dataclass(frozen=True)
class ReleaseInput:
    """What a release is made from: the image, what it is, when, and the installed images (``bases``)
    its deltas start from, with the delta formats devices on each base read (by the base's sha256;
    default FLDELTA2)."""

    image: bytes
    name: str
    version: str
    hardware_id: str
    now: float
    bases: Sequence[bytes] = ()
    base_formats: Mapping[str, Collection[str]] | None = None


@dataclass(frozen=True)
class ArtifactFile:
    """A stored file a device downloads: read in pieces (HTTP Range) from wherever it is stored."""

    key: str
    size: int
    store: ObjectStore

    def read(self, start: int, length: int) -> bytes:
        return self.store.read_range(self.key, start, length)

    def data(self) -> bytes:
        """The whole file."""
        return self.store.get(self.key)


@dataclass(frozen=True)
class StagedRelease:
    """A release stored but not yet published: its manifest and the targets metadata (signed part)
    that would publish it, waiting for the release managers' signatures."""

    staging_id: str
    manifest: ReleaseManifest
    manifest_bytes: bytes
    signature: bytes
    proposal: dict[str, Any]

    def to_bytes(self) -> bytes:
        doc = {
            "manifest": base64.b64encode(self.manifest_bytes).decode(),
            "signature": base64.b64encode(self.signature).decode(),
            "proposal": self.proposal,
        }
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, staging_id: str, data: bytes) -> StagedRelease:
        try:
            doc = json.loads(data)
            manifest_bytes = base64.b64decode(doc["manifest"])
            return cls(staging_id, manifest_from_bytes(manifest_bytes), manifest_bytes,
                       base64.b64decode(doc["signature"]), dict(doc["proposal"]))  # fmt: skip
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"staged release {staging_id} is unreadable: {exc}") from None


def version_key(version: str) -> tuple[int, ...]:
    """Numeric comparison key of a dotted version ("1.10.0" > "1.9.2"); trailing zeros do not count,
    so "2.0" and "2.0.0" are the same version."""
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        raise UserError(f"version {version!r}: expected dotted numbers like 1.4.2")
    parts = [int(p) for p in version.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


class ArtifactStore:
    """Stores images and deltas by hash and signs one manifest per release."""

    def __init__(
        self,
        store: ObjectStore,
        signer: ReleaseSigner,
        *,
        validity_days: int = 30,
        tuf: TufRepositories | None = None,
    ) -> None:
        if isinstance(validity_days, bool) or not isinstance(validity_days, int) or validity_days < 1:
            raise UserError(f"validity_days must be a whole number of days >= 1, got {validity_days!r}")
        self._store = store
        self._signer = signer
        self.tuf = tuf
        self._validity_s = validity_days * 86400
        self._lock = threading.Lock()
        self._methods: dict[str, str] = {}

    # ------------------------------------------------------------------ content-addressed files

    def _put_file(self, data: bytes) -> str:
        sha = sha256_hex(data)
        if self._stored_size(f"files/{sha}") != len(data):
            self._store.put(f"files/{sha}", data)
        return sha

    def _stored_size(self, key: str) -> int | None:
        try:
            return self._store.stat(key).size
        except NotFoundError:
            return None

    def add_image(self, image: bytes) -> str:
        """Store an installed base image (e.g. v1 as provisioned) so later releases can delta from it."""
        self._check_image(image)
        return self._put_file(bytes(image))

    def image(self, sha256: str) -> bytes:
        """The stored bytes with this hash; NotFoundError if absent, IntegrityError if the disk lies."""
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise NotFoundError(f"no image {sha256!r}: expected a lowercase hex sha256")
        try:
            data = self._store.get(f"files/{sha256}")
        except NotFoundError:
            raise NotFoundError(f"no image with sha256 {sha256}") from None
        actual = sha256_hex(data)
        if actual != sha256:
            raise IntegrityError(
                f"artifact file {self._store.location}/files/{sha256} is corrupt: its sha256 is {actual}"
            )
        return data

    def file(self, relpath: str) -> ArtifactFile:
        """``files/<sha256>`` for the file server; NotFoundError for anything else."""
        match = _FILE_RELPATH.fullmatch(relpath) if isinstance(relpath, str) else None
        size = self._stored_size(relpath) if match is not None else None
        if size is None:
            raise NotFoundError(f"no artifact file {relpath!r}")
        return ArtifactFile(relpath, size, self._store)

    # ------------------------------------------------------------------ releases

    @staticmethod
    def _check_image(image: bytes) -> None:
        if not isinstance(image, bytes | bytearray | memoryview):
            raise UserError(f"an image must be bytes, got {type(image).__name__}")
        if len(image) == 0:
            raise UserError("the image is empty")
        if len(image) > MAX_IMAGE_BYTES:
            raise UserError(f"the image is {len(image)} bytes; the limit is {MAX_IMAGE_BYTES}")

    def _release_dir(self, name: str, hardware_id: str) -> str:
        name = safe_name(name, "release name", becomes="an object key")
        return f"releases/{name}/{safe_name(hardware_id, 'hardware id', becomes='an object key')}"

    def versions(self, name: str, hardware_id: str) -> list[str]:
        """Released versions of ``name`` for ``hardware_id``, oldest first."""
        directory = self._release_dir(name, hardware_id)
        found = []
        for obj in self._store.list(directory + "/"):
            version = obj.key[len(directory) + 1 :].removesuffix(".manifest.json")
            if obj.key.endswith(".manifest.json") and _VERSION.fullmatch(version):
                found.append(version)
        return sorted(found, key=version_key)

    def release(self, name: str, hardware_id: str, version: str) -> tuple[bytes, bytes]:
        """(manifest bytes, signature) of one stored release; NotFoundError if there is none."""
        version_key(version)
        directory = self._release_dir(name, hardware_id)
        try:
            return (
                self._store.get(f"{directory}/{version}.manifest.json"),
                self._store.get(f"{directory}/{version}.sig"),
            )
        except NotFoundError:
            raise NotFoundError(f"no release {name} {version} for hardware {hardware_id}") from None

    def add_release(self, release: ReleaseInput) -> tuple[bytes, bytes]:
        """Store the image and its deltas, sign the manifest and (holding the targets keys: a lab's
        custody) the image repository's targets; returns (manifest bytes, signature). Where release
        managers hold the targets keys, :meth:`stage_release` and :meth:`publish_staged` instead.

        Per distinct base (bases identical to the new image are skipped), one delta in each format
        ``base_formats`` names for that base's sha256 (default: FLDELTA2), each kept only when smaller
        than the full image. StateError for a duplicate or a version not greater than the newest
        existing release of this name and hardware.
        """
        with self._lock:
            manifest, manifest_bytes, signature = self._prepare(release)
            if self.tuf is not None:
                self.tuf.image.publish(self._targets_of(manifest), new_only=True)
            self._write_release(manifest, manifest_bytes, signature)
        return manifest_bytes, signature

    def stage_release(self, release: ReleaseInput) -> StagedRelease:
        """Store the image and its deltas as :meth:`add_release` does, but publish nothing: the targets
        metadata that would add them is kept, under a new id, for release managers to sign on their
        machines (:meth:`publish_staged`). At most :data:`MAX_STAGED` wait; the oldest is dropped."""
        if self.tuf is None:
            raise StateError("no TUF image repository to stage a release for")
        with self._lock:
            manifest, manifest_bytes, signature = self._prepare(release)
            proposal = self.tuf.image.propose(self._targets_of(manifest))
            staged = StagedRelease(secrets.token_hex(8), manifest, manifest_bytes, signature, proposal)
            # named by the time it was staged, then its id: the names sort oldest first
            self._store.put(f"staged/{time.time_ns():020d}-{staged.staging_id}.json", staged.to_bytes())
            waiting = [o.key for o in self._store.list("staged/") if _STAGED.fullmatch(o.key)]
            for old in waiting[:-MAX_STAGED]:
                log.warning("staged release %s dropped unsigned: %d wait", old[-21:-5], MAX_STAGED)
                self._store.delete(old)
        return staged

    def publish_staged(self, staging_id: str, signed_targets: bytes) -> tuple[bytes, bytes]:
        """Publish a staged release whose targets metadata release managers signed (checked by the
        image repository: the same proposal, the next version, the targets keys' threshold); returns
        (manifest bytes, signature). NotFoundError for an unknown id."""
        if self.tuf is None or not isinstance(staging_id, str) or not _STAGING_ID.fullmatch(staging_id):
            raise NotFoundError(f"no staged release {staging_id!r}")
        with self._lock:
            key = self._staged_key(staging_id)
            staged = StagedRelease.from_bytes(staging_id, self._store.get(key))
            m = staged.manifest
            self._check_newer(m.name, m.version, m.hardware_id)
            self.tuf.image.publish_signed(signed_targets, staged.proposal)
            self._write_release(m, staged.manifest_bytes, staged.signature)
            self._store.delete(key)
        return staged.manifest_bytes, staged.signature

    def staged(self, staging_id: str) -> StagedRelease:
        """A staged release by id; NotFoundError when there is none."""
        if not isinstance(staging_id, str) or not _STAGING_ID.fullmatch(staging_id):
            raise NotFoundError(f"no staged release {staging_id!r}")
        return StagedRelease.from_bytes(staging_id, self._store.get(self._staged_key(staging_id)))

    def _staged_key(self, staging_id: str) -> str:
        found = [o.key for o in self._store.list("staged/")
                 if (m := _STAGED.fullmatch(o.key)) and m.group(2) == staging_id]  # fmt: skip
        if not found:
            raise NotFoundError(
                f"no staged release {staging_id!r} (published, dropped for newer ones, or never made)"
            )
        return found[-1]

    def _check_newer(self, name: str, version: str, hardware_id: str) -> None:
        key = version_key(version)
        existing = self.versions(name, hardware_id)
        for old in existing:
            if version_key(old) == key:
                raise StateError(f"release {name} {version} for hardware {hardware_id} already exists")
        if existing and version_key(existing[-1]) > key:
            raise StateError(
                f"release {name} {version} for hardware {hardware_id} is not newer than the existing "
                f"{existing[-1]}; versions only move forward"
            )

    def _write_release(self, manifest: ReleaseManifest, manifest_bytes: bytes, signature: bytes) -> None:
        directory = self._release_dir(manifest.name, manifest.hardware_id)
        # Signature first, manifest last: the manifest's presence is what marks the release as existing.
        self._store.put(f"{directory}/{manifest.version}.sig", signature)
        self._store.put(f"{directory}/{manifest.version}.manifest.json", manifest_bytes)

    def _prepare(self, release: ReleaseInput) -> tuple[ReleaseManifest, bytes, bytes]:
        """Checks, stored files and the signed manifest of a release (caller holds the lock)."""
        name, version, hardware_id = release.name, release.version, release.hardware_id
        bases, base_formats = release.bases, release.base_formats
        self._check_image(release.image)
        image = bytes(release.image)
        version_key(version)
        self._release_dir(name, hardware_id)
        _check_header(image, version, hardware_id)
        # A tar archive is a bundle (software, model pack, catalog, config): installed by an atomic
        # directory swap on the device, no reboot; it travels whole (deltas are from firmware bases).
        install = "swap" if is_bundle_image(image) else "slot"
        if install == "swap":
            bases = []
        if self.tuf is not None:
            self.tuf.image_authority.check_usable()
        self._check_newer(name, version, hardware_id)
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
            wanted = (base_formats or {}).get(base_sha, (FLDELTA2,))
            for fmt in sorted(set(wanted), key=list(FORMATS).index):
                delta = self._make_delta(base, image, fmt)
                if delta is None:
                    continue
                patch_sha, patch_size, methods = delta
                payloads.append(
                    PayloadRef("delta", fmt, f"files/{patch_sha}", patch_sha, patch_size, base_sha)
                )
                self._methods[patch_sha] = methods
        created = int(release.now)
        manifest = ReleaseManifest(
            name=name,
            version=version,
            hardware_id=hardware_id,
            target_sha256=target_sha,
            target_size=len(image),
            payloads=tuple(payloads),
            created_unix=created,
            expires_unix=created + self._validity_s,
            install=install,
        )
        manifest_bytes = manifest_to_bytes(manifest)
        return manifest, manifest_bytes, self._signer.sign(manifest_bytes)

    def _make_delta(self, base: bytes, image: bytes, fmt: str) -> tuple[str, int, str] | None:
        """Delta file in format ``fmt`` from one image to another, stored by hash; None when it is not
        smaller than the full image. Made in a scratch folder (the delta maker reads files), which
        goes when it is done."""
        with tempfile.TemporaryDirectory(prefix="fleetloop-delta-") as scratch:
            old, new, out = (Path(scratch) / n for n in ("old", "new", "delta"))
            old.write_bytes(base)
            new.write_bytes(image)
            stats = make_delta_file(old, new, out, format=fmt)
            if stats.bytes >= stats.new_bytes:
                return None
            patch_sha = sha256_file(out)
            if self._stored_size(f"files/{patch_sha}") != stats.bytes:
                self._store.put(f"files/{patch_sha}", out.read_bytes())
        return patch_sha, stats.bytes, "+".join(sorted(stats.methods))

    def _targets_of(self, manifest: ReleaseManifest) -> dict[str, Any]:
        """The release's image and deltas as TUF targets of the image repository."""
        image_path = image_target_path(manifest.name, manifest.hardware_id, manifest.version)
        targets: dict[str, Any] = {}
        for p in manifest.payloads:
            if p.kind == "full":
                facts = image_facts(
                    manifest.name, manifest.version, manifest.hardware_id, p.path, install=manifest.install
                )
                targets[image_path] = target_file(image_path, p.sha256, p.size, facts)
            else:
                assert p.base_sha256 is not None
                path = delta_target_path(
                    manifest.name, manifest.hardware_id, manifest.version, p.base_sha256, p.algorithm
                )
                facts = delta_facts(
                    image_path,
                    p.base_sha256,
                    p.path,
                    algorithm=p.algorithm,
                    methods=self._methods.get(p.sha256, ""),
                )
                targets[path] = target_file(path, p.sha256, p.size, facts)
        return targets


def _check_header(image: bytes, version: str, hardware_id: str) -> None:
    """A fleetloop firmware image must name the version and hardware it is uploaded as: a release
    manager uploading the wrong file is told here, before anything is signed or reaches a device.
    Other files (no image magic) are opaque artifacts and pass."""
    if not image.startswith(IMAGE_MAGIC):
        return
    info = image_info(image)
    if info.hardware_id != hardware_id:
        raise UserError(
            f"the file is a firmware image for hardware {info.hardware_id!r}, not {hardware_id!r}; "
            "upload it with --hardware " + info.hardware_id
        )
    if version_key(info.version) != version_key(version):
        raise UserError(f"the file is firmware version {info.version}, not {version}")


def is_bundle_image(image: bytes) -> bool:
    """A tar archive (ustar/GNU/pax magic at offset 257) is a bundle installed by directory swap."""
    return len(image) >= 512 and image[257:262] == b"ustar"


def check_not_older_than_fleet(fleet_versions: Sequence[str], version: str, hardware_id: str) -> None:
    """Refuse a release older than what devices of this hardware already run: each of them would
    refuse it as a rollback, so the release manager hears it now, before a rollout is planned."""
    key = version_key(version)
    newer = []
    for v in fleet_versions:
        try:
            if v and version_key(v) > key:
                newer.append(v)
        except UserError:  # a device reporting a non-numeric version does not block releases
            continue
    if newer:
        top = max(newer, key=version_key)
        raise UserError(
            f"version {version} is older than {top}, which devices with hardware {hardware_id} already "
            "run; devices refuse downgrades, so release a higher version"
        )
