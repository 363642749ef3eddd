"""Kill-and-restart loop for rollouts: the coordinator dies (SIGKILL) at random points while it rolls out.

The rollout controller promises that a restarted coordinator carries on exactly where the dead one was:
every decision (a phase opened, devices offered, the rollout finished) is committed before a job goes
out, and the device side is idempotent by job id. This harness checks that promise the hard way. A real
coordinator (``fleetloop cloud serve``, its controller lease short) runs a series of rollouts, each in
phases, to a fleet of simulated devices; on a seeded schedule it is killed with SIGKILL and restarted on
the same ports, over and over. The devices are the agent's own link (:class:`~fleetloop_agent.uplink.Link`
on one :class:`~fleetloop_fwsim.swarm.Swarm`) with a stand-in for the OTA install: a job is queued at
once and committed after a short "install", and the device tells its last OTA step again whenever it
connects (as the agent does after a restart), since a report sent to a coordinator that died with it is
lost.

Afterwards it checks, from what the devices saw and from the rollouts' durable history:

* every rollout succeeded and every device runs the last release;
* no device was ever offered a release before its phase had opened (``beyond_phase``), by the time the
  device received the job and by the time the controller recorded the offer;
* no decision was lost or doubled: each phase of each rollout opened exactly once and in order, each
  rollout finished exactly once, and each device got exactly one job id per rollout (first attempt).

``fleetloop sim rollout-kill`` runs it from the command line (``--kills 200`` for a longer run).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetloop_agent.metrics import AgentMetrics
from fleetloop_agent.uplink import Link
from fleetloop_agent.uplink.grpc_transport import GrpcTransport
from fleetloop_agent.uplink.pacing import BackoffPolicy
from fleetloop_fwsim import firmware
from fleetloop_fwsim.fleet import CoordinatorProcess
from fleetloop_fwsim.swarm import Swarm
from fleetloop_shared.errors import NotFoundError, StateError, UnavailableError
from fleetloop_shared.update.release_keys import (
    ReleaseKey,
    generate_key_file,
    load_key_file,
    public_pem_path,
    publish_release,
)
from fleetloop_shared.wire import device_pb2, ota_pb2

log = logging.getLogger("fleetloop.fwsim.rollout_kill")

HARDWARE_ID = "fleetloop-sim-kill"
FLEET = "kill-loop"
#: Small images: the loop is about the controller, not the payloads.
IMAGE_BYTES = 64 * 1024
#: The restarted coordinator takes over the dead one's controller lease after this many seconds.
LEASE_S = 1.0
#: Devices reconnect quickly after a kill (the agent's own backoff, shorter).
RECONNECT = BackoffPolicy(0.1, 0.5)
#: The phases of every rollout: a canary, then growing steps.
PHASES = (
    {"name": "canary", "count": 2, "soak": "1s"},
    {"name": "early", "percent": 25, "soak": "1s"},
    {"name": "half", "percent": 50, "soak": "1s"},
    {"name": "everyone"},
)


@dataclass
class _Seen:
    """What one device saw: per job id, when it first received it."""

    jobs: dict[str, float] = field(default_factory=dict)


class OtaDevice:
    """A device that holds its control session and answers OTA jobs like an agent would, without the
    download: QUEUED at once, COMMITTED after ``install_s`` (then it runs the job's version)."""

    def __init__(
        self, device_id: str, target: str | Sequence[str], swarm: Swarm, *, install_s: float, version: str
    ) -> None:
        self.device_id = device_id
        self.version = version
        self.install_s = install_s
        self.seen = _Seen()
        self._lock = threading.Lock()
        self._last: ota_pb2.OtaStatus | None = None
        self._busy = ""
        self.link = Link(
            GrpcTransport(target),
            device_id=device_id,
            metrics=AgentMetrics(),
            greeting=self._greeting,
            on_message=self._on_cloud,
            backoff=RECONNECT,
            loop=swarm,
        )

    def _greeting(self) -> list[device_pb2.DeviceMessage]:
        hello = device_pb2.Hello(device_id=self.device_id, fleet=FLEET, labels={"kind": "sim"})
        out = [device_pb2.DeviceMessage(hello=hello), device_pb2.DeviceMessage(inventory=self._inventory())]
        with self._lock:
            if self._last is not None:  # tell the last step again: the dead coordinator may have lost it
                out.append(device_pb2.DeviceMessage(ota_status=self._last))
        return out

    def _inventory(self) -> device_pb2.Inventory:
        return device_pb2.Inventory(hardware_id=HARDWARE_ID, firmware_version=self.version)

    def _on_cloud(self, msg: device_pb2.CloudMessage) -> None:
        if msg.WhichOneof("kind") != "ota_job":
            return
        job = msg.ota_job
        version = str(json.loads(job.manifest)["version"]) if job.manifest else ""
        with self._lock:
            first = job.job_id not in self.seen.jobs
            if first:
                self.seen.jobs[job.job_id] = time.time()
            if not first or self._busy:
                last = self._last if self._last is not None and self._last.job_id == job.job_id else None
                if last is None and self._busy:
                    last = self._status(job, ota_pb2.OTA_STATE_REJECTED, "another update is running")
            else:
                self._busy = job.job_id
                last = self._last = self._status(job, ota_pb2.OTA_STATE_QUEUED, "")
                timer = threading.Timer(self.install_s, self._commit, args=(job, version))
                timer.daemon = True
                timer.start()
        if last is not None:
            self.link.send(device_pb2.DeviceMessage(ota_status=last))

    def _status(
        self, job: ota_pb2.OtaJob, state: ota_pb2.OtaState.ValueType, reason: str
    ) -> ota_pb2.OtaStatus:
        return ota_pb2.OtaStatus(
            job_id=job.job_id,
            rollout_id=job.rollout_id,
            state=state,
            reason=reason,
            running_version=self.version,
        )

    def _commit(self, job: ota_pb2.OtaJob, version: str) -> None:
        with self._lock:
            self.version = version or self.version
            self._busy = ""
            self._last = self._status(job, ota_pb2.OTA_STATE_COMMITTED, "")
            self._last.version = version
            status = self._last
        self.link.send(device_pb2.DeviceMessage(ota_status=status))
        self.link.send(device_pb2.DeviceMessage(inventory=self._inventory()))


@dataclass
class KillLoopReport:
    kills: int
    rollouts: list[str]
    devices: int
    seconds: float
    #: Offers a device received before its phase had opened (must be 0).
    beyond_phase: int
    #: Phase openings missing or repeated, rollouts finished other than once (must be 0).
    lost_or_doubled: int
    #: Devices with more than one job id in a rollout, or a job id other than the first attempt.
    extra_jobs: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "kills": self.kills,
            "rollouts": len(self.rollouts),
            "devices": self.devices,
            "seconds": round(self.seconds, 1),
            "beyond_phase": self.beyond_phase,
            "lost_or_doubled": self.lost_or_doubled,
            "extra_jobs": self.extra_jobs,
            "problems": self.problems[:20],
        }


class CoordinatorApi:
    def __init__(self, coordinator: CoordinatorProcess, release_key: ReleaseKey) -> None:
        self.c = coordinator
        self.release_key = release_key

    def call(self, method: str, path: str, body: bytes | None = None, ctype: str = "application/json") -> Any:
        """One request; retried while the coordinator is down (it is being killed, after all)."""
        deadline = time.monotonic() + 90
        while True:
            req = urllib.request.Request(
                self.c.http_url + path,
                data=body,
                method=method,
                headers={"Authorization": f"Bearer {self.c.token}", "Content-Type": ctype},
            )
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    raise NotFoundError(f"{method} {path}: HTTP 404") from None
                raise StateError(f"{method} {path}: HTTP {exc.code}: {exc.read()[:300]!r}") from None
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise UnavailableError(f"{method} {path}: {exc}") from None
                time.sleep(0.2)


def run_kill_loop(
    workdir: Path,
    *,
    devices: int = 24,
    kills: int = 50,
    seed: int = 1,
    max_rollouts: int = 12,
    interval_s: tuple[float, float] = (0.3, 2.0),
) -> KillLoopReport:
    """Roll out release after release to ``devices`` simulated devices, killing the coordinator
    ``kills`` times at random points (seeded) while rollouts run; then check the invariants.

    One rollout takes at most half the kills (rounded up), so that at least two run under kills: on a
    slow machine a rollout lasts long enough to take them all, and the next rollout then never starts
    after a restart that carried the last one over."""
    per_rollout = -(-kills // 2)
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    # the release manager's key, outside the coordinator's data directory: releases are signed with it
    rm_key = workdir / "release-manager.pem"
    if not rm_key.exists():
        generate_key_file(rm_key, None)
    coordinator = CoordinatorProcess(
        workdir / "cloud",
        log_path=workdir / "coordinator.log",
        env={"FLEETLOOP_CONTROLLER_LEASE_S": f"{LEASE_S:g}"},
        init_args=[
            "--targets-key",
            str(public_pem_path(rm_key)),
            "--release-keys",
            str(workdir / "root-keys"),
        ],
    )
    coordinator.start()
    api = CoordinatorApi(coordinator, load_key_file(rm_key, None))
    swarm = Swarm(connect_rate=1000.0, connect_burst=devices)
    fleet: list[OtaDevice] = []
    rollouts: list[str] = []
    done_kills = 0
    try:
        publish_firmware(api, 1)
        for i in range(devices):
            fleet.append(
                OtaDevice(
                    f"dev-{i:03d}",
                    coordinator.grpc_target,
                    swarm,
                    install_s=rng.uniform(0.2, 1.5),
                    version="1.0.0",
                )
            )
        for d in fleet:
            d.link.start()
        _wait(
            lambda: sum(1 for d in api.call("GET", "/v1/devices") if d.get("online")) == devices,
            "devices online",
        )
        version = 1
        while done_kills < kills and len(rollouts) < max_rollouts:
            version += 1
            publish_firmware(api, version)
            policy = {
                "release": {"name": "firmware", "version": f"{version}.0.0"},
                "target": {"selector": "kind=sim"},
                "phases": list(PHASES),
                "success": {"percent": 100, "timeout": "10m", "action": "next"},
            }
            rid = str(api.call("POST", "/v1/rollouts", json.dumps(policy).encode())["id"])
            rollouts.append(rid)
            these_kills = 0
            while True:
                time.sleep(rng.uniform(*interval_s))
                state = api.call("GET", f"/v1/rollouts/{rid}")["state"]
                if state in ("SUCCEEDED", "ABORTED", "PAUSED"):
                    break
                if done_kills < kills and these_kills < per_rollout:
                    coordinator.restart()
                    done_kills += 1
                    these_kills += 1
        # let the last rollout finish without kills, then read what happened
        for rid in rollouts:
            _wait(
                lambda r=rid: api.call("GET", f"/v1/rollouts/{r}")["state"] != "RUNNING", f"{rid} to settle"
            )
        return check_rollouts(api, fleet, rollouts, done_kills, time.monotonic() - started, version)
    finally:
        for d in fleet:
            d.link.stop()
        swarm.close()
        coordinator.stop()


def publish_firmware(api: CoordinatorApi, major: int) -> None:
    image = firmware.build_image(f"{major}.0.0", HARDWARE_ID, size_hint=IMAGE_BYTES)
    publish_release(api.call, image, name="firmware", version=f"{major}.0.0", hardware=HARDWARE_ID,
                    keys=[api.release_key])  # fmt: skip


def _wait(probe: Any, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not probe():
        if time.monotonic() > deadline:
            raise UnavailableError(f"timed out waiting for {what}")
        time.sleep(0.2)


def check_rollouts(
    api: CoordinatorApi,
    fleet: Sequence[OtaDevice],
    rollouts: Sequence[str],
    kills: int,
    seconds: float,
    last: int,
) -> KillLoopReport:
    problems: list[str] = []
    beyond = lost = extra = 0
    received: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for d in fleet:
        for job_id, at in d.seen.jobs.items():
            rid, _, rest = job_id.partition(":")
            device_id, _, attempt = rest.partition("#")
            received[rid][device_id].append(at)
            if attempt or device_id != d.device_id:
                extra += 1
                problems.append(f"{d.device_id} received job {job_id} (not its first attempt)")
    for rid in rollouts:
        status = api.call("GET", f"/v1/rollouts/{rid}")
        history = api.call("GET", f"/v1/rollouts/{rid}/history")
        executions = api.call("GET", f"/v1/rollouts/{rid}/executions")
        if status["state"] != "SUCCEEDED":
            problems.append(f"{rid} ended {status['state']}: {status.get('reason', '')}")
        events = [e for e in history["events"] if e["event"] != "device" and e["event"] != "gate"]
        created = [e["at"] for e in events if e["event"] == "created"]
        phases = [e["at"] for e in events if e["event"] == "phase"]
        finished = [e for e in events if e["event"] in ("succeeded", "aborted", "paused")]
        expected = len(status["phases"]) - 1
        if len(created) != 1 or len(phases) != expected or len(finished) != 1:
            lost += 1
            problems.append(
                f"{rid}: created {len(created)}x, {len(phases)} phase openings (expected {expected}), "
                f"finished {len(finished)}x"
            )
            continue
        opened = [created[0], *phases]
        if opened != sorted(opened):
            lost += 1
            problems.append(f"{rid}: phases opened out of order")
        for e in executions:
            phase = int(e["phase"])
            if e["offered_at"] is not None and e["offered_at"] < opened[phase] - 1e-6:
                beyond += 1
                problems.append(f"{rid}: {e['device_id']} offered before phase {phase + 1} opened")
            if int(e["attempt"]) != 1:
                extra += 1
                problems.append(f"{rid}: {e['device_id']} at attempt {e['attempt']}")
            for at in received[rid].get(e["device_id"], []):
                if at < opened[phase] - 0.05:  # the device's clock is the coordinator's (one machine)
                    beyond += 1
                    problems.append(f"{rid}: {e['device_id']} received its job before phase {phase + 1}")
    stale = [d.device_id for d in fleet if d.version != f"{last}.0.0"]
    if stale:
        problems.append(f"{len(stale)} devices do not run {last}.0.0: {', '.join(stale[:5])}")
    return KillLoopReport(kills, list(rollouts), len(fleet), seconds, beyond, lost, extra, problems)
