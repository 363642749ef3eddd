"""The director: per device, signs which image to install now and the delta from what it runs.

When the rollout controller offers a job to a device, the director writes that device's targets
metadata (online keys, :mod:`fleetloop_cloud.ota.tuf_repository`): the release's image target — the same
path, length and hash as the image repository's, plus the device id, job id and rollout id — and the
image repository's delta from the device's reported installed image in a format the device reads, if
there is one. Each new job replaces the device's previous targets (a higher version), so an old job
replayed to the device no longer matches what the director says and is refused.

The device still checks everything against the image repository; the director only chooses.
"""

from __future__ import annotations

from collections.abc import Sequence

from fleetloop_cloud.ota.tuf_repository import TufRepositories, target_file
from fleetloop_shared.errors import NotFoundError
from fleetloop_shared.update.artifact import ReleaseManifest
from fleetloop_shared.update.delta_format import FLDELTA1
from fleetloop_shared.update.tuf_metadata import CUSTOM_KEY, KIND_DELTA, delta_target_path, image_target_path


class Director:
    """Chooses and signs the per-device targets for OTA jobs."""

    def __init__(self, tuf: TufRepositories) -> None:
        self.tuf = tuf

    def assign(
        self,
        device_id: str,
        *,
        job_id: str,
        rollout_id: str,
        release: ReleaseManifest,
        installed_sha256: str,
        delta_formats: Sequence[str] = (FLDELTA1,),
    ) -> int:
        """Sign ``release`` as this device's one update for ``job_id``; returns the targets version.

        The delta is the one from the device's installed image in the first of ``delta_formats`` (the
        formats it reads, preferred first) that the image repository signs; none: the full image only.

        NotFoundError when the image repository has not signed the release (nothing to direct to).
        """
        signed = self.tuf.image.targets()
        image_path = image_target_path(release.name, release.hardware_id, release.version)
        image = signed.get(image_path)
        if image is None:
            raise NotFoundError(f"the image repository has not signed {image_path}")
        facts = dict(image.custom[CUSTOM_KEY])
        facts.update({"device_id": device_id, "job_id": job_id, "rollout_id": rollout_id})
        targets = {image_path: target_file(image_path, image.hashes["sha256"], image.length, facts)}
        for fmt in delta_formats if installed_sha256 else ():
            name, hw, version = release.name, release.hardware_id, release.version
            path = delta_target_path(name, hw, version, installed_sha256, fmt)
            delta = signed.get(path)
            if delta is not None and delta.custom[CUSTOM_KEY].get("kind") == KIND_DELTA:
                targets[path] = delta
                break
        files = self.tuf.device(device_id)
        if files.targets() == targets:
            # the controller re-offers undelivered jobs every tick: the same targets are not re-signed
            return files.version()
        return files.publish(targets, replace=True)
