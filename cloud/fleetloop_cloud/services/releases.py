"""Releases: images and bundles uploaded by a release manager, signed into the TUF image repository,
with deltas from every image the fleet's devices of that hardware report running.

What devices fetch (TUF metadata, artifact files) is public: everything in it is signed or hashed, and a
device verifies it before use.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from fleetloop_cloud.ota.artifact_store import (
    ArtifactFile,
    ArtifactStore,
    ReleaseInput,
    StagedRelease,
    check_not_older_than_fleet,
    is_bundle_image,
)
from fleetloop_cloud.ota.tuf_repository import TufRepositories
from fleetloop_cloud.repositories.interfaces import DeviceRepository, ReleaseRepository
from fleetloop_cloud.repositories.records import ReleaseRecord
from fleetloop_cloud.services.access import Access, Caller
from fleetloop_shared.errors import (
    IntegrityError,
    NotFoundError,
    PermissionDeniedError,
    StateError,
    UserError,
)
from fleetloop_shared.update.artifact import ReleaseManifest, manifest_from_bytes
from fleetloop_shared.update.delta_format import readable_formats

__all__ = ["ArtifactFile", "ReleaseInput", "ReleaseService"]


class ReleaseService:
    def __init__(
        self,
        releases: ReleaseRepository,
        devices: DeviceRepository,
        artifacts: ArtifactStore,
        tuf: TufRepositories,
        access: Access,
        *,
        read_only_keys: Path | None = None,
    ) -> None:
        """``read_only_keys``: the mounted secret this coordinator's online keys load from, if any (a
        rotation makes keys, which such a coordinator must not write there)."""
        self._read_only_keys = read_only_keys
        self._releases = releases
        self._devices = devices
        self._artifacts = artifacts
        self._tuf = tuf
        self._access = access

    def upload(self, caller: Caller, release: ReleaseInput) -> ReleaseManifest:
        """Check, store and sign a release; its deltas start from the images devices of its hardware
        run (``release.bases`` is filled in here). Refused (UserError / StateError) before anything
        is signed when the image does not fit.

        Only where this coordinator holds the image repository's targets keys (a lab's custody);
        where release managers hold them, :meth:`stage` and :meth:`publish` (StateError saying so)."""
        self._access.operator(caller, "releases.upload")
        if not self.coordinator_signs():
            raise StateError(
                "release managers hold the image repository's targets keys: upload with "
                "'fleetloop artifacts upload FILE --key KEY.pem', which signs on your machine"
            )
        release, previous = self._inputs(release)
        manifest, signature = self._artifacts.add_release(release)
        return self._released(caller, manifest, signature, previous, release.now)

    def coordinator_signs(self) -> bool:
        """Whether this coordinator signs the image repository's targets itself (lab custody)."""
        return self._tuf.image_authority.holds("targets")

    def stage(self, caller: Caller, release: ReleaseInput) -> StagedRelease:
        """Store a release and its deltas and propose the targets metadata that publishes them, for
        the release manager to sign on their machine; nothing reaches a device yet."""
        self._access.operator(caller, "releases.stage")
        release, _ = self._inputs(release)
        staged = self._artifacts.stage_release(release)
        m = staged.manifest
        self._access.record(
            caller, "releases.stage", f"{m.name} for {m.hardware_id}", release.now, after=m.version,
            detail=f"staging {staged.staging_id}, sha256 {m.target_sha256}, {m.target_size} bytes",
        )  # fmt: skip
        return staged

    def publish(self, caller: Caller, staging_id: str, signed_targets: bytes, now: float) -> ReleaseManifest:
        """Publish a staged release with the targets metadata release managers signed. A refusal
        (missing or wrong signatures, a changed proposal) is audited with its reason, then raised."""
        self._access.operator(caller, "releases.upload")
        staged = self._artifacts.staged(staging_id)
        m = staged.manifest
        previous = self._previous(m.name, m.hardware_id)
        try:
            manifest, signature = self._artifacts.publish_staged(staging_id, signed_targets)
        except (PermissionDeniedError, IntegrityError) as exc:
            self._access.record(
                caller, "releases.refused", f"{m.name} for {m.hardware_id}", now, after=m.version,
                detail=f"staging {staging_id}: {exc}",
            )  # fmt: skip
            raise
        return self._released(caller, manifest, signature, previous, now)

    def _previous(self, name: str, hardware_id: str) -> list[str]:
        return [r.version for r in self._releases.all() if (r.name, r.hardware_id) == (name, hardware_id)]

    def _released(
        self, caller: Caller, manifest: bytes, signature: bytes, previous: list[str], now: float
    ) -> ReleaseManifest:
        parsed = manifest_from_bytes(manifest)
        name, version, hardware_id = parsed.name, parsed.version, parsed.hardware_id
        self._releases.put(ReleaseRecord(name, version, hardware_id, manifest, signature, now))
        self._access.record(
            caller, "releases.upload", f"{name} for {hardware_id}", now,
            before=previous[-1] if previous else "", after=version,
            detail=f"sha256 {parsed.target_sha256}, {parsed.target_size} bytes",
        )  # fmt: skip
        return parsed

    def _inputs(self, release: ReleaseInput) -> tuple[ReleaseInput, list[str]]:
        """The release with the bases its deltas start from and the formats per base, and the earlier
        versions of this release."""
        image, version, hardware_id = release.image, release.version, release.hardware_id
        if not image:
            raise UserError("the artifact is empty")
        fleet = [d for d in self._devices.all() if d.hardware_id == hardware_id]
        if not is_bundle_image(image):
            # Devices report the firmware they run, so only a slot image can be compared with the fleet;
            # a bundle (model pack, software) is kept moving forward per name by the artifact store.
            check_not_older_than_fleet([d.firmware_version for d in fleet], version, hardware_id)
        bases: list[bytes] = []
        seen: set[str] = set()
        # per base, the format each device on it prefers: FLDELTA2 for current agents, FLDELTA1 for the
        # agents that read only it, so one rollout updates a fleet that mixes them
        base_formats: dict[str, set[str]] = {}
        for d in fleet:
            if d.firmware_sha256:
                base_formats.setdefault(d.firmware_sha256, set()).add(readable_formats(d.delta_formats)[0])
        for d in fleet:
            sha = d.firmware_sha256
            if not sha or sha in seen:
                continue
            seen.add(sha)
            try:
                bases.append(self._artifacts.image(sha))
            except NotFoundError:
                continue
        with_bases = replace(release, bases=bases, base_formats=base_formats)
        return with_bases, self._previous(release.name, hardware_id)

    def all(self, caller: Caller) -> list[ReleaseRecord]:
        self._access.operator(caller, "releases.list")
        return self._releases.all()

    def rotate_root(
        self, caller: Caller, repository: str, *, root_keys: int | None, threshold: int | None, online: bool,
        now: float,
    ) -> dict[str, Any]:  # fmt: skip
        """A new root for the ``image`` or ``director`` repository (see ``TufRepositories.rotate``)."""
        self._access.operator(caller, "keys.rotate")
        if self._read_only_keys is not None:
            raise StateError(
                f"this coordinator loads its keys from a read-only secret ({self._read_only_keys}) and a "
                "rotation makes new keys: rotate on a coordinator whose keys directory is writable, then "
                "put its keys into the secret"
            )
        result = self._tuf.rotate(repository, root_keys=root_keys, threshold=threshold, online=online)
        version = result.get("root_version")
        self._access.record(
            caller, "keys.rotate", repository, now,
            before=int(version) - 1 if isinstance(version, int) else "", after=version,
            detail=f"root keys {result.get('root_keys')}, threshold {result.get('threshold')}, "
                   f"online keys rotated: {bool(result.get('online_keys_rotated'))}",
        )  # fmt: skip
        return result

    def install_root(self, caller: Caller, repository: str, data: bytes, now: float) -> dict[str, Any]:
        """A new image root release managers signed with the offline root keys."""
        self._access.operator(caller, "keys.rotate")
        before = self._tuf.image_authority.root.signed.version
        result = self._tuf.install_root(repository, data)
        self._access.record(
            caller, "keys.rotate", repository, now, before=before, after=result["root_version"],
            detail=f"signed offline; root keys {result['root_keys']}, threshold {result['threshold']}",
        )  # fmt: skip
        return result

    def metadata_file(self, repository: str, name: str) -> bytes:
        """TUF metadata for devices' ngclient: ``image/<file>`` or ``director/<device_id>/<file>``."""
        return self._tuf.metadata_bytes(repository, name)

    def target_file(self, target_path: str) -> ArtifactFile:
        """The file behind an image repository target path (``/tuf/image/targets/<path>``)."""
        return self._artifacts.file(f"files/{self._tuf.image_target_sha256(target_path)}")

    def artifact_file(self, relpath: str) -> ArtifactFile:
        """The file behind ``files/<sha256>``; NotFoundError for anything else."""
        return self._artifacts.file(relpath)
