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
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from fleetloop_agent.ota.download import HttpFetcher
from fleetloop_agent.ota.driver import OtaDriver, OtaReport
from fleetloop_agent.ota.journal import JournalEntry, OtaJournal
from fleetloop_agent.ota.platform import EnvFilePlatform, RebootRequested, read_boot_env
from fleetloop_agent.ota.states import OtaState
from fleetloop_fwsim.bootloader import BootResult, boot, paths, provision, slot_paths
from fleetloop_fwsim.firmware import build_image
from fleetloop_shared.artifact import (
    PayloadRef,
    ReleaseManifest,
    ReleaseSigner,
    manifest_to_bytes,
    sha256_hex,
)
from fleetloop_shared.delta import make_delta
from fleetloop_shared.errors import IntegrityError, StateError

S = OtaState
HW = "simdev-gen2"
NOW = 1_750_000_000.0
IMAGE_SIZE = 512 * 1024
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Release:
    v1: bytes
    v2: bytes
    v3: bytes
    delta: bytes  # v1 -> v2
    delta_v3: bytes  # v1 -> v3
    signer: ReleaseSigner


@pytest.fixture(scope="module")
def release() -> Release:
    v1 = build_image("1.0.0", HW, size_hint=IMAGE_SIZE)
    v2 = build_image("2.0.0", HW, size_hint=IMAGE_SIZE)
    v3 = build_image("3.0.0", HW, size_hint=IMAGE_SIZE)
    return Release(v1, v2, v3, make_delta(v1, v2), make_delta(v1, v3), ReleaseSigner.generate())


class ArtifactServer:
    """Files by URL path, with Range, as the cloud's artifact endpoint serves them."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                start = int(match.group(1)) if match else 0
                if match:
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                self.wfile.write(body[start:])

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"


@pytest.fixture(scope="module")
def server(release: Release) -> Iterator[ArtifactServer]:
    srv = ArtifactServer()
    for blob in (release.v2, release.v3, release.delta, release.delta_v3):
        srv.files[f"/files/{sha256_hex(blob)}"] = blob
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def _ref(blob: bytes, base: bytes | None = None) -> PayloadRef:
    kind, algorithm = ("delta", "bsdiff4") if base is not None else ("full", "none")
    return PayloadRef(
        kind,
        algorithm,
        f"files/{sha256_hex(blob)}",
        sha256_hex(blob),
        len(blob),
        sha256_hex(base) if base else None,
    )


def manifest_v2(release: Release, **changes: object) -> ReleaseManifest:
    m = ReleaseManifest(
        name="simdev-firmware",
        version="2.0.0",
        hardware_id=HW,
        target_sha256=sha256_hex(release.v2),
        target_size=len(release.v2),
        payloads=(_ref(release.v2), _ref(release.delta, base=release.v1)),
        created_unix=int(NOW) - 60,
        expires_unix=int(NOW) + 3600,
    )
    return replace(m, **changes)  # type: ignore[arg-type]


def signed(release: Release, m: ReleaseManifest) -> tuple[bytes, bytes]:
    data = manifest_to_bytes(m)
    return data, release.signer.sign(data)


class Device:
    """A provisioned simulated device plus the agent-side objects pointed at its files."""

    def __init__(
        self, root: Path, image: bytes, release: Release, health_commands: list[list[str]] | None = None
    ):
        self.dir = root / "device"
        self.state_dir = root / "agent-state"
        self.release = release
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
            trusted_keys_pem=[self.release.signer.public_key_pem()],
            hardware_id=HW,
            report=kw.pop("report", self.reports.append),  # type: ignore[arg-type]
            clock=lambda: NOW,
            **kw,  # type: ignore[arg-type]
        )

    def states(self) -> list[OtaState]:
        return [r.state for r in self.reports]

    def slot(self, name: str) -> bytes:
        return slot_paths(self.dir)[name].read_bytes()

    def env(self) -> dict[str, str]:
        return read_boot_env(paths(self.dir)["env"])

    def journal(self) -> JournalEntry | None:
        return OtaJournal(self.state_dir / "journal.json").load()


def _no_failures() -> list[str]:
    return []


def test_delta_update_reboots_health_checks_and_commits(
    tmp_path: Path, release: Release, server: ArtifactServer
) -> None:
    dev = Device(tmp_path, release.v1, release)
    manifest, sig = signed(release, manifest_v2(release))
    driver = dev.driver()
    assert driver.installed_version() == "1.0.0" and driver.last_report() is None
    with pytest.raises(RebootRequested):
        driver.handle_job("job-1", "rollout-1", manifest, sig, server.base_url)
    assert dev.states() == [S.QUEUED, S.DOWNLOADING, S.DOWNLOADED, S.VERIFIED, S.INSTALLING, S.REBOOTING]
    last = dev.reports[-1]
    assert (last.payload_kind, last.bytes_downloaded, last.bytes_total) == (
        "delta",
        len(release.delta),
        len(release.delta),
    )
    assert last.version == "2.0.0" and last.rollout_id == "rollout-1"
    assert len(release.delta) < 0.1 * len(release.v2)
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
    after.handle_job("job-1", "rollout-1", manifest, sig, server.base_url)
    assert dev.reports[-1].state is S.REJECTED and "already finished as COMMITTED" in dev.reports[-1].reason
    assert after.last_report() is not None and after.last_report().state is S.COMMITTED  # type: ignore[union-attr]
    # the same release under a new job id is not newer than what runs
    after.handle_job("job-2", "rollout-1", manifest, sig, server.base_url)
    assert dev.reports[-1].state is S.REJECTED
    assert dev.reports[-1].reason == "version 2.0.0 is not newer than installed 2.0.0"
    # after the next start, the last terminal state is told once more
    n = len(dev.reports)
    dev.driver().resume_after_boot(_no_failures)
    assert [r.state for r in dev.reports[n:]] == [S.REJECTED]
    assert dev.reports[-1].job_id == "job-2"


def test_unknown_base_gets_the_full_image(tmp_path: Path, release: Release, server: ArtifactServer) -> None:
    other_v1 = build_image("1.0.0", HW, size_hint=IMAGE_SIZE, variant=5)
    assert other_v1 != release.v1
    dev = Device(tmp_path, other_v1, release)
    manifest, sig = signed(release, manifest_v2(release))
    with pytest.raises(RebootRequested):
        dev.driver().handle_job("job-full", "r", manifest, sig, server.base_url)
    assert dev.reports[-1].payload_kind == "full" and dev.reports[-1].bytes_total == len(release.v2)
    boot(dev.dir)
    dev.driver().resume_after_boot(_no_failures)
    assert dev.reports[-1].state is S.COMMITTED and dev.slot("b") == release.v2


def test_failing_health_check_reboots_until_the_bootloader_falls_back(
    tmp_path: Path, release: Release, server: ArtifactServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(str(REPO / d) for d in ("shared", "agent", "firmware-sim"))
    )
    selftest = [sys.executable, "-m", "fleetloop_fwsim.selftest", "--device-dir", str(tmp_path / "device")]
    dev = Device(tmp_path, release.v1, release, health_commands=[selftest])
    (dev.dir / "faults.json").write_text('{"health_fail_versions": ["2.0.0"]}')
    manifest, sig = signed(release, manifest_v2(release))
    with pytest.raises(RebootRequested):
        dev.driver().handle_job("job-bad", "r", manifest, sig, server.base_url)

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
    tmp_path: Path, release: Release, server: ArtifactServer
) -> None:
    dev = Device(tmp_path, release.v1, release)
    manifest, sig = signed(release, manifest_v2(release))
    with pytest.raises(RebootRequested):
        dev.driver().handle_job("job-x", "r", manifest, sig, server.base_url)
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
    tmp_path: Path, release: Release, server: ArtifactServer
) -> None:
    tampered = bytearray(release.delta)
    tampered[len(tampered) // 2] ^= 0xFF
    server.files["/files/tampered-delta"] = bytes(tampered)
    delta = replace(_ref(release.delta, base=release.v1), path="files/tampered-delta")
    dev = Device(tmp_path, release.v1, release)
    env_before = dev.env()
    manifest, sig = signed(release, manifest_v2(release, payloads=(_ref(release.v2), delta)))
    dev.driver().handle_job("job-t", "r", manifest, sig, server.base_url)
    last = dev.reports[-1]
    assert last.state is S.FAILED
    assert last.reason.startswith(f"payload hash mismatch: expected {sha256_hex(release.delta)}, got ")
    assert dev.slot("b") == b"" and dev.slot("a") == release.v1 and dev.env() == env_before
    assert not any((dev.state_dir / "downloads").iterdir())
    assert boot(dev.dir) == BootResult("a", False)


def test_a_signed_delta_that_builds_the_wrong_image_never_reaches_the_slot(
    tmp_path: Path, release: Release, server: ArtifactServer
) -> None:
    wrong = _ref(release.delta_v3, base=release.v1)  # authentic bytes, but they build v3, not the signed v2
    dev = Device(tmp_path, release.v1, release)
    manifest, sig = signed(release, manifest_v2(release, payloads=(_ref(release.v2), wrong)))
    dev.driver().handle_job("job-w", "r", manifest, sig, server.base_url)
    assert dev.reports[-1].state is S.FAILED
    assert dev.reports[-1].reason.startswith("image built from the delta payload does not match the release")
    assert dev.slot("b") == b""


def test_missing_artifact_fails_with_a_reason(
    tmp_path: Path, release: Release, server: ArtifactServer
) -> None:
    gone = replace(_ref(release.delta, base=release.v1), path="files/not-there")
    dev = Device(tmp_path, release.v1, release)
    manifest, sig = signed(release, manifest_v2(release, payloads=(gone,)))
    dev.driver().handle_job("job-404", "r", manifest, sig, server.base_url)
    assert dev.reports[-1].state is S.FAILED and "artifact not found" in dev.reports[-1].reason


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        ("signature", "signature does not verify with any trusted release key"),
        ("hardware", f"manifest is for hardware other-hw, this device is {HW}"),
        ("expired", "manifest expired at"),
        ("older", "version 0.9.0 is not newer than installed 1.0.0"),
        ("garbage-version", "version latest cannot be compared with installed 1.0.0"),
        ("too-big", "exceeds the device limit"),
    ],
)
def test_untrustworthy_jobs_are_rejected_before_any_download(
    tmp_path: Path, release: Release, server: ArtifactServer, tamper: str, reason: str
) -> None:
    m = manifest_v2(release)
    if tamper == "hardware":
        m = replace(m, hardware_id="other-hw")
    elif tamper == "expired":
        m = replace(m, expires_unix=int(NOW) - 1, created_unix=int(NOW) - 100)
    elif tamper == "older":
        m = replace(m, version="0.9.0")
    elif tamper == "garbage-version":
        m = replace(m, version="latest")
    manifest, sig = signed(release, m)
    if tamper == "signature":
        sig = ReleaseSigner.generate().sign(manifest)
    dev = Device(tmp_path, release.v1, release)
    requests_before = len(server.requests)
    driver = dev.driver(max_artifact_bytes=1000) if tamper == "too-big" else dev.driver()
    driver.handle_job("job-r", "r", manifest, sig, server.base_url)
    assert dev.states() == [S.REJECTED]
    assert reason in dev.reports[0].reason
    assert len(server.requests) == requests_before
    assert dev.slot("b") == b""
    assert driver.last_report() is not None and driver.last_report().state is S.REJECTED  # type: ignore[union-attr]


def test_garbage_manifest_is_rejected(tmp_path: Path, release: Release, server: ArtifactServer) -> None:
    dev = Device(tmp_path, release.v1, release)
    junk = b"\x00not json"
    dev.driver().handle_job("job-g", "r", junk, release.signer.sign(junk), server.base_url)
    assert dev.states() == [S.REJECTED] and "not valid UTF-8 JSON" in dev.reports[0].reason


class PowerCut(BaseException):
    """The lights go out: nothing after this point runs (not an Exception, so nothing catches it)."""


class Cutter:
    """Counts the points where power could be lost and cuts at the chosen one."""

    def __init__(self, at: int | None) -> None:
        self.at = at
        self.points: list[str] = []

    def point(self, name: str) -> None:
        self.points.append(name)
        if self.at is not None and len(self.points) == self.at:
            raise PowerCut(name)


class CuttingPlatform(EnvFilePlatform):
    def __init__(self, cutter: Cutter, dev: Device) -> None:
        p = paths(dev.dir)
        super().__init__(slot_paths(dev.dir), p["env"], p["booted_slot"])
        self.cutter = cutter

    def write_slot(self, slot: str, data: bytes) -> None:
        try:
            self.cutter.point("write_slot")
        except PowerCut:
            self.slot_paths[slot].write_bytes(data[: len(data) // 2])  # torn write
            raise
        super().write_slot(slot, data)

    def set_next_boot(self, slot: str) -> None:
        self.cutter.point("before set_next_boot")
        super().set_next_boot(slot)
        self.cutter.point("after set_next_boot")

    def commit(self) -> None:
        self.cutter.point("before commit")
        super().commit()
        self.cutter.point("after commit")


class CuttingFetcher(HttpFetcher):
    def __init__(self, cutter: Cutter) -> None:
        super().__init__(chunk_size=4096)
        self.cutter = cutter

    def fetch_range(self, url: str, start: int, max_bytes: int) -> Iterator[bytes]:
        for i, chunk in enumerate(super().fetch_range(url, start, max_bytes)):
            yield chunk
            if i == 0:
                self.cutter.point("mid-download")


def _simulate(
    root: Path, release: Release, server: ArtifactServer, cut_at: int | None, health: Callable[[], list[str]]
) -> tuple[Device, Cutter]:
    dev = Device(root, release.v1, release)
    cutter = Cutter(cut_at)
    released = {sha256_hex(release.v1), sha256_hex(release.v2)}

    def report(r: OtaReport) -> None:
        dev.reports.append(r)
        cutter.point(f"journaled {r.state.value}")

    def driver() -> OtaDriver:
        return dev.driver(CuttingPlatform(cutter, dev), report=report, fetcher=CuttingFetcher(cutter))

    manifest, sig = signed(release, manifest_v2(release))
    with contextlib.suppress(RebootRequested, PowerCut):
        driver().handle_job("job-pc", "r", manifest, sig, server.base_url)
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
    tmp_path: Path, release: Release, server: ArtifactServer, healthy: bool
) -> None:
    def health() -> list[str]:
        return [] if healthy else ["app does not start on this build"]

    _, dry = _simulate(tmp_path / "dry", release, server, None, health)
    assert "mid-download" in dry.points and "write_slot" in dry.points and "after commit" in dry.points
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
    tmp_path: Path, release: Release, server: ArtifactServer
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
    tmp_path: Path, release: Release, server: ArtifactServer
) -> None:
    dev = Device(tmp_path, release.v1, release)
    cutter = Cutter(1)  # the first point is mid-download
    manifest, sig = signed(release, manifest_v2(release))
    with pytest.raises(PowerCut):
        dev.driver(fetcher=CuttingFetcher(cutter)).handle_job("job-1", "r", manifest, sig, server.base_url)
    assert (
        0
        < (dev.state_dir / "downloads" / f"{sha256_hex(release.delta)}.delta").stat().st_size
        < len(release.delta)
    )
    boot(dev.dir)
    driver = dev.driver()
    driver.handle_job("job-2", "r", manifest, sig, server.base_url)
    assert (
        dev.reports[-1].state is S.REJECTED
        and "(job job-1) is in progress (DOWNLOADING)" in dev.reports[-1].reason
    )
    driver.handle_job("job-1", "r", manifest, sig, server.base_url)
    again = dev.reports[-1]
    assert again.state is S.DOWNLOADING and again.job_id == "job-1"
    with pytest.raises(RebootRequested):
        driver.resume_after_boot(_no_failures)
    assert dev.slot("b") == release.v2


def test_corrupt_journal_is_ignored_with_a_warning(
    tmp_path: Path, release: Release, caplog: pytest.LogCaptureFixture
) -> None:
    dev = Device(tmp_path, release.v1, release)
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


def test_platform_health_checks_report_one_line_each(tmp_path: Path, release: Release) -> None:
    dev = Device(tmp_path, release.v1, release)
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


def test_platform_guards_the_running_slot_and_the_env_format(tmp_path: Path, release: Release) -> None:
    dev = Device(tmp_path, release.v1, release)
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
