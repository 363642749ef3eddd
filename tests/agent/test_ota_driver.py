"""The OTA driver end to end: real images, real HTTP, the simulator's bootloader on real files.

Every test provisions a simulated device directory (slot files + u-boot-style env), points an
``EnvFilePlatform`` at it, serves artifacts from a local HTTP server with Range support, and "reboots"
by catching ``RebootRequested``, running the bootloader and starting a fresh driver from the journal.
"""

from __future__ import annotations

import contextlib
import http.server
import logging
import os
import re
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root, TargetFile

from fleetloop_agent.ota.driver import OtaDriver, OtaReport
from fleetloop_agent.ota.journal import JournalEntry, OtaJournal
from fleetloop_agent.ota.platform import EnvFilePlatform, RebootRequested, read_boot_env
from fleetloop_agent.ota.states import OtaState
from fleetloop_cloud.ota.artifact_store import ArtifactStore, ReleaseInput, check_not_older_than_fleet
from fleetloop_cloud.ota.director import Director
from fleetloop_cloud.ota.tuf_repository import TufRepositories, target_file
from fleetloop_cloud.storage import LocalObjectStore
from fleetloop_fwsim.bootloader import BootResult, boot, paths, provision, slot_paths
from fleetloop_fwsim.firmware import build_image
from fleetloop_fwsim.ota_chaos import Cutter, CuttingFetcher, CuttingPlatform, PowerCut
from fleetloop_shared.errors import FleetloopError, IntegrityError, StateError, UserError
from fleetloop_shared.update.artifact import ReleaseManifest, ReleaseSigner, manifest_from_bytes, sha256_hex
from fleetloop_shared.update.delta import FLDELTA2, FORMATS, make_delta
from fleetloop_shared.update.tuf_metadata import (
    delta_facts,
    delta_target_path,
    image_facts,
    image_target_path,
)
from tests.fixtures.http_range import send_head
from tests.fixtures.tar_bundle import ustar

S = OtaState
HW = "simdev-gen2"
NAME = "simdev-firmware"
NOW = 1_750_000_000.0
IMAGE_SIZE = 512 * 1024
REPO = Path(__file__).resolve().parents[2]
DEVICE = "dev-1"


@dataclass(frozen=True)
class Release:
    v1: bytes
    v2: bytes
    v3: bytes


@pytest.fixture(scope="module")
def release() -> Release:
    v1 = build_image("1.0.0", HW, size_hint=IMAGE_SIZE)
    v2 = build_image("2.0.0", HW, size_hint=IMAGE_SIZE)
    v3 = build_image("3.0.0", HW, size_hint=IMAGE_SIZE)
    return Release(v1, v2, v3)


class Cloud:
    """The real cloud half of OTA: artifact store, TUF image repository, director, served over HTTP.

    ``overrides`` replaces what a URL path serves (a tampering mirror); ``requests`` records paths.
    """

    def __init__(self, root: Path, clock: Callable[[], float] = time.time) -> None:
        self.root = root
        objects = LocalObjectStore(root / "artifacts")
        self.tuf = TufRepositories(objects, root / "keys" / "tuf", clock=clock)
        self.store = ArtifactStore(objects, ReleaseSigner.generate(), tuf=self.tuf)
        self.director = Director(self.tuf)
        self.overrides: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.releases: dict[str, ReleaseManifest] = {}
        cloud = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                cloud.requests.append(self.path)
                try:
                    body = cloud._body(self.path)
                except FleetloopError:
                    self.send_error(404)
                    return
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                start = int(match.group(1)) if match else None
                send_head(self, len(body), start)
                self.wfile.write(body[start or 0 :])

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def _body(self, path: str) -> bytes:
        if path in self.overrides:
            return self.overrides[path]
        if path.startswith("/files/"):
            return self.store.file(path[1:]).data()
        m = re.fullmatch(r"/tuf/(image|director/[^/]+)/([^/]+)", path)
        if m is None:
            raise StateError("no such path")
        return self.tuf.metadata_bytes(m.group(1), m.group(2))

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def anchors(self) -> list[bytes]:
        keys = self.root / "keys"
        return [(keys / "image-root.json").read_bytes(), (keys / "director-root.json").read_bytes()]

    def publish(self, image: bytes, version: str, bases: list[bytes]) -> ReleaseManifest:
        for b in bases:
            self.store.add_image(b)
        m, _ = self.store.add_release(
            ReleaseInput(image, name=NAME, version=version, hardware_id=HW, bases=bases, now=NOW)
        )
        self.releases[version] = manifest_from_bytes(m)
        return self.releases[version]

    def job(self, job_id: str, version: str, installed: bytes, device_id: str = DEVICE) -> tuple[str, ...]:
        """Direct ``device_id`` to ``version`` for ``job_id``; the handle_job arguments."""
        self.director.assign(
            device_id,
            job_id=job_id,
            rollout_id="r",
            release=self.releases[version],
            installed_sha256=sha256_hex(installed),
            delta_formats=FORMATS,
        )
        return (job_id, "r", b"", b"", self.base_url)

    def delta(self, version: str) -> bytes:
        p = next(p for p in self.releases[version].payloads if p.kind == "delta")
        return self.store.file(p.path).data()


def make_cloud(root: Path, release: Release) -> Cloud:
    cloud = Cloud(root)
    cloud.publish(release.v2, "2.0.0", [release.v1])
    cloud.publish(release.v3, "3.0.0", [release.v1])
    return cloud


@pytest.fixture(scope="module")
def server(release: Release, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    cloud = make_cloud(tmp_path_factory.mktemp("cloud"), release)
    yield cloud
    cloud.close()


class Device:
    """A provisioned simulated device plus the agent-side objects pointed at its files."""

    def __init__(
        self,
        root: Path,
        image: bytes,
        cloud: Cloud,
        health_commands: list[list[str]] | None = None,
        device_id: str = DEVICE,
    ):
        self.dir = root / "device"
        self.state_dir = root / "agent-state"
        self.cloud = cloud
        self.device_id = device_id
        self.anchors = cloud.anchors()
        self.health_commands = health_commands or []
        self.reports: list[OtaReport] = []
        provision(self.dir, image, bootlimit=2)
        boot(self.dir)

    def platform(self) -> EnvFilePlatform:
        p = paths(self.dir)
        return EnvFilePlatform(slot_paths(self.dir), p["env"], p["booted_slot"], self.health_commands)

    def driver(self, platform: EnvFilePlatform | None = None, **kw: object) -> OtaDriver:
        return OtaDriver(
            platform or self.platform(),
            self.state_dir,
            trust_anchors=self.anchors,
            hardware_id=HW,
            device_id=self.device_id,
            report=kw.pop("report", self.reports.append),  # type: ignore[arg-type]
            clock=lambda: NOW,
            **kw,  # type: ignore[arg-type]
        )

    def job(self, job_id: str, version: str = "2.0.0") -> tuple[str, ...]:
        return self.cloud.job(job_id, version, self.slot(boot_slot(self)), self.device_id)

    def states(self) -> list[OtaState]:
        return [r.state for r in self.reports]

    def slot(self, name: str) -> bytes:
        return slot_paths(self.dir)[name].read_bytes()

    def env(self) -> dict[str, str]:
        return read_boot_env(paths(self.dir)["env"])

    def journal(self) -> JournalEntry | None:
        return OtaJournal(self.state_dir / "journal.json").load()


def boot_slot(dev: Device) -> str:
    return paths(dev.dir)["booted_slot"].read_text().strip()


def _no_failures() -> list[str]:
    return []


def test_delta_update_reboots_health_checks_and_commits(
    tmp_path: Path, release: Release, server: Cloud
) -> None:
    dev = Device(tmp_path, release.v1, server)
    delta = server.delta("2.0.0")
    driver = dev.driver()
    assert driver.installed_version() == "1.0.0" and driver.last_report() is None
    job = dev.job("job-1")
    with pytest.raises(RebootRequested):
        driver.handle_job(*job)  # type: ignore[arg-type]
    assert dev.states() == [S.QUEUED, S.DOWNLOADING, S.DOWNLOADED, S.VERIFIED, S.INSTALLING, S.REBOOTING]
    last = dev.reports[-1]
    assert (last.payload_kind, last.bytes_downloaded, last.bytes_total) == ("delta", len(delta), len(delta))
    assert last.version == "2.0.0" and last.rollout_id == "r"
    assert len(delta) < 0.1 * len(release.v2)
    assert dev.slot("b") == release.v2 and dev.slot("a") == release.v1
    env = dev.env()
    assert (env["boot_slot"], env["upgrade_available"], env["bootcount"]) == ("b", "1", "0")

    assert boot(dev.dir) == BootResult("b", False)
    after = dev.driver()
    assert after.last_report() is not None and after.last_report().state is S.REBOOTING  # type: ignore[union-attr]
    after.resume_after_boot(_no_failures)
    assert dev.states()[6:] == [S.HEALTH_CHECK, S.COMMITTED]
    assert after.installed_version() == "2.0.0" and after.installed_sha256() == sha256_hex(release.v2)
    env = dev.env()
    assert (env["boot_slot"], env["upgrade_available"], env["bootcount"]) == ("b", "0", "0")
    assert boot(dev.dir) == BootResult("b", False)  # committed: no more counting, no fallback
    assert dev.env()["bootcount"] == "0"
    assert not any((dev.state_dir / "downloads").iterdir())
    assert after.last_report() == dev.reports[-1]

    # the same job again (a replay) is refused and the record of how it ended stays
    after.handle_job(*job)  # type: ignore[arg-type]
    assert dev.reports[-1].state is S.REJECTED and "already finished as COMMITTED" in dev.reports[-1].reason
    assert after.last_report() is not None and after.last_report().state is S.COMMITTED  # type: ignore[union-attr]
    # the same release under a new job id is not newer than what runs
    after.handle_job(*dev.job("job-2"))  # type: ignore[arg-type]
    assert dev.reports[-1].state is S.REJECTED
    assert dev.reports[-1].reason == "version 2.0.0 is not newer than installed 2.0.0"
    # after the next start, the last terminal state is told once more
    n = len(dev.reports)
    dev.driver().resume_after_boot(_no_failures)
    assert [r.state for r in dev.reports[n:]] == [S.REJECTED]
    assert dev.reports[-1].job_id == "job-2"


def test_unknown_base_gets_the_full_image(tmp_path: Path, release: Release, server: Cloud) -> None:
    other_v1 = build_image("1.0.0", HW, size_hint=IMAGE_SIZE, variant=5)
    assert other_v1 != release.v1
    dev = Device(tmp_path, other_v1, server)
    # the director is told the device runs the usual v1 (stale inventory): the device still takes the full
    job = server.job("job-full", "2.0.0", release.v1)
    with pytest.raises(RebootRequested):
        dev.driver().handle_job(*job)  # type: ignore[arg-type]
    assert dev.reports[-1].payload_kind == "full" and dev.reports[-1].bytes_total == len(release.v2)
    told = [r.bytes_downloaded for r in dev.reports if r.state is S.DOWNLOADING]
    assert len(told) >= 4 and told == sorted(told) and 0 < told[-1] < len(release.v2)  # progress reports
    boot(dev.dir)
    dev.driver().resume_after_boot(_no_failures)
    assert dev.reports[-1].state is S.COMMITTED and dev.slot("b") == release.v2


def test_failing_health_check_reboots_until_the_bootloader_falls_back(
    tmp_path: Path, release: Release, server: Cloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(str(REPO / d) for d in ("shared", "agent", "firmware-sim"))
    )
    selftest = [sys.executable, "-m", "fleetloop_fwsim.selftest", "--device-dir", str(tmp_path / "device")]
    dev = Device(tmp_path, release.v1, server, health_commands=[selftest])
    (dev.dir / "faults.json").write_text('{"health_fail_versions": ["2.0.0"]}')
    with pytest.raises(RebootRequested):
        dev.driver().handle_job(*dev.job("job-bad"))  # type: ignore[arg-type]

    for attempt in (1, 2):
        assert boot(dev.dir) == BootResult("b", False)
        assert dev.env()["bootcount"] == str(attempt)
        with pytest.raises(RebootRequested):
            dev.driver().resume_after_boot(_no_failures)
        assert dev.reports[-1].state is S.REBOOTING
        assert "fleetloop_fwsim.selftest exited 1" in dev.reports[-1].reason
        assert "2.0.0 in slot b does not work on this device" in dev.reports[-1].reason

    assert boot(dev.dir) == BootResult("a", True)
    driver = dev.driver()
    driver.resume_after_boot(_no_failures)
    last = dev.reports[-1]
    assert last.state is S.ROLLED_BACK
    assert last.reason.startswith(
        "booted slot a after 2 tries: health check fleetloop_fwsim.selftest exited 1"
    )
    assert "\n" not in last.reason
    assert driver.installed_version() == "1.0.0"
    env = dev.env()
    assert (env["boot_slot"], env["upgrade_available"], env["bootcount"]) == ("a", "0", "0")
    assert boot(dev.dir) == BootResult("a", False)


def test_agent_health_failures_and_crashing_checks_count_as_unhealthy(
    tmp_path: Path, release: Release, server: Cloud
) -> None:
    dev = Device(tmp_path, release.v1, server)
    with pytest.raises(RebootRequested):
        dev.driver().handle_job(*dev.job("job-x"))  # type: ignore[arg-type]
    boot(dev.dir)
    with pytest.raises(RebootRequested):
        dev.driver().resume_after_boot(lambda: ["cloud unreachable at grpc://x: timeout"])
    assert dev.reports[-1].reason == "cloud unreachable at grpc://x: timeout"

    def crash() -> list[str]:
        raise RuntimeError("sensor bus gone")

    boot(dev.dir)
    with pytest.raises(RebootRequested):
        dev.driver().resume_after_boot(crash)
    assert dev.reports[-1].reason == "agent health check raised RuntimeError: sensor bus gone"
    boot(dev.dir)
    dev.driver().resume_after_boot(_no_failures)
    assert dev.reports[-1].state is S.ROLLED_BACK
    assert dev.reports[-1].reason.endswith("sensor bus gone")


def test_tampered_payload_fails_and_leaves_the_slots_alone(
    tmp_path: Path, release: Release, release_cloud: Cloud
) -> None:
    cloud = release_cloud
    delta_ref = next(p for p in cloud.releases["2.0.0"].payloads if p.kind == "delta")
    tampered = bytearray(cloud.delta("2.0.0"))
    tampered[len(tampered) // 2] ^= 0xFF
    cloud.overrides["/" + delta_ref.path] = bytes(tampered)
    dev = Device(tmp_path, release.v1, cloud)
    env_before = dev.env()
    dev.driver().handle_job(*dev.job("job-t"))  # type: ignore[arg-type]
    last = dev.reports[-1]
    assert last.state is S.FAILED
    assert last.reason.startswith(f"payload hash mismatch: expected {delta_ref.sha256}, got ")
    assert dev.slot("b") == b"" and dev.slot("a") == release.v1 and dev.env() == env_before
    assert not any((dev.state_dir / "downloads").iterdir())
    assert boot(dev.dir) == BootResult("a", False)


def test_missing_artifact_fails_with_a_reason(tmp_path: Path, release: Release, release_cloud: Cloud) -> None:
    cloud = release_cloud
    delta_ref = next(p for p in cloud.releases["2.0.0"].payloads if p.kind == "delta")
    (cloud.root / "artifacts" / delta_ref.path).unlink()
    dev = Device(tmp_path, release.v1, cloud)
    dev.driver().handle_job(*dev.job("job-404"))  # type: ignore[arg-type]
    assert dev.reports[-1].state is S.FAILED and "artifact not found" in dev.reports[-1].reason


@pytest.fixture
def release_cloud(tmp_path: Path, release: Release) -> Iterator[Cloud]:
    """A cloud of its own, for tests that damage it."""
    cloud = make_cloud(tmp_path / "cloud", release)
    yield cloud
    cloud.close()


def _simulate(
    root: Path, release: Release, server: Cloud, cut_at: int | None, health: Callable[[], list[str]]
) -> tuple[Device, Cutter]:
    dev = Device(root, release.v1, server)
    cutter = Cutter(cut_at)
    released = {sha256_hex(release.v1), sha256_hex(release.v2)}

    def report(r: OtaReport) -> None:
        dev.reports.append(r)
        cutter.point(f"journaled {r.state.value}")

    def driver() -> OtaDriver:
        return dev.driver(
            CuttingPlatform(cutter, dev.dir, every_write=False),
            report=report,
            fetcher=CuttingFetcher(cutter, chunk_size=4096, metadata=False),
        )

    job = dev.job("job-pc")
    with contextlib.suppress(RebootRequested, PowerCut):
        driver().handle_job(*job)  # type: ignore[arg-type]
    for _ in range(12):
        booted = boot(dev.dir)
        assert sha256_hex(dev.slot(booted.slot)) in released, (
            f"booted a slot no release has ({cutter.points})"
        )
        try:
            driver().resume_after_boot(health)
        except (RebootRequested, PowerCut):
            continue
        break
    else:
        pytest.fail(f"the update never settled: {cutter.points}")
    return dev, cutter


@pytest.mark.parametrize("healthy", [True, False], ids=["healthy", "unhealthy"])
def test_power_cut_at_any_point_resumes_or_rolls_back(
    tmp_path: Path, release: Release, server: Cloud, healthy: bool
) -> None:
    def health() -> list[str]:
        return [] if healthy else ["app does not start on this build"]

    _, dry = _simulate(tmp_path / "dry", release, server, None, health)
    assert {"mid payload download", "mid slot write", "after commit"} <= set(dry.points)
    expected_state, expected_image = (S.COMMITTED, release.v2) if healthy else (S.ROLLED_BACK, release.v1)
    for k in range(1, len(dry.points) + 1):
        dev, cutter = _simulate(tmp_path / f"cut{k}", release, server, k, health)
        where = f"cut at {k}: {cutter.points[k - 1]}"
        entry = dev.journal()
        assert entry is not None and entry.state is expected_state, where
        result = boot(dev.dir)
        assert dev.slot(result.slot) == expected_image, where
        assert dev.env()["upgrade_available"] == "0", where
        assert boot(dev.dir).slot == result.slot, where  # and it stays there


def test_a_commit_hidden_by_a_power_cut_is_not_undone_by_a_later_flaky_check(
    tmp_path: Path, release: Release, server: Cloud
) -> None:
    calls: list[int] = []

    def flaky() -> list[str]:
        calls.append(1)
        return [] if len(calls) == 1 else ["flaky check failed this time"]

    _, dry = _simulate(tmp_path / "dry", release, server, None, lambda: [])
    calls.clear()
    cut = dry.points.index("after commit") + 1  # committed in the boot env, not yet in the journal
    dev, _ = _simulate(tmp_path / "cut", release, server, cut, flaky)
    entry = dev.journal()
    assert entry is not None and entry.state is S.COMMITTED
    assert boot(dev.dir).slot == "b" and dev.slot("b") == release.v2


def test_a_second_job_waits_for_the_first_and_a_repeat_offer_is_answered(
    tmp_path: Path, release: Release, server: Cloud
) -> None:
    dev = Device(tmp_path, release.v1, server)
    cutter = Cutter(1)  # the first point is mid payload download
    delta = server.delta("2.0.0")
    job1 = dev.job("job-1")
    with pytest.raises(PowerCut):
        fetcher = CuttingFetcher(cutter, chunk_size=4096, metadata=False)
        dev.driver(fetcher=fetcher).handle_job(*job1)  # type: ignore[arg-type]
    assert 0 < (dev.state_dir / "downloads" / f"{sha256_hex(delta)}.delta").stat().st_size < len(delta)
    boot(dev.dir)
    driver = dev.driver()
    driver.handle_job("job-2", "r", b"", b"", server.base_url)
    assert (
        dev.reports[-1].state is S.REJECTED
        and "(job job-1) is in progress (DOWNLOADING)" in dev.reports[-1].reason
    )
    driver.handle_job(*job1)  # type: ignore[arg-type]
    again = dev.reports[-1]
    assert again.state is S.DOWNLOADING and again.job_id == "job-1"
    with pytest.raises(RebootRequested):
        driver.resume_after_boot(_no_failures)
    assert dev.slot("b") == release.v2


def test_corrupt_journal_is_ignored_with_a_warning(
    tmp_path: Path, release: Release, server: Cloud, caplog: pytest.LogCaptureFixture
) -> None:
    dev = Device(tmp_path, release.v1, server)
    dev.state_dir.mkdir(parents=True)
    (dev.state_dir / "journal.json").write_bytes(b"{\x00 torn")
    with caplog.at_level(logging.WARNING):
        driver = dev.driver()
        driver.resume_after_boot(_no_failures)
    assert driver.last_report() is None and dev.reports == []
    assert any("journal" in r.message and "corrupt" in r.message for r in caplog.records)


def test_journal_round_trip_and_atomic_replace(tmp_path: Path) -> None:
    journal = OtaJournal(tmp_path / "j.json")
    assert journal.load() is None
    entry = JournalEntry(
        job_id="job",
        rollout_id="ro",
        state=S.INSTALLING,
        reason="",
        manifest=b"\x00manifest\xff",
        signature=b"sig" * 20,
        base_url="http://x/",
        version="2.0.0",
        target_slot="b",
        previous_slot="a",
        payload_kind="delta",
        bytes_downloaded=10,
        bytes_total=20,
        updated_unix=1.5,
    )
    journal.save(entry)
    assert journal.load() == entry
    assert [p.name for p in tmp_path.iterdir()] == ["j.json"]  # no temp file left behind
    journal.clear()
    assert journal.load() is None
    journal.clear()


def test_platform_health_checks_report_one_line_each(tmp_path: Path, release: Release, server: Cloud) -> None:
    dev = Device(tmp_path, release.v1, server)
    p = paths(dev.dir)
    platform = EnvFilePlatform(
        slot_paths(dev.dir),
        p["env"],
        p["booted_slot"],
        health_commands=[
            [sys.executable, "-c", "print('all good')"],
            [sys.executable, "-c", "import sys; print('line one'); print('disk /data missing'); sys.exit(3)"],
            [sys.executable, "-c", "import time; time.sleep(10)"],
            [str(tmp_path / "no-such-check")],
        ],
        health_timeout_s=0.5,
    )
    started = time.monotonic()
    failures = platform.run_health_checks()
    assert time.monotonic() - started < 5
    assert failures[0] == f"health check {Path(sys.executable).name} exited 3: disk /data missing"
    assert "timed out after 0.5 s" in failures[1]
    assert failures[2].startswith("health check no-such-check could not run")
    assert len(failures) == 3


def test_platform_guards_the_running_slot_and_the_env_format(
    tmp_path: Path, release: Release, server: Cloud
) -> None:
    dev = Device(tmp_path, release.v1, server)
    platform = dev.platform()
    assert (platform.booted_slot(), platform.other_slot()) == ("a", "b")
    with pytest.raises(StateError, match="running slot"):
        platform.write_slot("a", b"x")
    with pytest.raises(StateError, match="no slot 'c'"):
        platform.write_slot("c", b"x")
    paths(dev.dir)["env"].write_text("boot_slot=a\nthis line is broken\n")
    with pytest.raises(IntegrityError, match=r"env:2: not a key=value line"):
        platform.boot_env()
    paths(dev.dir)["booted_slot"].write_text("z\n")
    with pytest.raises(IntegrityError, match="booted slot 'z' is not one of the slots"):
        platform.booted_slot()


# -- the attack catalog: every attack refused before anything is written, the device stays where it is --


def _reject(dev: Device, job: tuple[str, ...], cloud: Cloud, **driver_kw: object) -> str:
    """Run ``job``; assert it was REJECTED with no payload download and no slot change; its reason."""
    env_before = dev.env()
    dev.driver(**driver_kw).handle_job(*job)  # type: ignore[arg-type]
    assert dev.states() == [S.REJECTED], dev.reports
    assert not any("/files/" in r for r in cloud.requests)
    assert dev.slot("b") == b"" and dev.env() == env_before
    assert boot(dev.dir) == BootResult("a", False)
    return dev.reports[-1].reason


def _signed(md_bytes: bytes, signer: CryptoSigner) -> bytes:
    md = Metadata.from_bytes(md_bytes)
    md.signatures.clear()
    md.sign(signer)
    return md.to_bytes()


def _device_targets(cloud: Cloud, targets: dict[str, TargetFile]) -> None:
    """What a director with a stolen online key could sign for the device."""
    cloud.tuf.device(DEVICE).publish(targets, replace=True)


def _director_image(
    cloud: Cloud, release_version: str, job_id: str, **changes: object
) -> dict[str, TargetFile]:
    m = cloud.releases[release_version]
    full = next(p for p in m.payloads if p.kind == "full")
    facts = image_facts(m.name, m.version, m.hardware_id, full.path)
    facts.update(device_id=DEVICE, job_id=job_id, rollout_id="r")
    path = str(changes.pop("path", image_target_path(m.name, m.hardware_id, m.version)))
    sha = str(changes.pop("sha256", full.sha256))
    length = int(changes.pop("length", full.size))  # type: ignore[call-overload]
    facts.update(changes)
    return {path: target_file(path, sha, length, facts)}


def test_attack_arbitrary_software_from_the_director_alone(
    tmp_path: Path, release: Release, release_cloud: Cloud
) -> None:
    cloud, dev = release_cloud, Device(tmp_path, release.v1, release_cloud)
    evil = build_image("9.0.0", HW, size_hint=4096)
    sha = cloud.store.add_image(evil)
    _device_targets(
        cloud,
        _director_image(
            cloud,
            "2.0.0",
            "job-evil",
            path=f"{NAME}/{HW}/9.0.0.img",
            sha256=sha,
            length=len(evil),
            version="9.0.0",
            file=f"files/{sha}",
        ),
    )
    reason = _reject(dev, ("job-evil", "r", b"", b"", cloud.base_url), cloud)
    assert "image repository does not sign" in reason


def test_attack_mix_and_match_director_and_image_repository_disagree(
    tmp_path: Path, release: Release, release_cloud: Cloud
) -> None:
    cloud, dev = release_cloud, Device(tmp_path, release.v1, release_cloud)
    v3 = next(p for p in cloud.releases["3.0.0"].payloads if p.kind == "full")
    _device_targets(cloud, _director_image(cloud, "2.0.0", "job-mix", sha256=v3.sha256, length=v3.size))
    reason = _reject(dev, ("job-mix", "r", b"", b"", cloud.base_url), cloud)
    assert "disagree" in reason and "mix-and-match" in reason


def test_attack_rollback_to_an_older_version(tmp_path: Path, release: Release) -> None:
    cloud = Cloud(tmp_path / "cloud")
    try:
        old = build_image("0.9.0", HW, size_hint=IMAGE_SIZE)
        cloud.publish(old, "0.9.0", [])
        dev = Device(tmp_path, release.v1, cloud)
        reason = _reject(dev, cloud.job("job-old", "0.9.0", release.v1), cloud)
        assert reason == "version 0.9.0 is not newer than installed 1.0.0"
    finally:
        cloud.close()


def test_a_roll_back_to_the_image_in_the_other_slot_is_accepted_and_no_further(
    tmp_path: Path, release: Release
) -> None:
    """A bad release is rolled back by offering the release the device ran before: accepted only because
    its signed hash is the other slot's bytes; an older image than that stays refused."""
    cloud = Cloud(tmp_path / "cloud")
    try:
        cloud.publish(build_image("0.9.0", HW, size_hint=IMAGE_SIZE), "0.9.0", [])
        cloud.publish(release.v1, "1.0.0", [])
        cloud.publish(release.v2, "2.0.0", [release.v1])
        dev = Device(tmp_path, release.v1, cloud)
        with pytest.raises(RebootRequested):
            dev.driver().handle_job(*dev.job("job-up"))  # type: ignore[arg-type]
        boot(dev.dir)
        dev.driver().resume_after_boot(_no_failures)
        assert dev.states()[-1] is S.COMMITTED and boot_slot(dev) == "b"

        back = dev.driver()
        with pytest.raises(RebootRequested):
            back.handle_job(*dev.job("job-back", "1.0.0"))  # type: ignore[arg-type]
        assert dev.slot("a") == release.v1 and dev.env()["boot_slot"] == "a"
        boot(dev.dir)
        after = dev.driver()
        after.resume_after_boot(_no_failures)
        assert dev.states()[-1] is S.COMMITTED and after.installed_version() == "1.0.0"

        # the other slot now holds 2.0.0: going further back than v1 is refused, nothing downloaded
        cloud.requests.clear()
        after.handle_job(*dev.job("job-older", "0.9.0"))  # type: ignore[arg-type]
        assert dev.states()[-1] is S.REJECTED
        assert dev.reports[-1].reason == "version 0.9.0 is not newer than installed 1.0.0"
        assert not any("/files/" in r for r in cloud.requests)
        assert dev.slot("b") == release.v2 and boot(dev.dir) == BootResult("a", False)
    finally:
        cloud.close()


def test_attack_metadata_rollback_is_refused(tmp_path: Path, release: Release, release_cloud: Cloud) -> None:
    cloud = release_cloud
    dev = Device(tmp_path, release.v1, cloud)
    old = {n: cloud.tuf.image.data(f"{n}.json") for n in ("timestamp", "snapshot", "targets")}
    cloud.publish(build_image("4.0.0", HW, size_hint=IMAGE_SIZE), "4.0.0", [])
    dev.job("job-seen")
    dev.driver().handle_job("job-other", "r", b"", b"", cloud.base_url)  # refused, but metadata was seen
    assert "not the director's current job" in dev.reports[-1].reason
    dev.reports.clear()
    for name, data in old.items():  # a mirror replays the older, validly signed files
        cloud.overrides[f"/tuf/image/{name}.json"] = data
    reason = _reject(dev, dev.job("job-replay-md", "3.0.0"), cloud)
    assert "rollback of metadata refused" in reason


def test_attack_freeze_with_expired_metadata(tmp_path: Path, release: Release) -> None:
    stale = time.time() - 3 * 86400  # a mirror serving what it signed three days ago
    cloud = Cloud(tmp_path / "cloud", clock=lambda: stale)
    try:
        cloud.publish(release.v2, "2.0.0", [release.v1])
        dev = Device(tmp_path, release.v1, cloud)
        reason = _reject(dev, dev.job("job-frozen"), cloud)
        assert "metadata expired" in reason
    finally:
        cloud.close()


def test_attack_endless_data(tmp_path: Path, release: Release, release_cloud: Cloud) -> None:
    cloud = release_cloud
    dev = Device(tmp_path, release.v1, cloud)
    reason = _reject(dev, dev.job("job-big"), cloud, max_artifact_bytes=1000)
    assert "exceeds this device's limit" in reason
    # and metadata that never ends is cut at the client's limit
    dev2 = Device(tmp_path / "2", release.v1, cloud)
    cloud.overrides["/tuf/image/timestamp.json"] = b"{" + b" " * (1 << 20)
    reason = _reject(dev2, dev2.job("job-endless"), cloud)
    assert "image repository" in reason


def test_attack_wrong_key(tmp_path: Path, release: Release, release_cloud: Cloud) -> None:
    cloud = release_cloud
    dev = Device(tmp_path, release.v1, cloud)
    forged = _signed(cloud.tuf.image.data("targets.json"), CryptoSigner.generate_ed25519())
    cloud.overrides["/tuf/image/targets.json"] = forged
    reason = _reject(dev, dev.job("job-forged"), cloud)
    assert "signatures do not meet the threshold" in reason


def test_attack_too_few_root_keys_for_a_new_root(
    tmp_path: Path, release: Release, release_cloud: Cloud
) -> None:
    cloud = release_cloud
    dev = Device(tmp_path, release.v1, cloud)
    authority = cloud.tuf.image_authority
    root = Metadata[Root].from_bytes(authority.root_bytes())
    attacker = CryptoSigner.generate_ed25519()
    root.signed.version += 1
    for keyid in list(root.signed.roles["targets"].keyids):
        root.signed.revoke_key(keyid, "targets")
    root.signed.add_key(attacker.public_key, "targets")
    root.signatures.clear()
    one_key = authority.keys.signer(root.signed.roles["root"].keyids[0])
    assert one_key is not None and root.signed.roles["root"].threshold == 2
    root.sign(one_key)  # one of the two root keys: below the threshold
    cloud.overrides["/tuf/image/2.root.json"] = root.to_bytes()
    reason = _reject(dev, dev.job("job-root"), cloud)
    assert "signatures do not meet the threshold" in reason


def test_attack_delta_for_the_wrong_base_never_reaches_the_slot(
    tmp_path: Path, release: Release, release_cloud: Cloud
) -> None:
    cloud = release_cloud
    other_v1 = build_image("1.0.0", HW, size_hint=IMAGE_SIZE, variant=3)
    lying = make_delta(other_v1, release.v2)  # signed as if it applied to the usual v1
    sha = cloud.store.add_image(lying)
    m = cloud.releases["2.0.0"]
    image_path = image_target_path(NAME, HW, "2.0.0")
    path = delta_target_path(NAME, HW, "2.0.0", sha256_hex(release.v1), FLDELTA2)
    facts = delta_facts(image_path, sha256_hex(release.v1), f"files/{sha}", algorithm=FLDELTA2)
    target = target_file(path, sha, len(lying), facts)
    cloud.tuf.image.publish({path: target})
    cloud.releases["2.0.0"] = m
    dev = Device(tmp_path, release.v1, cloud)
    dev.driver().handle_job(*dev.job("job-lie"))  # type: ignore[arg-type]
    assert dev.reports[-1].state is S.FAILED
    assert "delta" in dev.reports[-1].reason
    assert sha256_hex(dev.slot("b")) != sha256_hex(release.v2) or dev.slot("b") == b""
    assert dev.env()["boot_slot"] == "a" and boot(dev.dir) == BootResult("a", False)


def test_attack_replayed_old_job(tmp_path: Path, release: Release, release_cloud: Cloud) -> None:
    cloud = release_cloud
    dev = Device(tmp_path, release.v1, cloud)
    old_job = dev.job("job-old")
    dev.job("job-new", "3.0.0")  # the director moved on
    reason = _reject(dev, old_job, cloud)
    assert "is not the director's current job" in reason


def test_root_rotation_reaches_devices_provisioned_with_the_old_root(
    tmp_path: Path, release: Release, release_cloud: Cloud
) -> None:
    cloud = release_cloud
    dev = Device(tmp_path, release.v1, cloud)  # provisioned with root v1
    old_root_keys = set(cloud.tuf.image_authority.root.signed.roles["root"].keyids)
    assert cloud.tuf.image_authority.rotate(root_keys=3, threshold=2, online=True) == 2
    assert cloud.tuf.director_authority.rotate(root_keys=1, online=True) == 2
    new_root = cloud.tuf.image_authority.root.signed
    assert not old_root_keys & set(new_root.roles["root"].keyids)
    cloud.publish(build_image("4.0.0", HW, size_hint=IMAGE_SIZE), "4.0.0", [release.v1])
    with pytest.raises(RebootRequested):
        dev.driver().handle_job(*dev.job("job-rotated", "4.0.0"))  # type: ignore[arg-type]
    assert dev.reports[-1].state is S.REBOOTING and dev.reports[-1].payload_kind == "delta"
    trusted = Metadata[Root].from_bytes((dev.state_dir / "tuf" / "image" / "root.json").read_bytes())
    assert trusted.signed.version == 2


def test_release_manager_is_refused_before_anything_reaches_a_device(
    tmp_path: Path, release: Release
) -> None:
    now = [time.time()]
    cloud = Cloud(tmp_path / "cloud", clock=lambda: now[0])
    try:
        with pytest.raises(UserError, match="for hardware 'simdev-gen2', not 'other-hw'"):
            cloud.store.add_release(
                ReleaseInput(
                    release.v2, name=NAME, version="2.0.0", hardware_id="other-hw", bases=[], now=NOW
                )
            )
        with pytest.raises(UserError, match=r"is firmware version 2\.0\.0, not 2\.1\.0"):
            cloud.store.add_release(
                ReleaseInput(release.v2, name=NAME, version="2.1.0", hardware_id=HW, bases=[], now=NOW)
            )
        with pytest.raises(UserError, match=r"older than 1\.5\.0, which devices with hardware"):
            check_not_older_than_fleet(["1.0.0", "1.5.0"], "1.2.0", HW)
        now[0] += 400 * 86400  # the image repository's root has expired
        with pytest.raises(StateError, match=r"root expired at .* rotate the root"):
            cloud.publish(release.v2, "2.0.0", [])
        assert cloud.tuf.image.targets() == {}
    finally:
        cloud.close()


def test_unreachable_metadata_postpones_the_job_until_it_is_offered_again(
    tmp_path: Path, release: Release, server: Cloud
) -> None:
    dev = Device(tmp_path, release.v1, server)
    job = dev.job("job-later")
    dev.driver().handle_job(job[0], job[1], b"", b"", "http://127.0.0.1:9/")  # type: ignore[arg-type]
    assert dev.reports == [] and dev.journal() is None
    with pytest.raises(RebootRequested):
        dev.driver().handle_job(*job)  # type: ignore[arg-type]
    assert dev.reports[-1].state is S.REBOOTING


# -- bundles: no-reboot updates through the same metadata, download and journal ------------------------


def test_a_bundle_installs_by_atomic_swap_without_a_reboot(
    tmp_path: Path, release: Release, release_cloud: Cloud
) -> None:
    cloud = release_cloud
    v1 = ustar({"model.yaml": b"name: brake\nversion: 1\n", "model.onnx": b"\x08\x07onnx-v1"})
    v2 = ustar(
        {"model.yaml": b"name: brake\nversion: 2\n", "model.onnx": b"\x08\x07onnx-v2", "extra/n.txt": b"n"}
    )
    for version, data in (("1.0.0", v1), ("1.1.0", v2)):
        m, _ = cloud.store.add_release(
            ReleaseInput(data, name="brake-model", version=version, hardware_id=HW, bases=[], now=NOW)
        )
        cloud.releases[version] = manifest_from_bytes(m)
        assert cloud.releases[version].install == "swap"
    dev = Device(tmp_path, release.v1, cloud)
    seen: list[tuple[str, bytes]] = []

    def reload(name: str, current: Path) -> None:  # what the model registry does on a switch
        seen.append((name, (current / "model.onnx").read_bytes()))

    env_before = dev.env()
    dev.driver(on_bundle=reload).handle_job(*dev.job("job-b1", "1.0.0"))  # type: ignore[arg-type]
    assert dev.states() == [S.QUEUED, S.DOWNLOADING, S.DOWNLOADED, S.VERIFIED, S.INSTALLING, S.COMMITTED]
    current = dev.state_dir / "bundles" / "brake-model" / "current"
    assert (current / "model.yaml").read_bytes().endswith(b"version: 1\n")
    assert seen == [("brake-model", b"\x08\x07onnx-v1")]
    dev.driver(on_bundle=reload).handle_job(*dev.job("job-b2", "1.1.0"))  # type: ignore[arg-type]
    assert dev.reports[-1].state is S.COMMITTED and seen[-1] == ("brake-model", b"\x08\x07onnx-v2")
    assert os.readlink(current) == "v-1.1.0" and (current / "extra" / "n.txt").read_bytes() == b"n"
    assert (current.parent / "v-1.0.0").is_dir()  # one step back is kept
    # no slot was touched, no reboot asked for, and an older bundle is refused
    assert dev.slot("b") == b"" and dev.env() == env_before
    dev.driver().handle_job(*dev.job("job-b3", "1.0.0"))  # type: ignore[arg-type]
    assert dev.reports[-1].state is S.REJECTED
    assert dev.reports[-1].reason == "bundle brake-model 1.0.0 is not newer than installed 1.1.0"


@pytest.mark.parametrize("kind", ["escape", "symlink"])
def test_a_hostile_bundle_fails_and_the_current_version_stays(
    tmp_path: Path, release: Release, release_cloud: Cloud, kind: str
) -> None:
    cloud = release_cloud
    if kind == "escape":
        evil = tarfile.TarInfo("../../outside.txt")
        evil.size = 4
    else:
        evil = tarfile.TarInfo("link")
        evil.type, evil.linkname = tarfile.SYMTYPE, "/etc/passwd"
    data = ustar({"ok.txt": b"ok"}, evil)
    m, _ = cloud.store.add_release(
        ReleaseInput(data, name="cfg", version="2.0.0", hardware_id=HW, bases=[], now=NOW)
    )
    cloud.releases["cfg-2"] = manifest_from_bytes(m)
    dev = Device(tmp_path, release.v1, cloud)
    dev.driver().handle_job(*cloud.job("job-h", "cfg-2", release.v1))  # type: ignore[arg-type]
    assert dev.reports[-1].state is S.FAILED
    assert "outside the bundle" in dev.reports[-1].reason or "not a regular file" in dev.reports[-1].reason
    assert not (dev.state_dir / "bundles" / "cfg" / "current").exists()
    assert not list(tmp_path.rglob("outside.txt"))


# -- withdrawn jobs ---------------------------------------------------------------------------------


def test_a_job_withdrawn_mid_download_is_journaled_canceled_then_its_download_deleted(
    tmp_path: Path, release: Release, server: Cloud
) -> None:
    dev = Device(tmp_path, release.v1, server)
    seen: list[OtaState] = []

    def report(r: OtaReport) -> None:
        dev.reports.append(r)
        if r.state is OtaState.DOWNLOADING and OtaState.DOWNLOADING not in seen:
            driver.cancel("job-w", "rollout r aborted")  # as the control stream's thread does
            seen.append(r.state)

    driver = dev.driver(report=report)
    driver.handle_job(*dev.job("job-w"))  # type: ignore[arg-type]
    assert dev.states()[-1] is OtaState.CANCELED and dev.reports[-1].reason == "rollout r aborted"
    assert OtaState.INSTALLING not in dev.states()
    journal = dev.journal()
    assert journal is not None and journal.state is OtaState.CANCELED
    assert not any((dev.state_dir / "downloads").glob("*"))
    assert dev.env().get("upgrade_available", "0") == "0" and dev.slot("b") != release.v2  # nothing written
    driver.handle_job(*dev.job("job-w"))  # type: ignore[arg-type]  # offered again: refused
    assert dev.states()[-1] is OtaState.REJECTED and "already finished as CANCELED" in dev.reports[-1].reason


def test_a_job_withdrawn_before_it_starts_never_runs(tmp_path: Path, release: Release, server: Cloud) -> None:
    dev = Device(tmp_path, release.v1, server)
    driver = dev.driver()
    driver.cancel("job-q", "offer withdrawn: schedule ended")
    driver.handle_job(*dev.job("job-q"))  # type: ignore[arg-type]  # it was queued behind the cancel
    assert dev.states() == [OtaState.CANCELED] and dev.journal() is None
    driver.cancel("job-never", "rollout r aborted")  # withdrawn before its offer even arrived
    driver.settle_cancel("job-never", "r")
    assert dev.states()[-1] is OtaState.CANCELED and dev.reports[-1].job_id == "job-never"
    driver.handle_job(*dev.job("job-never"))  # type: ignore[arg-type]  # a late offer is refused
    assert dev.states()[-1] is OtaState.REJECTED


def test_a_job_withdrawn_while_installing_finishes_as_the_state_machine_says(
    tmp_path: Path, release: Release, server: Cloud
) -> None:
    dev = Device(tmp_path, release.v1, server)

    def report(r: OtaReport) -> None:
        dev.reports.append(r)
        if r.state is OtaState.INSTALLING:
            driver.cancel("job-late", "rollout r aborted")

    driver = dev.driver(report=report)
    with pytest.raises(RebootRequested):  # committed to installing: it goes on to the reboot
        driver.handle_job(*dev.job("job-late"))  # type: ignore[arg-type]
    assert OtaState.CANCELED not in dev.states()
    journal = dev.journal()
    assert journal is not None and journal.state is OtaState.REBOOTING
    driver.settle_cancel("job-late", "r")  # the queued withdrawal: reports what became of the job
    assert dev.states()[-1] is OtaState.REBOOTING
