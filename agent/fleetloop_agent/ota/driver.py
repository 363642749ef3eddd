"""The OTA driver: carries one job through the transition table, doing the I/O each state calls for.

The decisions live in ``states`` (the table, where to resume, how to read a boot); this module performs
the side effects in the order that makes every power cut recoverable:

1. verify the update with TUF: both the image repository and the director, through ngclient
   (``tuf_client``), must sign the same image for this device and this job (reject before anything
   is written),
2. journal, then download (resumable) and verify the payload's hash,
3. journal INSTALLING, stream the image (full payload copied, or delta applied piece by piece with
   positioned reads of the running slot) into the inactive slot in bounded memory, hashing as it goes;
   check the hash against the signed target, then read the slot back and check again,
4. journal REBOOTING, then switch the boot environment, then reboot,
5. after the boot, see which slot came up: the new one runs the health checks and commits (or reboots
   uncommitted, so the bootloader's counter falls back); the old one means ROLLED_BACK.

The running slot is never written. Every state change is journaled first and then reported.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from fleetloop_agent.ota.bundles import BundleStore
from fleetloop_agent.ota.download import Fetcher, HttpFetcher, download
from fleetloop_agent.ota.image import image_info
from fleetloop_agent.ota.journal import FinishedJobs, JournalEntry, OtaJournal
from fleetloop_agent.ota.platform import SlotPlatform, env_int, one_line
from fleetloop_agent.ota.states import (
    CANCELABLE,
    RESUME,
    TERMINAL,
    BootOutcome,
    OtaState,
    classify_boot,
    next_state,
    version_key,
)
from fleetloop_agent.ota.tuf_client import TufClient
from fleetloop_shared.errors import (
    ArtifactVerificationError,
    FleetloopError,
    StateError,
    StorageFullError,
    UnavailableError,
)
from fleetloop_shared.update.artifact import (
    PayloadRef,
    ReleaseManifest,
    manifest_from_bytes,
    manifest_to_bytes,
    sha256_file,
)
from fleetloop_shared.update.delta import FORMATS, apply_delta_stream

log = logging.getLogger(__name__)

#: Attempts per download before the job fails (each attempt resumes where the last one stopped).
DOWNLOAD_ATTEMPTS = 3
#: Withdrawals remembered until the job they name is seen (policy: the oldest is forgotten; a job the
#: cloud still wants withdrawn is withdrawn again on its next offer or report).
MAX_PENDING_CANCELS = 64


class _Withdrawn(Exception):
    """Raised out of a download when the cloud withdrew its job: the step loop cancels it."""
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
    """The journal entry as the cloud is told it: every report field is the entry's field of that name."""
    return OtaReport(**{f.name: getattr(entry, f.name) for f in fields(OtaReport)})


def _no_extra_health() -> list[str]:
    return []


class OtaDriver:
    """Runs OTA jobs on one device; all durable state lives in ``state_dir``."""

    def __init__(
        self,
        platform: SlotPlatform,
        state_dir: Path,
        *,
        trust_anchors: Sequence[bytes],
        hardware_id: str,
        device_id: str,
        report: Callable[[OtaReport], None],
        fetcher: Fetcher | None = None,
        clock: Callable[[], float] = time.time,
        max_artifact_bytes: int = 512 * 1024 * 1024,
        download_rate_limit: float | None = None,
        on_bundle: Callable[[str, Path], None] | None = None,
        delta_formats: Sequence[str] = FORMATS,
    ) -> None:
        self.platform = platform
        #: Delta formats this device applies, preferred first (reported in the inventory; a job's delta in
        #: another format is passed over for the full image).
        self.delta_formats = tuple(delta_formats)
        self.state_dir = state_dir
        self.hardware_id = hardware_id
        self.device_id = device_id
        self.max_artifact_bytes = max_artifact_bytes
        #: bytes/s cap for payload downloads (None: as fast as the link goes)
        self.download_rate_limit = download_rate_limit
        #: Bundles (no-reboot updates) live here; ``on_bundle(name, current_dir)`` runs after each switch
        #: so a reader (e.g. the model registry) reloads from ``<state_dir>/bundles/<name>/current``.
        self.bundles = BundleStore(state_dir / "bundles", max_bytes=max_artifact_bytes)
        self._on_bundle = on_bundle
        self._report = report
        self._fetcher: Fetcher = fetcher if fetcher is not None else HttpFetcher()
        self._clock = clock
        state_dir.mkdir(parents=True, exist_ok=True)
        self._tuf = TufClient(
            state_dir / "tuf",
            trust_anchors,
            device_id=device_id,
            fetcher=self._fetcher,
            max_target_bytes=max_artifact_bytes,
        )
        self._journal = OtaJournal(state_dir / "journal.json")
        self._finished = FinishedJobs(state_dir / "finished-jobs.json")
        self._downloads = state_dir / "downloads"
        self._cancel_lock = threading.Lock()
        self._cancels: OrderedDict[str, str] = OrderedDict()
        entry = self._journal.load()
        self._last: OtaReport | None = _report_of(entry) if entry is not None else None

    # -- what is installed ----------------------------------------------------------------------------
    def installed_version(self) -> str:
        """The version in the running slot's image header (the slot, not the cloud, is the truth)."""
        return image_info(self.platform.slot_image(self.platform.booted_slot())).version

    def installed_sha256(self) -> str:
        return self._slot_sha256(self.platform.booted_slot())

    def _slot_sha256(self, slot: str) -> str:
        """Hash of a slot in bounded memory (a missing slot file hashes as empty)."""
        path = self.platform.slot_path(slot)
        return sha256_file(path) if path.exists() else sha256_file_empty()

    def last_report(self) -> OtaReport | None:
        """The journaled state of the current or last finished job (replay refusals are not kept)."""
        return self._last

    # -- entry points ---------------------------------------------------------------------------------
    def handle_job(
        self, job_id: str, rollout_id: str, manifest: bytes, signature: bytes, base_url: str
    ) -> None:
        """Run a new job from the cloud to REJECTED, FAILED, or a reboot (RebootRequested propagates).

        ``manifest`` and ``signature`` are the cloud's own release record; they are journaled for the
        record but trusted for nothing: what to install comes from the TUF repositories only.
        """
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
        if self._take_cancel(job_id) is not None:
            self.settle_cancel(job_id, rollout_id, "withdrawn by the cloud before it started")
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
        except UnavailableError as exc:
            # The metadata could not be fetched: nothing was decided, so nothing is journaled or reported
            # as final; the cloud offers the job again and it is verified then.
            log.warning("OTA job %s postponed, update metadata unreachable: %s", job_id, exc)
            return
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
        if entry.state in _PRE_REBOOT and entry.previous_slot:  # a bundle (no slot) has nothing to check
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

    # -- withdrawal -----------------------------------------------------------------------------------
    def cancel(self, job_id: str, reason: str) -> None:
        """The cloud withdrew ``job_id`` (called from any thread). The job running now stops before its
        next step, or within one downloaded chunk, if it has not committed to installing
        (:data:`~.states.CANCELABLE`): journaled CANCELED first, then its download is deleted. A job
        already installing finishes or rolls back and reports that. A job not started yet is settled by
        :meth:`settle_cancel` (or when it comes up in :meth:`handle_job`)."""
        with self._cancel_lock:
            self._cancels[job_id] = one_line(reason) or "withdrawn by the cloud"
            self._cancels.move_to_end(job_id)
            while len(self._cancels) > MAX_PENDING_CANCELS:
                self._cancels.popitem(last=False)

    def _take_cancel(self, job_id: str) -> str | None:
        with self._cancel_lock:
            return self._cancels.pop(job_id, None)

    def _cancel_pending(self, job_id: str) -> bool:
        with self._cancel_lock:
            return job_id in self._cancels

    def settle_cancel(self, job_id: str, rollout_id: str, reason: str = "") -> None:
        """On the OTA thread while no job runs: a withdrawn job this device held only as an offer is
        recorded CANCELED (so a later offer of it is refused) and reported; the journaled job, finished,
        is reported again as it ended (the cloud learns what became of it)."""
        why = self._take_cancel(job_id) or reason or "withdrawn by the cloud"
        current = self._journal.load()
        if current is not None and current.job_id == job_id:
            self._emit(current)
            return
        if self._finished.state_of(job_id) is None:
            log.info("OTA job %s withdrawn before it started: %s", job_id, why)
            self._finished.record(job_id, OtaState.CANCELED)
            self._report(OtaReport(job_id, rollout_id, OtaState.CANCELED, why, "", 0, 0, ""))

    def _withdrawn(self, entry: JournalEntry) -> bool:
        """Whether the running job was withdrawn and has now ended CANCELED; a withdrawal that comes
        too late (installing) is logged and dropped, and the job goes on."""
        if not self._cancel_pending(entry.job_id):
            return False
        reason = self._take_cancel(entry.job_id) or ""
        if entry.state not in CANCELABLE:
            log.info("OTA job %s: withdrawn in %s, too late to drop", entry.job_id, entry.state.value)
            return False
        log.info("OTA job %s withdrawn in %s: %s", entry.job_id, entry.state.value, reason)
        self._transition(entry, "cancel", reason)  # journaled, then the download is deleted
        return True

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
        """Verify the job; fill in what it will do. Raises (→ REJECTED) when it must not run.

        The plan TUF verified (image, full payload, delta from the running image) replaces the job's
        manifest in the journal, so every later state works from verified facts only.
        """
        manifest = self._tuf.decide(
            entry.base_url,
            job_id=entry.job_id,
            hardware_id=self.hardware_id,
            installed_sha256=self.installed_sha256(),
            delta_formats=self.delta_formats,
        )
        entry.manifest = manifest_to_bytes(manifest)
        entry.signature = b""
        entry.version = manifest.version
        if manifest.install == "swap":
            self._accept_bundle(entry, manifest)
            return
        installed = self.installed_version()
        new_key, old_key = version_key(manifest.version), version_key(installed)
        if new_key is None or old_key is None:
            raise ArtifactVerificationError(
                f"version {manifest.version} cannot be compared with installed {installed} (need 1.2.3 style)"
            )
        if new_key <= old_key and not (new_key < old_key and self._is_previous_image(manifest)):
            raise ArtifactVerificationError(
                f"version {manifest.version} is not newer than installed {installed}"
            )
        if manifest.target_size > self.max_artifact_bytes:
            raise ArtifactVerificationError(
                f"image of {manifest.target_size} bytes exceeds the device limit of {self.max_artifact_bytes}"
            )
        payload = manifest.payload_for(self.installed_sha256(), self.delta_formats)
        if payload.size > self.max_artifact_bytes:
            raise ArtifactVerificationError(
                f"payload of {payload.size} bytes exceeds this device's limit of {self.max_artifact_bytes}"
            )
        entry.previous_slot = self.platform.booted_slot()
        entry.target_slot = self.platform.other_slot()
        entry.payload_kind = payload.kind
        entry.bytes_total = payload.size

    def _is_previous_image(self, manifest: ReleaseManifest) -> bool:
        """Whether the job takes the device back to exactly the image it ran before, still in its other
        slot: a release manager's (or the rollout controller's) roll-back of a bad release.

        Anti-rollback still holds for everything else: an older version is refused unless its signed
        hash (both repositories agreed on it) is that of the other slot's bytes, so the device never
        goes further back than the one step its own A/B history allows."""
        other = self.platform.other_slot()
        path = self.platform.slot_path(other)
        if not path.is_file() or path.stat().st_size != manifest.target_size:
            return False
        return self._slot_sha256(other) == manifest.target_sha256

    def _accept_bundle(self, entry: JournalEntry, manifest: ReleaseManifest) -> None:
        """A bundle (no reboot): newer than the installed version of the same bundle, within limits.

        Bundles travel as full payloads: the director chooses deltas by the firmware the device reports.
        """
        info = self.bundles.installed(manifest.name)
        if info is not None:
            installed = str(info.get("version", ""))
            new_key, old_key = version_key(manifest.version), version_key(installed)
            if new_key is None or old_key is None or new_key <= old_key:
                raise ArtifactVerificationError(
                    f"bundle {manifest.name} {manifest.version} is not newer than installed {installed}"
                )
        if manifest.target_size > self.max_artifact_bytes:
            raise ArtifactVerificationError(
                f"bundle of {manifest.target_size} bytes exceeds the limit of {self.max_artifact_bytes}"
            )
        payload = next(p for p in manifest.payloads if p.kind == "full")
        entry.previous_slot = entry.target_slot = ""
        entry.payload_kind = payload.kind
        entry.bytes_total = payload.size

    @staticmethod
    def _is_bundle(entry: JournalEntry) -> bool:
        return manifest_from_bytes(entry.manifest).install == "swap"

    def _payload(self, entry: JournalEntry, manifest: ReleaseManifest) -> PayloadRef:
        """The payload chosen at acceptance (same kind; a delta still from the running image)."""
        if entry.payload_kind == "delta":
            installed = self._slot_sha256(entry.previous_slot)
            chosen = manifest.payload_for(installed, self.delta_formats)
            if chosen.kind == "delta":
                return chosen
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
            if self._withdrawn(entry):
                return
            try:
                self._step(entry, extra_health)
            except _Withdrawn:
                continue  # the loop's check cancels it
            except FleetloopError as exc:
                self._fail(entry, str(exc))
            except OSError as exc:
                self._fail(entry, f"I/O error in {entry.state.value}: {exc}")

    def _step(self, entry: JournalEntry, extra_health: Callable[[], list[str]]) -> None:
        """Do what the entry's state asks for next (each step ends in a transition, or fails)."""
        steps: dict[OtaState, Callable[[JournalEntry], None]] = {
            OtaState.QUEUED: lambda e: self._transition(e, "start"),
            OtaState.DOWNLOADING: self._download,
            OtaState.DOWNLOADED: self._verify,
            OtaState.VERIFIED: self._start_install,
            OtaState.INSTALLING: self._install,
            OtaState.REBOOTING: self._after_reboot,
            OtaState.HEALTH_CHECK: lambda e: self._health_check(e, extra_health),
        }
        step = steps.get(entry.state)
        if step is None:  # pragma: no cover - every non-terminal state has a step
            raise StateError(f"no step for state {entry.state.value}")
        step(entry)

    def _start_install(self, entry: JournalEntry) -> None:
        if not self._is_bundle(entry):
            self._check_slots(entry)
        self._transition(entry, "install")

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

        step = max(payload.size // 10, 1)
        last_told = [entry.bytes_downloaded // step]

        def progress(done: int) -> None:
            # Every further 10 %, tell the cloud how far the download is (a report, not a journal write:
            # after a cut the partial file itself says where to resume).
            entry.bytes_downloaded = done
            if self._cancel_pending(entry.job_id):
                raise _Withdrawn(entry.job_id)
            if done // step > last_told[0] and done < payload.size:
                last_told[0] = done // step
                self._emit(entry)

        for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
            try:
                download(
                    self._fetcher,
                    url,
                    dest,
                    expected_size=payload.size,
                    expected_sha256=payload.sha256,
                    progress=progress,
                    max_bytes_per_s=self.download_rate_limit,
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
        """Stream the image into the inactive slot (bounded memory), then prove the slot holds it."""
        manifest = manifest_from_bytes(entry.manifest)
        payload = self._payload(entry, manifest)
        source = self._payload_file(payload)
        actual = sha256_file(source)
        if actual != payload.sha256:
            raise ArtifactVerificationError(f"payload hash mismatch: expected {payload.sha256}, got {actual}")
        if manifest.install == "swap":
            self._install_bundle(entry, manifest, source)
            return
        self._check_slots(entry)
        digest = hashlib.sha256()
        limit = min(self.max_artifact_bytes, manifest.target_size)
        with self.platform.open_slot_writer(entry.target_slot) as out:

            def write(data: bytes) -> None:
                digest.update(data)
                out.write(data)

            if payload.kind == "delta":
                old_path = self.platform.slot_path(entry.previous_slot)
                with old_path.open("rb") as old, source.open("rb") as patch:
                    apply_delta_stream(
                        old,
                        old_path.stat().st_size,
                        patch,
                        write,
                        max_size=limit,
                        formats=self.delta_formats,
                    )
            else:
                with source.open("rb") as f:
                    while chunk := f.read(1 << 20):
                        write(chunk)
        built = digest.hexdigest()
        if built != manifest.target_sha256:
            raise ArtifactVerificationError(
                f"image built from the {payload.kind} payload does not match the release: "
                f"expected {manifest.target_sha256}, got {built}"
            )
        written = self._slot_sha256(entry.target_slot)
        if written != manifest.target_sha256:
            raise ArtifactVerificationError(
                f"slot {entry.target_slot} reads back wrong: expected {manifest.target_sha256}, got {written}"
            )
        self._transition(entry, "installed")  # REBOOTING is on disk before the boot env changes
        self._switch_and_reboot(entry)

    def _install_bundle(self, entry: JournalEntry, manifest: ReleaseManifest, source: Path) -> None:
        """Unpack beside the running version, switch ``current`` atomically, commit: no reboot."""
        if sha256_file(source) != manifest.target_sha256:
            raise ArtifactVerificationError(
                f"bundle does not match the release hash {manifest.target_sha256}"
            )
        current = self.bundles.install(manifest.name, manifest.version, source, manifest.target_sha256)
        log.info("OTA job %s: bundle %s %s is current", entry.job_id, manifest.name, manifest.version)
        self._transition(entry, "swapped", "")
        if self._on_bundle is not None:
            try:
                self._on_bundle(manifest.name, current)
            except Exception:  # a reader failing to reload must not undo a committed install
                log.exception(
                    "OTA job %s: bundle %s installed, but its reader failed to reload",
                    entry.job_id,
                    manifest.name,
                )

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
            written = self._slot_sha256(entry.target_slot)
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


def sha256_file_empty() -> str:
    return hashlib.sha256(b"").hexdigest()
