"""Releases: images and bundles uploaded by a release manager, signed into the TUF image repository,
with deltas from every image the fleet's devices of that hardware report running.

What devices fetch (TUF metadata, artifact files) is public: everything in it is signed or hashed, and a
device verifies it before use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fleetloop_cloud.ota.artifact_store import ArtifactStore, check_not_older_than_fleet, is_bundle_image
from fleetloop_cloud.ota.tuf_repository import TufRepositories
from fleetloop_cloud.repositories.interfaces import DeviceRepository, ReleaseRepository
from fleetloop_cloud.repositories.records import ReleaseRecord
from fleetloop_cloud.services.access import Access, Caller
from fleetloop_shared.errors import NotFoundError, UserError
from fleetloop_shared.update.artifact import ReleaseManifest, manifest_from_bytes
from fleetloop_shared.update.delta_format import readable_formats


class ReleaseService:
    def __init__(
        self,
        releases: ReleaseRepository,
        devices: DeviceRepository,
        artifacts: ArtifactStore,
        tuf: TufRepositories,
        access: Access,
    ) -> None:
        self._releases = releases
        self._devices = devices
        self._artifacts = artifacts
        self._tuf = tuf
        self._access = access

    def upload(
        self, caller: Caller, image: bytes, *, name: str, version: str, hardware_id: str, now: float
    ) -> ReleaseManifest:
        """Check, store and sign a release; its deltas start from the images devices of ``hardware_id``
        run. Refused (UserError / StateError) before anything is signed when the image does not fit."""
        self._access.operator(caller, "releases.upload")
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
        previous = [r.version for r in self._releases.all() if (r.name, r.hardware_id) == (name, hardware_id)]
        manifest, signature = self._artifacts.add_release(
            image, name=name, version=version, hardware_id=hardware_id, bases=bases, now=now,
            base_formats=base_formats,
        )
        self._releases.put(ReleaseRecord(name, version, hardware_id, manifest, signature, now))
        parsed = manifest_from_bytes(manifest)
        self._access.record(
            caller, "releases.upload", f"{name} for {hardware_id}", now,
            before=previous[-1] if previous else "", after=version,
            detail=f"sha256 {parsed.target_sha256}, {parsed.target_size} bytes",
        )  # fmt: skip
        return parsed

    def all(self, caller: Caller) -> list[ReleaseRecord]:
        self._access.operator(caller, "releases.list")
        return self._releases.all()

    def rotate_root(
        self, caller: Caller, repository: str, *, root_keys: int | None, threshold: int | None, online: bool,
        now: float,
    ) -> dict[str, Any]:  # fmt: skip
        """A new root for the ``image`` or ``director`` repository (see ``TufRepositories.rotate``)."""
        self._access.operator(caller, "keys.rotate")
        result = self._tuf.rotate(repository, root_keys=root_keys, threshold=threshold, online=online)
        version = result.get("root_version")
        self._access.record(
            caller, "keys.rotate", repository, now,
            before=int(version) - 1 if isinstance(version, int) else "", after=version,
            detail=f"root keys {result.get('root_keys')}, threshold {result.get('threshold')}, "
                   f"online keys rotated: {bool(result.get('online_keys_rotated'))}",
        )  # fmt: skip
        return result

    def metadata_file(self, repository: str, name: str) -> bytes:
        """TUF metadata for devices' ngclient: ``image/<file>`` or ``director/<device_id>/<file>``."""
        return self._tuf.metadata_bytes(repository, name)

    def artifact_file(self, relpath: str) -> Path:
        """The file behind ``files/<sha256>``; NotFoundError for anything else."""
        return self._artifacts.file_path(relpath)
