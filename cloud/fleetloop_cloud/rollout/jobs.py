"""How a rollout's job reaches a device: the director signs the device's targets, then the device's
session (its control stream, over gRPC or MQTT) carries the job.

The controller sees only :class:`~.controller.JobPublisher`; this is the coordinator's implementation.
Signing comes first: a device that receives the job refreshes the director's metadata and must find
its targets there.
"""

from __future__ import annotations

from collections.abc import Collection

from fleetloop_cloud.ota.director import Director
from fleetloop_cloud.repositories.interfaces import DeviceRepository
from fleetloop_cloud.rollout.controller import Job
from fleetloop_cloud.sessions import DeviceSessions
from fleetloop_shared.update.artifact import manifest_from_bytes
from fleetloop_shared.update.delta_format import readable_formats
from fleetloop_shared.wire import device_pb2, ota_pb2


class OtaJobs:
    """Publishes OTA jobs through the director and the device sessions of this coordinator."""

    def __init__(
        self,
        director: Director,
        sessions: DeviceSessions,
        devices: DeviceRepository,
        artifact_base_url: str = "",
    ) -> None:
        self._director = director
        self._sessions = sessions
        self._devices = devices
        #: Where devices download payloads from (this coordinator's HTTP address), known once it listens.
        self.artifact_base_url = artifact_base_url

    def reachable(self) -> Collection[str]:
        """Devices whose sessions are held here."""
        return self._sessions.online()

    def publish(self, device_id: str, job: Job) -> bool:
        """Sign the device's targets for the job, then queue the job on its session; True if the device
        is connected here (the controller offers it again on the next tick otherwise)."""
        device = self._devices.get(device_id)
        self._director.assign(
            device_id,
            job_id=job.job_id,
            rollout_id=job.rollout_id,
            release=manifest_from_bytes(job.manifest),
            installed_sha256=device.firmware_sha256 if device is not None else "",
            delta_formats=readable_formats(device.delta_formats if device is not None else ()),
        )
        message = ota_pb2.OtaJob(
            job_id=job.job_id,
            rollout_id=job.rollout_id,
            manifest=job.manifest,
            signature=job.signature,
            artifact_base_url=self.artifact_base_url,
            install_windows=[
                ota_pb2.InstallWindow(start_unix=int(a), end_unix=int(b)) for a, b in job.windows
            ],
            hold_install=job.hold,
        )
        return self._sessions.publish(device_id, device_pb2.CloudMessage(ota_job=message))

    def withdraw(self, device_id: str, job_id: str, rollout_id: str, reason: str) -> bool:
        """Tell the device on its control stream to drop the job (``OtaCancel``); True if its session
        is here. Nothing is signed: a withdrawal only ever stops an update."""
        message = ota_pb2.OtaCancel(job_id=job_id, rollout_id=rollout_id, reason=reason[:500])
        return self._sessions.publish(device_id, device_pb2.CloudMessage(ota_cancel=message))

    def publish_job(
        self, device_id: str, job_id: str, rollout_id: str, manifest: bytes, signature: bytes
    ) -> bool:
        """:meth:`publish` of a job without install terms."""
        return self.publish(device_id, Job(job_id, rollout_id, manifest, signature))
