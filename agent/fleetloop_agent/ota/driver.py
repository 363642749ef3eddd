"""The OTA driver: carries one job through the transition table, doing the I/O each state calls for.

The decisions live in ``states`` (the table, where to resume, how to read a boot); this module performs
the side effects in the order that makes every power cut recoverable:

1. verify the signed manifest (reject before anything is written),
2. journal, then download (resumable) and verify the payload's hash,
3. journal INSTALLING, build the image (delta applied in memory) and check it against the signed target
   hash *before* writing the inactive slot, then read the slot back and check again,
4. journal REBOOTING, then switch the boot environment, then reboot,
5. after the boot, see which slot came up: the new one runs the health checks and commits (or reboots
   uncommitted, so the bootloader's counter falls back); the old one means ROLLED_BACK.

The running slot is never written. Every state change is journaled first and then reported.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fleetloop_agent.ota.download import Fetcher, HttpFetcher, download
from fleetloop_agent.ota.image import image_info
from fleetloop_agent.ota.journal import FinishedJobs, JournalEntry, OtaJournal
from fleetloop_agent.ota.platform import SlotPlatform, env_int, one_line
from fleetloop_agent.ota.states import (
    RESUME,
    TERMINAL,
    BootOutcome,
    OtaState,
    classify_boot,
    next_state,
    version_key,
)
from fleetloop_shared.artifact import (
    PayloadRef,
    ReleaseManifest,
    manifest_from_bytes,
    sha256_file,
    sha256_hex,
    verify_manifest,
)
from fleetloop_shared.delta import apply_delta
from fleetloop_shared.errors import (
    ArtifactVerificationError,
    FleetloopError,
    StateError,
    StorageFullError,
    UnavailableError,
)

log = logging.getLogger(__name__)

#: Attempts per download before the job fails (each attempt resumes where the last one stopped).
DOWNLOAD_ATTEMPTS = 3
_PRE_REBOOT = (
    OtaState.QUEUED,
    OtaState.DOWNLOADING,
    OtaState.DOWNLOADED,
    OtaState.VERIFIED,
    OtaState.INSTALLING,
)


@dataclass(frozen=True)
class OtaReport:
    """One state change of one job, as the cloud is told about it."""

    job_id: str
    rollout_id: str
    state: OtaState
    reason: str
    version: str
    bytes_downloaded: int
    bytes_total: int
    payload_kind: str


def _report_of(entry: JournalEntry) -> OtaReport:
    return OtaReport(
        job_id=entry.job_id,
        rollout_id=entry.rollout_id,
        state=entry.state,
        reason=entry.reason,
        version=entry.version,
        bytes_downloaded=entry.bytes_downloaded,
        bytes_total=entry.bytes_total,
        payload_kind=entry.payload_kind,
    )


def _no_extra_health() -> list[str]:
    return []


class OtaDriver:
    """Runs OTA jobs on one device; all durable state lives in ``state_dir``."""

    def __init__(
        self,
        platform: SlotPlatform,
        state_dir: Path,
        *,
        trusted_keys_pem: Sequence[bytes],
        hardware_id: str,
        report: Callable[[OtaReport], None],
        fetcher: Fetcher | None = None,
        clock: Callable[[], float] = time.time,
        max_artifact_bytes: int = 512 * 1024 * 1024,
    ) -> None:
        self.platform = platform
        self.state_dir = state_dir
        self.trusted_keys_pem = list(trusted_keys_pem)
        self.hardware_id = hardware_id
        self.max_artifact_bytes = max_artifact_bytes
        self._report = report
        self._fetcher: Fetcher = fetcher if fetcher is not None else HttpFetcher()
        self._clock = clock
        state_dir.mkdir(parents=True, exist_ok=True)
        self._journal = OtaJournal(state_dir / "journal.json")
        self._finished = FinishedJobs(state_dir / "finished-jobs.json")
        self._downloads = state_dir / "downloads"
        entry = self._journal.load()
        self._last: OtaReport | None = _report_of(entry) if entry is not None else None

    # -- what is installed ----------------------------------------------------------------------------
    def installed_version(self) -> str:
        """The version in the running slot's image header (the slot, not the cloud, is the truth)."""
        return image_info(self.platform.slot_image(self.platform.booted_slot())).version

    def installed_sha256(self) -> str:
        return sha256_hex(self.platform.slot_image(self.platform.booted_slot()))

    def last_report(self) -> OtaReport | None:
        """The journaled state of the current or last finished job (replay refusals are not kept)."""
        return self._last

    # -- entry points ---------------------------------------------------------------------------------
    def handle_job(
        self, job_id: str, rollout_id: str, manifest: bytes, signature: bytes, base_url: str
    ) -> None:
        """Run a new job from the cloud to REJECTED, FAILED, or a reboot (RebootRequested propagates)."""
        current = self._journal.load()
        if current is not None and current.state not in TERMINAL:
            if current.job_id == job_id:  # the cloud offered again a job we are already running
                self._emit(current)
                return
            self._refuse(
                job_id,
                rollout_id,
                f"another update (job {current.job_id}) is in progress ({current.state.value})",
            )
            return
        finished = self._finished.state_of(job_id)
        if finished is not None:
            self._refuse(
                job_id, rollout_id, f"job {job_id} already finished as {finished.value}; not running it again"
            )
            return
        entry = JournalEntry(
            job_id=job_id,
            rollout_id=rollout_id,
            state=OtaState.QUEUED,
            reason="",
            manifest=manifest,
            signature=signature,
            base_url=base_url,
            version="",
            target_slot="",
            previous_slot="",
            payload_kind="",
            bytes_downloaded=0,
            bytes_total=0,
            updated_unix=self._clock(),
        )
        try:
            self._accept(entry)
        except FleetloopError as exc:
            log.warning("OTA job %s rejected: %s", job_id, exc)
            self._transition(entry, "reject", one_line(str(exc)))
            return
        self._save_and_emit(entry)
        self._run(entry, _no_extra_health)

    def resume_after_boot(self, extra_health: Callable[[], list[str]]) -> None:
        """Continue the journaled job after an agent start: health check, rollback, or where it stopped."""
        entry = self._journal.load()
        if entry is None:
            return
        if entry.state in TERMINAL:
            self._finished.record(entry.job_id, entry.state)
            self._emit(entry)  # once more: the cloud may have missed it while we were offline
            return
        if entry.state in _PRE_REBOOT:
            booted = self.platform.booted_slot()
            if booted != entry.previous_slot:
                self._fail(
                    entry, f"device runs slot {booted}, the update expected slot {entry.previous_slot}"
                )
                return
        if entry.state is not OtaState.REBOOTING:  # REBOOTING first needs to know which slot came up
            resumed = RESUME[entry.state]
            if resumed is not entry.state:
                log.info("OTA job %s: resuming %s as %s", entry.job_id, entry.state.value, resumed.value)
                entry.state = resumed
            self._save_and_emit(entry)
        self._run(entry, extra_health)

    # -- journal + report -----------------------------------------------------------------------------
    def _emit(self, entry: JournalEntry) -> None:
        report = _report_of(entry)
        self._last = report
        self._report(report)

    def _save_and_emit(self, entry: JournalEntry) -> None:
        entry.updated_unix = self._clock()
        self._journal.save(entry)
        if entry.state in TERMINAL:
            self._finished.record(entry.job_id, entry.state)
            self._clear_downloads()
        self._emit(entry)

    def _transition(self, entry: JournalEntry, event: str, reason: str | None = None) -> None:
        entry.state = next_state(entry.state, event)
        if reason is not None:
            entry.reason = reason
        self._save_and_emit(entry)

    def _fail(self, entry: JournalEntry, reason: str) -> None:
        log.warning("OTA job %s failed in %s: %s", entry.job_id, entry.state.value, reason)
        self._transition(entry, "fail", one_line(reason))

    def _refuse(self, job_id: str, rollout_id: str, reason: str) -> None:
        """Tell the cloud no, without touching the journal (the running or finished job stays on record)."""
        log.warning("OTA job %s rejected: %s", job_id, reason)
        self._report(OtaReport(job_id, rollout_id, OtaState.REJECTED, one_line(reason), "", 0, 0, ""))

    # -- acceptance -----------------------------------------------------------------------------------
    def _accept(self, entry: JournalEntry) -> None:
        """Verify the job; fill in what it will do. Raises (→ REJECTED) when it must not run."""
        manifest = verify_manifest(
            entry.manifest,
            entry.signature,
            self.trusted_keys_pem,
            now_unix=int(self._clock()),
            hardware_id=self.hardware_id,
        )
        entry.version = manifest.version
        installed = self.installed_version()
        new_key, old_key = version_key(manifest.version), version_key(installed)
        if new_key is None or old_key is None:
            raise ArtifactVerificationError(
                f"version {manifest.version} cannot be compared with installed {installed} (need 1.2.3 style)"
            )
        if new_key <= old_key:
            raise ArtifactVerificationError(
                f"version {manifest.version} is not newer than installed {installed}"
            )
        if manifest.target_size > self.max_artifact_bytes:
            raise ArtifactVerificationError(
                f"image of {manifest.target_size} bytes exceeds the device limit of {self.max_artifact_bytes}"
            )
        payload = manifest.payload_for(self.installed_sha256())
        if payload.size > self.max_artifact_bytes:
            raise ArtifactVerificationError(
                f"payload of {payload.size} bytes exceeds this device's limit of {self.max_artifact_bytes}"
            )
        entry.previous_slot = self.platform.booted_slot()
        entry.target_slot = self.platform.other_slot()
        entry.payload_kind = payload.kind
        entry.bytes_total = payload.size

    def _payload(self, entry: JournalEntry, manifest: ReleaseManifest) -> PayloadRef:
        """The payload chosen at acceptance (same kind; a delta still from the running image)."""
        if entry.payload_kind == "delta":
            installed = sha256_hex(self.platform.slot_image(entry.previous_slot))
            for p in manifest.payloads:
                if p.kind == "delta" and p.base_sha256 == installed:
                    return p
            raise ArtifactVerificationError(
                f"no delta in the release applies to the running image {installed[:12]}"
            )
        for p in manifest.payloads:
            if p.kind == "full":
                return p
        raise ArtifactVerificationError("the release has no full image")

    def _payload_file(self, payload: PayloadRef) -> Path:
        return self._downloads / f"{payload.sha256}.{payload.kind}"

    def _clear_downloads(self, keep: Path | None = None) -> None:
        if not self._downloads.is_dir():
            return
        for path in self._downloads.iterdir():
            if path != keep:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)

    # -- the state loop -------------------------------------------------------------------------------
    def _run(self, entry: JournalEntry, extra_health: Callable[[], list[str]]) -> None:
        """Step until a terminal state; a reboot leaves through RebootRequested."""
        while entry.state not in TERMINAL:
            try:
                self._step(entry, extra_health)
            except FleetloopError as exc:
                self._fail(entry, str(exc))
            except OSError as exc:
                self._fail(entry, f"I/O error in {entry.state.value}: {exc}")

    def _step(self, entry: JournalEntry, extra_health: Callable[[], list[str]]) -> None:
        state = entry.state
        if state is OtaState.QUEUED:
            self._transition(entry, "start")
        elif state is OtaState.DOWNLOADING:
            self._download(entry)
        elif state is OtaState.DOWNLOADED:
            self._verify(entry)
        elif state is OtaState.VERIFIED:
            self._check_slots(entry)
            self._transition(entry, "install")
        elif state is OtaState.INSTALLING:
            self._install(entry)
        elif state is OtaState.REBOOTING:
            self._after_reboot(entry)
        elif state is OtaState.HEALTH_CHECK:
            self._health_check(entry, extra_health)
        else:  # pragma: no cover - every non-terminal state is handled above
            raise StateError(f"no step for state {state.value}")

    def _check_slots(self, entry: JournalEntry) -> None:
        booted = self.platform.booted_slot()
        if booted != entry.previous_slot or entry.target_slot == booted:
            raise StateError(
                f"slot layout changed under the update: running {booted}, expected {entry.previous_slot}"
            )

    def _download(self, entry: JournalEntry) -> None:
        manifest = manifest_from_bytes(entry.manifest)
        payload = self._payload(entry, manifest)
        dest = self._payload_file(payload)
        self._clear_downloads(keep=dest)  # one payload on disk at a time
        self._downloads.mkdir(parents=True, exist_ok=True)
        have = dest.stat().st_size if dest.exists() else 0
        free = shutil.disk_usage(self._downloads).free
        if payload.size - have > free:
            raise StorageFullError(
                f"payload needs {payload.size - have} more bytes, {free} free in {self._downloads}"
            )
        url = entry.base_url.rstrip("/") + "/" + payload.path

        def progress(done: int) -> None:
            entry.bytes_downloaded = done

        for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
            try:
                download(
                    self._fetcher,
                    url,
                    dest,
                    expected_size=payload.size,
                    expected_sha256=payload.sha256,
                    progress=progress,
                )
                break
            except UnavailableError as exc:
                if attempt == DOWNLOAD_ATTEMPTS:
                    raise UnavailableError(f"download failed after {attempt} attempts: {exc}") from None
                log.info("OTA job %s: download attempt %d failed, resuming: %s", entry.job_id, attempt, exc)
        entry.bytes_downloaded = payload.size
        self._transition(entry, "downloaded")

    def _verify(self, entry: JournalEntry) -> None:
        manifest = manifest_from_bytes(entry.manifest)
        payload = self._payload(entry, manifest)  # a delta: its base is still the running image
        dest = self._payload_file(payload)
        actual = sha256_file(dest)
        if actual != payload.sha256:
            dest.unlink(missing_ok=True)
            raise ArtifactVerificationError(f"payload hash mismatch: expected {payload.sha256}, got {actual}")
        self._transition(entry, "verified")

    def _install(self, entry: JournalEntry) -> None:
        self._check_slots(entry)
        manifest = manifest_from_bytes(entry.manifest)
        payload = self._payload(entry, manifest)
        data = self._payload_file(payload).read_bytes()
        if sha256_hex(data) != payload.sha256:
            raise ArtifactVerificationError(
                f"payload hash mismatch: expected {payload.sha256}, got {sha256_hex(data)}"
            )
        if payload.kind == "delta":
            image = apply_delta(
                self.platform.slot_image(entry.previous_slot), data, max_size=self.max_artifact_bytes
            )
        else:
            image = data
        built = sha256_hex(image)
        if built != manifest.target_sha256:
            raise ArtifactVerificationError(
                f"image built from the {payload.kind} payload does not match the release: "
                f"expected {manifest.target_sha256}, got {built}"
            )
        self.platform.write_slot(entry.target_slot, image)
        written = sha256_hex(self.platform.slot_image(entry.target_slot))
        if written != manifest.target_sha256:
            raise ArtifactVerificationError(
                f"slot {entry.target_slot} reads back wrong: expected {manifest.target_sha256}, got {written}"
            )
        self._transition(entry, "installed")  # REBOOTING is on disk before the boot env changes
        self._switch_and_reboot(entry)

    def _switch_and_reboot(self, entry: JournalEntry) -> None:
        self.platform.set_next_boot(entry.target_slot)
        log.info("OTA job %s: slot %s installed, rebooting into it", entry.job_id, entry.target_slot)
        self.platform.reboot()

    def _after_reboot(self, entry: JournalEntry) -> None:
        """REBOOTING found in the journal: which slot came up decides what happens next."""
        env = self.platform.boot_env()
        booted = self.platform.booted_slot()
        outcome = classify_boot(booted, entry.target_slot, env_int(env, "bootcount"))
        if outcome is BootOutcome.BOOTED_TARGET:
            self._transition(entry, "booted")
        elif outcome is BootOutcome.FELL_BACK:
            self._roll_back(entry, booted, env_int(env, "bootcount"))
        else:
            # Power was lost between journaling REBOOTING and switching: the new slot was never tried.
            manifest = manifest_from_bytes(entry.manifest)
            written = sha256_hex(self.platform.slot_image(entry.target_slot))
            if written != manifest.target_sha256:
                raise ArtifactVerificationError(
                    f"slot {entry.target_slot} no longer holds the release: "
                    f"expected {manifest.target_sha256}, got {written}"
                )
            self._switch_and_reboot(entry)

    def _roll_back(self, entry: JournalEntry, booted: str, bootcount: int) -> None:
        tries = max(bootcount - 1, 0)
        last = entry.reason or "no health check failure recorded"
        self._transition(entry, "fell_back", one_line(f"booted slot {booted} after {tries} tries: {last}"))
        try:
            self.platform.commit()  # clear the boot counter; the old slot stays
        except (
            FleetloopError,
            OSError,
        ) as exc:  # harmless: the counter only counts while an upgrade is pending
            log.warning("OTA job %s: could not reset the boot counter after rollback: %s", entry.job_id, exc)

    def _health_check(self, entry: JournalEntry, extra_health: Callable[[], list[str]]) -> None:
        env = self.platform.boot_env()
        booted = self.platform.booted_slot()
        bootcount = env_int(env, "bootcount")
        if classify_boot(booted, entry.target_slot, bootcount) is not BootOutcome.BOOTED_TARGET:
            self._roll_back(entry, booted, bootcount)
            return
        if env.get("upgrade_available") == "0":
            # committed before a power cut hid it from the journal: the boot env is the truth
            self._transition(entry, "healthy", "")
            return
        failures: list[str] = []
        for name, check in (("platform", self.platform.run_health_checks), ("agent", extra_health)):
            try:
                failures.extend(check())
            except Exception as exc:  # a broken check is an unhealthy device, not a crashed agent
                failures.append(f"{name} health check raised {type(exc).__name__}: {exc}")
        if not failures:
            self.platform.commit()
            self._transition(entry, "healthy", "")
            return
        self._transition(entry, "unhealthy", one_line("; ".join(failures)))
        log.warning("OTA job %s: unhealthy on slot %s, rebooting uncommitted", entry.job_id, booted)
        self.platform.reboot()
