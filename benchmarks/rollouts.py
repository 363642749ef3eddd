"""Rollout controller benchmark: the real planner, controller and metadata store, simulated devices, time
simulated.

A fleet of ``N`` devices (1,000 and 10,000) on release 1.0.0 gets 2.0.0 in three phases (2 %, 20 %,
100 %; 2 h soak each), with an abort criterion (more than 5 % of executed installs FAILED, once 20
finished → abort and roll back) and a capture-rate signal gate (harsh-braking captures per device-hour,
updated vs not-yet-updated, 99 % confidence, 20 % allowed, evaluated every 10 min). The controller ticks
once a simulated minute over SQLite (``--store memory`` for the in-memory fake); each offered device
reports IN_PROGRESS and, 2–10 min later, COMMITTED or FAILED. The fleet's data is simulated per device:
harsh-braking captures as a Poisson process, 2 per device-hour.

Scenarios: ``good`` (nothing changes), ``bad-install`` (10 % of installs fail), ``bad-signal`` (the release
brakes harshly 50 % more often: +1 per device-hour from the device's commit on).

Reported, one JSON object on stdout:

* ``evidence_to_stop_intervals``: from the moment the evidence crosses the threshold — the brake's
  criterion holds on the reports received, or the same exact test on the fleet's data at that minute
  would trip — to the rollout being stopped (paused or aborted), in gate intervals. Goal ≤ 1.
* ``devices_beyond_phase``: offers made to a device of a phase after the rollout's current one. Goal 0.
* ``false_trips``: good-release runs (100 seeds, ``--seeds``) that were stopped. Goal ≤ 1 %.
* ``controller_cpu_ms_per_1000_devices_per_tick``: CPU time of ``RolloutController.tick`` (the
  simulated fleet's data and device reports excluded), per tick, per 1,000 devices. Goal ≤ 10 ms.

Usage: ``.venv/bin/python benchmarks/rollouts.py [--sizes 1000,10000] [--seeds 100] [--store sqlite]``
"""

from __future__ import annotations

import argparse
import bisect
import json
import platform
import sys
import tempfile
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fleetloop_cloud.repositories import Repositories, memory_repositories, open_repositories
from fleetloop_cloud.repositories.records import Inventory, Registration, ReleaseRecord
from fleetloop_cloud.rollout.controller import Job, RolloutController, parse_job_id
from fleetloop_cloud.rollout.gates import rate_ratio_gate
from fleetloop_cloud.rollout.gating import Cohorts, DeviceValues, RateCounts
from fleetloop_cloud.rollout.policy_reader import parse_policy
from fleetloop_shared.update.artifact import PayloadRef, ReleaseManifest, ReleaseSigner, manifest_to_bytes

HARDWARE = "bench-hw"
TICK_S = 60.0
GATE_INTERVAL_S = 600.0
HORIZON_S = 10 * 3600.0
BASE_RATE_H = 2.0
BAD_EXTRA_RATE_H = 1.0
FAIL_SHARE = 0.10
GOAL_INTERVALS = 1.0
GOAL_FALSE_TRIP = 0.01
GOAL_CPU_MS = 10.0
GATE = {
    "name": "harsh-braking",
    "capture_rate": {"campaign": "harsh-braking"},
    "confidence": 0.99,
    "min_effect": 0.2,
    "min_exposure": "2h",
    "min_devices": 5,
    "interval": f"{GATE_INTERVAL_S:g}s",
}
POLICY = {
    "release": {"name": "fw", "version": "2.0.0"},
    "phases": [
        {"name": "canary", "percent": 2, "soak": "2h"},
        {"name": "early", "percent": 20, "soak": "2h"},
        {"name": "everyone", "percent": 100},
    ],
    "success": {"percent": 80, "timeout": "6h"},
    "abort": [
        {
            "failure_type": "FAILED",
            "threshold_percent": 5,
            "min_executed": 20,
            "action": "abort-and-roll-back",
        }
    ],
    "gates": [GATE],
}


def _release(repos: Repositories, signer: ReleaseSigner, version: str) -> None:
    sha = f"{int(version[0]):064x}"
    manifest = ReleaseManifest(
        name="fw",
        version=version,
        hardware_id=HARDWARE,
        target_sha256=sha,
        target_size=1,
        payloads=(PayloadRef("full", "none", f"files/{sha}", sha, 1, None),),
        created_unix=0,
        expires_unix=10**10,
        install="slot",
    )
    data = manifest_to_bytes(manifest)
    repos.releases.put(ReleaseRecord("fw", version, HARDWARE, data, signer.sign(data), 0.0))


@dataclass
class SimFleet:
    """The simulated devices: their job reports (through the controller, as device sessions would) and
    their harsh-braking captures (what the fleet store would hold)."""

    n: int
    scenario: str
    rng: np.random.Generator
    ids: list[str] = field(default_factory=list)
    base: dict[str, np.ndarray] = field(default_factory=dict)
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    committed: dict[str, float] = field(default_factory=dict)
    pending: list[tuple[float, str, str, str]] = field(default_factory=list)  # (at, device, job, state)
    failed_at: list[float] = field(default_factory=list)
    finished_at: list[float] = field(default_factory=list)
    beyond_phase: int = 0
    controller: RolloutController | None = None
    repos: Repositories | None = None

    def __post_init__(self) -> None:
        self.ids = [f"dev-{i:05d}" for i in range(self.n)]
        for d in self.ids:
            self.base[d] = np.sort(
                self.rng.uniform(0, HORIZON_S, self.rng.poisson(BASE_RATE_H * HORIZON_S / 3600))
            )
            if self.scenario == "bad-signal":
                k = self.rng.poisson(BAD_EXTRA_RATE_H * HORIZON_S / 3600)
                self.extra[d] = np.sort(self.rng.uniform(0, HORIZON_S, k))

    # -- the device side of the controller (JobPublisher) ---------------------------------------------
    def reachable(self) -> Collection[str]:
        return self.ids

    def publish(self, device_id: str, job: Job) -> bool:
        """A job reaches the device (the harness's own work here is not the controller's CPU)."""
        started = time.process_time()
        assert self.repos is not None
        record = self.repos.rollouts.get(job.rollout_id)
        own = record is not None and record.rollout_id == self.rollout_id
        if own and record is not None and self.phase_of[device_id] > record.phase:
            self.beyond_phase += 1
        now = self.now
        self.pending.append((now + 30.0, device_id, job.job_id, "IN_PROGRESS"))
        fails = self.scenario == "bad-install" and self.rng.random() < FAIL_SHARE
        done = now + self.rng.uniform(120.0, 600.0)
        self.pending.append((done, device_id, job.job_id, "FAILED" if fails else "COMMITTED"))
        self.harness_cpu += time.process_time() - started
        return True

    now: float = 0.0
    rollout_id: str = ""
    phase_of: dict[str, int] = field(default_factory=dict)

    def report_due(self, now: float) -> None:
        assert self.controller is not None
        self.pending.sort()
        while self.pending and self.pending[0][0] <= now:
            at, device_id, job_id, state = self.pending.pop(0)
            parsed = parse_job_id(job_id)
            self.controller.on_device_status(device_id, job_id, state, "", at, running_version="")
            if state == "COMMITTED" and parsed is not None and not parsed[0].count("-rb"):
                self.committed[device_id] = at
                self.finished_at.append(at)
            elif state == "FAILED":
                self.failed_at.append(at)
                self.finished_at.append(at)

    # -- the fleet's data (GateInputs) -----------------------------------------------------------------
    def _count(self, device_id: str, start: float, now: float) -> int:
        times = self.base[device_id]
        count = bisect.bisect_left(times, now) - bisect.bisect_left(times, start)
        since = self.committed.get(device_id)
        if since is not None and device_id in self.extra and since < now:
            extra = self.extra[device_id]
            count += bisect.bisect_left(extra, now) - bisect.bisect_left(extra, max(start, since))
        return count

    def counts(self, cohorts: Cohorts, now: float) -> RateCounts:
        t = sum(self._count(d, s, now) for d, s in cohorts.treated.items())
        c = sum(self._count(d, s, now) for d, s in cohorts.control.items())
        th = sum(max(0.0, now - s) for s in cohorts.treated.values()) / 3600.0
        ch = sum(max(0.0, now - s) for s in cohorts.control.values()) / 3600.0
        return RateCounts(t, th, c, ch)

    harness_cpu: float = 0.0

    def capture_counts(self, campaign: str, cohorts: Cohorts, now: float) -> RateCounts:
        started = time.process_time()
        try:
            return self.counts(cohorts, now)
        finally:
            self.harness_cpu += time.process_time() - started

    def device_values(self, aggregate: str, where: str, cohorts: Cohorts, now: float) -> DeviceValues:
        return DeviceValues([], [])


def _oracle_trips(fleet: SimFleet, repos: Repositories, rollout_id: str, now: float) -> bool:
    """Would the gate's test trip on the fleet's data at this minute (the evidence, whenever it is
    looked at)?"""
    from fleetloop_cloud.rollout.gating import cohorts_of

    cohorts = cohorts_of(repos.rollouts.devices(rollout_id))
    if min(len(cohorts.treated), len(cohorts.control)) < int(GATE["min_devices"]):  # type: ignore[call-overload]
        return False
    c = fleet.counts(cohorts, now)
    return bool(
        rate_ratio_gate(
            c.treated_events,
            c.treated_exposure_h,
            c.control_events,
            c.control_exposure_h,
            confidence=0.99,
            min_effect=0.2,
            min_exposure_h=2.0,
        ).decision
        == "trip"
    )


def run(n: int, scenario: str, seed: int, store: str, workdir: Path, *, oracle: bool) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    repos = (
        memory_repositories()
        if store == "memory"
        else open_repositories(workdir / f"meta-{n}-{scenario}-{seed}.sqlite")
    )
    signer = ReleaseSigner.generate()
    for version in ("1.0.0", "2.0.0"):
        _release(repos, signer, version)
    fleet = SimFleet(n, scenario, rng)
    registration = Registration("bench", {"kind": "car"}, [], "0.1.0", "simulated")
    for d in fleet.ids:
        repos.devices.register(d, registration, owner="", now=0.0)
        repos.devices.update_inventory(d, Inventory(HARDWARE, "1.0.0", "00" * 32, "a", 0), 0.0)
    ctl = RolloutController(
        repos.rollouts, repos.releases, repos.devices, fleet, gate_inputs=fleet, holder="bench"
    )
    fleet.controller, fleet.repos = ctl, repos
    rid = ctl.create(parse_policy(POLICY), now=0.0)
    fleet.rollout_id = rid
    fleet.phase_of = {d.device_id: d.phase for d in repos.rollouts.devices(rid)}
    tick_cpu: list[float] = []
    evidence_at: float | None = None
    stopped_at: float | None = None
    now = 0.0
    while now <= HORIZON_S:
        fleet.now = now
        fleet.report_due(now)
        if oracle and evidence_at is None:
            if scenario == "bad-install":
                executed = len(fleet.finished_at)
                if executed >= 20 and len(fleet.failed_at) * 100 > 5 * executed:
                    evidence_at = max(fleet.finished_at)
            elif scenario == "bad-signal" and _oracle_trips(fleet, repos, rid, now):
                evidence_at = now
        fleet.harness_cpu = 0.0
        started = time.process_time()
        ctl.tick(now)
        tick_cpu.append(time.process_time() - started - fleet.harness_cpu)
        record = repos.rollouts.get(rid)
        assert record is not None
        if record.state in ("PAUSED", "ABORTED", "SUCCEEDED"):
            stopped_at = now if record.state != "SUCCEEDED" else None
            break
        now += TICK_S
    record = repos.rollouts.get(rid)
    assert record is not None
    devices = repos.rollouts.devices(rid)
    rollbacks = [r for r in repos.rollouts.all() if r.parent_id == rid]
    out: dict[str, Any] = {
        "devices": n,
        "scenario": scenario,
        "seed": seed,
        "state": record.state,
        "phase": record.phase + 1,
        "reason": record.reason,
        "simulated_hours": round(now / 3600.0, 2),
        "ticks": len(tick_cpu),
        "devices_beyond_phase": fleet.beyond_phase,
        "devices_updated": sum(d.state == "COMMITTED" for d in devices),
        "rollback_devices": sum(len(repos.rollouts.devices(r.rollout_id)) for r in rollbacks),
        "controller_cpu_ms_per_1000_devices_per_tick": round(1000 * float(np.mean(tick_cpu)) * 1000 / n, 3),
    }
    if oracle and evidence_at is not None and stopped_at is not None:
        out["evidence_to_stop_intervals"] = round(max(0.0, stopped_at - evidence_at) / GATE_INTERVAL_S, 3)
    elif oracle and scenario != "good":
        out["evidence_to_stop_intervals"] = None
    repos.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--sizes", default="1000,10000")
    p.add_argument("--seeds", type=int, default=100, help="good-release runs (1,000 devices) for false trips")
    p.add_argument("--store", choices=("sqlite", "memory"), default="sqlite")
    p.add_argument("--seed-store", choices=("sqlite", "memory"), default="memory",
                   help="store of the seeded false-trip runs (the same controller and planner)")  # fmt: skip
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    started = time.monotonic()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fleetloop-bench-rollouts-") as tmp:
        work = Path(tmp)
        for n in sizes:
            for scenario in ("good", "bad-install", "bad-signal"):
                runs.append(run(n, scenario, 1, args.store, work, oracle=True))
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
        trips = []
        for seed in range(args.seeds):
            r = run(1000, "good", 1000 + seed, args.seed_store, work, oracle=False)
            trips.append(r["state"] != "SUCCEEDED")
    bad = [r for r in runs if r["scenario"] != "good"]
    lags = [r.get("evidence_to_stop_intervals") for r in bad]
    cpu = max(r["controller_cpu_ms_per_1000_devices_per_tick"] for r in runs)
    result = {
        "benchmark": "rollouts",
        "machine": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
        "runs": runs,
        "evidence_to_stop_intervals_max": max((x for x in lags if x is not None), default=None),
        "bad_releases_not_stopped": sum(1 for r in bad if r["state"] not in ("PAUSED", "ABORTED")),
        "devices_beyond_phase": sum(r["devices_beyond_phase"] for r in runs),
        "false_trips": {"runs": args.seeds, "tripped": sum(trips), "rate": sum(trips) / max(1, args.seeds)},
        "controller_cpu_ms_per_1000_devices_per_tick_max": cpu,
        "goals": {
            "evidence_to_stop_intervals": GOAL_INTERVALS,
            "devices_beyond_phase": 0,
            "false_trip_rate": GOAL_FALSE_TRIP,
            "controller_cpu_ms_per_1000_devices_per_tick": GOAL_CPU_MS,
        },
        "seconds": round(time.monotonic() - started, 1),
    }
    result["goals_met"] = bool(
        result["evidence_to_stop_intervals_max"] is not None
        and result["evidence_to_stop_intervals_max"] <= GOAL_INTERVALS
        and None not in lags
        and result["bad_releases_not_stopped"] == 0
        and result["devices_beyond_phase"] == 0
        and result["false_trips"]["rate"] <= GOAL_FALSE_TRIP
        and cpu <= GOAL_CPU_MS
    )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
