"""``fleetloop sim ota-chaos``: power cuts at random points across many OTA updates; counts bricks.

Each run provisions a fresh simulated device with the old image and lets the real agent OTA code
(``OtaDriver`` with the real TUF client, real HTTP downloads, the simulator's bootloader on real slot and
env files) update it to the new image, while a :class:`Cutter` cuts the power at a random point: after any
journaled state, in the middle of a journal write (a torn temp file is left behind), in the middle of a
metadata or payload download, in the middle of the slot write (half the bytes land), or just before or
after the boot environment changes. After a cut the device "reboots": the bootloader picks a slot, a new
driver resumes from the journal (or, when the cut came before the job was journaled, the cloud offers the
job again). Another cut may strike during recovery. Half of the runs get a build whose health check fails,
so both outcomes — new image committed, old image after rollback — are exercised.

A run is **bricked** when the bootloader finds no bootable slot or boots a slot whose bytes are not a
released image. The result: ``{"runs", "bricked", "ended_old", "ended_new", "resumed", ...}``.

The cloud half (image repository, director, artifact server) is passed in through :class:`ChaosCloud`:
the simulator never imports the cloud package.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from fleetloop_agent.ota.download import HttpFetcher
from fleetloop_agent.ota.driver import OtaDriver, OtaReport
from fleetloop_agent.ota.journal import JournalEntry, OtaJournal
from fleetloop_agent.ota.platform import EnvFilePlatform, RebootRequested
from fleetloop_agent.ota.states import TERMINAL
from fleetloop_fwsim.bootloader import boot, paths, provision, slot_paths
from fleetloop_shared.errors import FleetloopError, UserError

#: Boots allowed per run before it counts as stuck (a stuck run is reported, and counted as bricked).
MAX_BOOTS = 40
#: Probability that the power is cut again during the recovery from a cut.
RECUT_PROBABILITY = 0.4


class PowerCut(BaseException):
    """The lights go out: nothing after this point runs (a BaseException, so no handler swallows it)."""


class ChaosCloud(Protocol):
    """What the campaign needs from the cloud: the images, the trust roots, and jobs for a device."""

    base_url: str
    old_image: bytes
    new_image: bytes
    hardware_id: str
    #: The delta formats the simulated devices apply (what their agent's ``ota.delta_formats`` says).
    delta_formats: tuple[str, ...]

    def anchors(self) -> list[bytes]: ...

    def offer(self, device_id: str, job_id: str, installed_sha256: str) -> None: ...


class Cutter:
    """Counts the points where power could be lost and cuts at the armed one (counted from the last
    :meth:`arm`); ``points`` logs every point passed, for tests that cut at each of them in turn."""

    def __init__(self, at: int | None = None) -> None:
        self.armed: int | None = at
        self.count = 0
        self.hit: dict[str, int] = {}
        self.points: list[str] = []

    def arm(self, at: int | None) -> None:
        self.armed, self.count = at, 0

    def point(self, name: str) -> None:
        self.count += 1
        self.points.append(name)
        if self.armed is not None and self.count == self.armed:
            self.armed = None
            self.hit[name] = self.hit.get(name, 0) + 1
            raise PowerCut(name)


class CuttingPlatform(EnvFilePlatform):
    """The simulated device's slots and boot environment, with a power-cut point before and after each
    boot-environment change and in slot writes (a cut there leaves half the buffer on the flash).
    ``every_write=False`` makes only the first write of each slot image a point (fewer points for tests
    that cut at each one in turn)."""

    def __init__(self, cutter: Cutter, device_dir: Path, *, every_write: bool = True) -> None:
        p = paths(device_dir)
        super().__init__(slot_paths(device_dir), p["env"], p["booted_slot"])
        self.cutter = cutter
        self.every_write = every_write

    @contextlib.contextmanager
    def open_slot_writer(self, slot: str) -> Iterator[BinaryIO]:
        cutter, every_write = self.cutter, self.every_write
        with super().open_slot_writer(slot) as f:

            class Torn:
                written = 0

                def write(self, data: bytes) -> int:
                    if every_write or self.written == 0:
                        try:
                            cutter.point("mid slot write")
                        except PowerCut:
                            f.write(data[: len(data) // 2])  # the half that made it to the flash
                            f.flush()
                            raise
                    self.written += len(data)
                    return f.write(data)

            yield Torn()  # type: ignore[misc]

    def set_next_boot(self, slot: str) -> None:
        self.cutter.point("before set_next_boot")
        super().set_next_boot(slot)
        self.cutter.point("after set_next_boot")

    def commit(self) -> None:
        self.cutter.point("before commit")
        super().commit()
        self.cutter.point("after commit")


class CuttingFetcher(HttpFetcher):
    """The device's HTTP fetcher with a power-cut point after the first chunk of each download (of
    payloads only, with ``metadata=False``)."""

    def __init__(self, cutter: Cutter, *, chunk_size: int = 16 * 1024, metadata: bool = True) -> None:
        super().__init__(chunk_size=chunk_size, timeout_s=10)
        self.cutter = cutter
        self.metadata = metadata

    def fetch_range(self, url: str, start: int, max_bytes: int) -> Iterator[bytes]:
        kind = "payload" if "/files/" in url else "metadata"
        for i, chunk in enumerate(super().fetch_range(url, start, max_bytes)):
            yield chunk
            if i == 0 and (self.metadata or kind == "payload"):
                self.cutter.point(f"mid {kind} download")


class _CuttingJournal(OtaJournal):
    def __init__(self, path: Path, cutter: Cutter) -> None:
        super().__init__(path)
        self.cutter = cutter

    def save(self, entry: JournalEntry) -> None:
        try:
            self.cutter.point("mid journal write")
        except PowerCut:
            torn = self.path.with_name(f".{self.path.name}.chaos.tmp")
            data = entry.to_json()
            torn.write_bytes(data[: len(data) // 2])  # a temp file the rename never published
            raise
        super().save(entry)


@dataclass
class ChaosResult:
    runs: int = 0
    bricked: int = 0
    ended_old: int = 0
    ended_new: int = 0
    resumed: int = 0
    power_cuts: int = 0
    boots: int = 0
    final_states: dict[str, int] = field(default_factory=dict)
    cut_points: dict[str, int] = field(default_factory=dict)
    bricks: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "bricked": self.bricked,
            "ended_old": self.ended_old,
            "ended_new": self.ended_new,
            "resumed": self.resumed,
            "power_cuts": self.power_cuts,
            "boots": self.boots,
            "final_states": dict(sorted(self.final_states.items())),
            "cut_points": dict(sorted(self.cut_points.items())),
            "bricks": self.bricks[:10],
            "seconds": round(self.seconds, 2),
        }


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run_ota_chaos(
    cloud: ChaosCloud,
    workdir: Path,
    *,
    runs: int,
    seed: int = 0,
    progress: Callable[[int, ChaosResult], None] | None = None,
) -> ChaosResult:
    """``runs`` updates old → new with random power cuts; see the module docstring."""
    if runs < 1:
        raise UserError(f"--runs must be at least 1, got {runs}")
    rng = random.Random(seed)
    result = ChaosResult()
    started = time.monotonic()
    released = {_sha(cloud.old_image): "old", _sha(cloud.new_image): "new"}
    for i in range(runs):
        _one_run(cloud, workdir / f"run-{i:04d}", f"chaos-{seed}-{i}", rng, released, result)
        result.runs += 1
        if progress is not None:
            progress(i + 1, result)
    result.seconds = time.monotonic() - started
    return result


def _one_run(
    cloud: ChaosCloud,
    root: Path,
    job_id: str,
    rng: random.Random,
    released: dict[str, str],
    result: ChaosResult,
) -> None:
    device_dir, state_dir = root / "device", root / "agent"
    device_id = root.name
    provision(device_dir, cloud.old_image, bootlimit=2)
    boot(device_dir)
    healthy = rng.random() < 0.5
    cutter = Cutter()
    anchors = cloud.anchors()
    reports: list[OtaReport] = []

    def health() -> list[str]:
        return [] if healthy else ["chaos: the new build's service does not start"]

    def report(r: OtaReport) -> None:
        reports.append(r)
        cutter.point(f"after journaling {r.state.value}")

    def driver() -> OtaDriver:
        d = OtaDriver(
            CuttingPlatform(cutter, device_dir),
            state_dir,
            trust_anchors=anchors,
            hardware_id=cloud.hardware_id,
            device_id=device_id,
            report=report,
            fetcher=CuttingFetcher(cutter),
            delta_formats=cloud.delta_formats,
        )
        # the journal is where a cut can tear a write; the driver owns it, so swap it in here
        d._journal = _CuttingJournal(state_dir / "journal.json", cutter)
        return d

    def journal() -> JournalEntry | None:
        return OtaJournal(state_dir / "journal.json").load()

    cloud.offer(device_id, job_id, _sha(cloud.old_image))
    cutter.arm(rng.randint(1, 24))
    cut = False
    try:
        driver().handle_job(job_id, "chaos", b"", b"", cloud.base_url)
    except PowerCut:
        cut = True
        result.power_cuts += 1
    except RebootRequested:
        pass
    resumed_run = False
    for _ in range(MAX_BOOTS):
        try:
            booted = boot(device_dir)
        except FleetloopError as exc:
            result.bricked += 1
            result.bricks.append(f"{device_id}: {exc}")
            return
        result.boots += 1
        image = slot_paths(device_dir)[booted.slot].read_bytes()
        if _sha(image) not in released:
            result.bricked += 1
            result.bricks.append(f"{device_id}: booted slot {booted.slot} holds no released image")
            return
        cutter.arm(rng.randint(1, 12) if cut and rng.random() < RECUT_PROBABILITY else None)
        entry = journal()
        try:
            if entry is None:
                driver().handle_job(job_id, "chaos", b"", b"", cloud.base_url)  # the cloud offers it again
            else:
                if entry.state not in TERMINAL and cut:
                    resumed_run = True
                driver().resume_after_boot(health)
        except PowerCut:
            cut = True
            result.power_cuts += 1
            continue
        except RebootRequested:
            continue
        entry = journal()
        if entry is not None and entry.state in TERMINAL:
            break
    else:
        result.bricked += 1
        result.bricks.append(f"{device_id}: never settled")
        return
    final = boot(device_dir)
    result.boots += 1
    outcome = released.get(_sha(slot_paths(device_dir)[final.slot].read_bytes()))
    if outcome is None:
        result.bricked += 1
        result.bricks.append(f"{device_id}: settled on an unreleased image")
        return
    if outcome == "new":
        result.ended_new += 1
    else:
        result.ended_old += 1
    if resumed_run:
        result.resumed += 1
    state = entry.state.value if entry is not None else "NONE"
    result.final_states[state] = result.final_states.get(state, 0) + 1
    for name, n in cutter.hit.items():
        result.cut_points[name] = result.cut_points.get(name, 0) + n
