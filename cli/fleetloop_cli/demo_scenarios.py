"""``fleetloop demo --scenario bad-release | good-release``: a rollout that the fleet's own data decides.

A coordinator and a small fleet of simulated cars (each a real agent under its A/B bootloader, its bus
driven by the firmware it booted, :mod:`fleetloop_fwsim.vehicle`) run on loopback; every car runs
firmware v1 and the harsh-braking campaign. Firmware v2 is rolled out with a canary phase and a signal
gate on that campaign's capture rate, the canary cars (the updated cohort) against the cars not yet
offered v2 (the control cohort):

* ``bad-release`` — v2's brake controller brakes harshly four times as often. The canary's capture rate
  rises against control, the gate trips, the controller aborts the rollout and creates the roll-back to
  v1 for the canary cars by itself; the demo waits until they run v1 again.
* ``good-release`` — v2 is another build that drives like v1: the gate passes and every car ends on v2.

The cars replay their drive :data:`SPEED` times as fast as real time, so an hour of driving takes
7.5 minutes: the gate's device-hours are the coordinator's clock (captures counted by arrival), and its
rates are per hour of that clock. The summary prints each gate decision with its numbers and the SQL
that shows why, and counts devices that were offered v2 outside the phase the rollout was in.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from fleetloop_cli.client import CoordinatorClient
from fleetloop_cli.demo import (
    HARDWARE_ID,
    _mint,
    _Processes,
    _say,
    _start_cloud,
    _upload,
    _wait,
    attempt,
    exit_code,
    workspace,
)
from fleetloop_cli.output import render_rows
from fleetloop_fwsim import firmware, profiles
from fleetloop_fwsim.provisioning import provision_sim_device

SCENARIOS = ("bad-release", "good-release")
#: The scenario's fleet: enough cars that the canary and the control cohort both have a few.
CARS = 9
#: Cars in the canary phase (the rest are the control cohort until the canary passes).
CANARY = 3
#: The cars' drive plays this many times as fast as it was generated: a 4-minute drive loop takes 30 s.
SPEED = 8.0
CAMPAIGN = "hard-braking"
GATE = "harsh-braking"
FLEET = "scenario"
#: Device-minutes each cohort needs before the gate decides: two drive loops of the three canary cars.
MIN_EXPOSURE_S = 180.0


def scenario_policy(release_version: str) -> dict[str, Any]:
    """The rollout: a canary phase with the harsh-braking gate, then everyone."""
    return {
        "apiVersion": "fleetloop/v1",
        "kind": "Rollout",
        "metadata": {"name": f"firmware-{release_version}"},
        "spec": {
            "release": {"name": "firmware", "version": release_version},
            "target": {"selector": "kind=car"},
            "phases": [
                {"name": "canary", "count": CANARY, "soak": "30s"},
                {"name": "everyone"},
            ],
            "success": {"percent": 100, "timeout": "10m", "action": "next"},
            "gates": [
                {
                    "name": GATE,
                    "capture_rate": {"campaign": CAMPAIGN},
                    "confidence": 0.99,
                    "min_effect": 0.2,
                    "min_exposure": f"{MIN_EXPOSURE_S:g}s",
                    "min_devices": CANARY,
                    "interval": "5s",
                    "phases": ["canary"],
                    "action": "abort-and-roll-back",
                }
            ],
        },
    }


def why_sql(since: float, until: float, treated: list[str]) -> str:
    """The gate's question as one query a release manager can paste into ``fleetloop query``: captures
    per car from the canary's first commit to the gate's last decision, with its cohort."""
    names = ", ".join("'" + d.replace("'", "''") + "'" for d in sorted(treated)) or "''"
    return (
        "SELECT device_id, CASE WHEN device_id IN (" + names + ") THEN 'updated' ELSE 'not updated' END "
        "AS cohort, count(*) AS captures FROM captures "
        f"WHERE campaign = '{CAMPAIGN}' AND first_received >= {since:.3f} AND first_received < {until:.3f} "
        "GROUP BY device_id ORDER BY cohort DESC, device_id"
    )


def run_scenario(args: argparse.Namespace) -> int:
    scenario = str(args.scenario)
    started = time.monotonic()
    work, tmp, env = workspace(args.workdir, "fleetloop-scenario-")
    procs = _Processes()
    summary: dict[str, Any] = {
        "ok": False,
        "scenario": scenario,
        "devices": 0,
        "rollout": {"state": "not-started", "gate_decisions": [], "devices_exposed_beyond_phase": 0},
        "workdir": str(work) if args.workdir else None,
    }
    error = attempt(lambda: _play(args, work, env, procs, summary, started + float(args.timeout)))
    summary["ok"] = error is None
    summary["seconds"] = round(time.monotonic() - started, 1)
    if error:
        summary["error"] = error
    try:
        _report(summary, args)
    finally:
        procs.stop_all()
        if tmp is not None:
            tmp.cleanup()
    return exit_code(error, f"scenario {scenario}")


def _play(
    args: argparse.Namespace,
    work: Path,
    env: dict[str, str],
    procs: _Processes,
    summary: dict[str, Any],
    deadline: float,
) -> str | None:
    """The scenario's stages, filling in ``summary``; None if it did what it says, else what went
    otherwise."""
    scenario = str(args.scenario)
    verbose = not args.json
    logs = work / "logs"
    _say(verbose, f"fleetloop demo --scenario {scenario}: {CARS} simulated cars, drive at {SPEED:g}x")
    admin = _start_cloud(work, logs, env, procs, deadline)
    operator = admin.with_token(_mint(admin, "scenario-operator", "operator"))
    client = admin.with_token(_mint(admin, "scenario-release-manager", "release-manager"))
    grpc = admin.grpc  # type: ignore[attr-defined]
    v1 = firmware.build_image("1.0.0", HARDWARE_ID)
    bad = scenario == "bad-release"
    v2 = firmware.build_image(
        "2.0.0", HARDWARE_ID, variant=1, behaviour="harsh-braking" if bad else firmware.DEFAULT_BEHAVIOUR
    )
    _upload(client, v1, "1.0.0", work)
    cars = [f"car-{i:03d}" for i in range(1, CARS + 1)]
    for device_id in cars:
        _start_car(device_id, work, logs, env, procs, grpc)
    summary["devices"] = len(cars)
    _upload(client, v2, "2.0.0", work)  # the delta from v1 is built while the cars boot
    what = "brakes harshly 4x as often" if bad else "drives like v1"
    _say(verbose, f"firmware v1 on {len(cars)} cars; v2 uploaded ({what})")

    def online() -> list[Any] | None:
        devs = client.get("/v1/devices")
        return devs if sum(1 for d in devs if d.get("online")) == len(cars) else None

    _wait("all cars to connect", online, deadline, procs)
    operator.request(
        "POST",
        f"/v1/campaigns?source={CAMPAIGN}.yaml",
        body=profiles.hard_braking_campaign(CAMPAIGN).encode(),
        content_type="text/yaml",
    )
    _say(verbose, f"{len(cars)} cars connected; campaign {CAMPAIGN} applied")
    _say(verbose, f"rollout of v2: canary {CANARY} cars with gate {GATE}, then everyone")
    rid = str(client.post_json("/v1/rollouts", scenario_policy("2.0.0"))["id"])
    summary["rollout"]["id"] = rid
    final = _follow(client, rid, verbose, deadline, procs)
    ro = summary["rollout"]
    ro.update(_outcome(client, final))
    if bad and ro["rollback"]:
        rb = _follow(client, ro["rollback"]["id"], verbose, deadline, procs)
        ro["rollback"]["state"] = str(rb["state"]).lower()
    running = {d["device_id"]: d.get("firmware_version", "") for d in client.get("/v1/devices")}
    ro["devices_on_v2"] = sorted(d for d, v in running.items() if v == "2.0.0")
    ro["devices_on_v1"] = sorted(d for d, v in running.items() if v == "1.0.0")
    executions = client.get(f"/v1/rollouts/{rid}/executions")
    treated = [e["device_id"] for e in executions if e["phase"] == 0]
    since = min((e["changed_at"] for e in executions if e["state"] == "COMMITTED"), default=0.0)
    decided = max((e["at"] for e in ro["gate_decisions"]), default=time.time())
    sql = why_sql(since, decided, treated)
    result = client.post_json("/v1/query", {"sql": sql})
    summary["sql"] = sql
    summary["sql_rows"] = result["rows"]
    if verbose:
        _print_decisions(ro, sql, result)
    return _verdict(scenario, ro, cars)


def _start_car(
    device_id: str, work: Path, logs: Path, env: dict[str, str], procs: _Processes, grpc: str
) -> None:
    device = provision_sim_device(
        work / "devices" / device_id,
        device_id=device_id,
        kind="car",
        hardware_id=HARDWARE_ID,
        cloud={"grpc": grpc},
        trust_files=[work / "cloud" / "keys" / f"{repo}-root.json" for repo in ("image", "director")],
        recordings=None,
        fleet=FLEET,
        labels={"kind": "car", "hw": "gen1"},
        replay_speed=SPEED,
    )
    argv = [sys.executable, "-m", "fleetloop_cli.main", "sim", "device", "--dir", str(device.directory)]
    argv += ["--config", str(device.config_path)]
    # Each reboot starts a fresh agent process, whose first capture would compile the segment codec's
    # numba kernels (seconds, on a loaded machine tens of seconds, with captures held back meanwhile):
    # the cars encode with the numpy path, which is the same format, so the canary's data flows at once.
    car_env = {**env, "FLEETLOOP_NO_NUMBA": "1"}
    procs.start(device_id, argv, logs / f"{device_id}.log", car_env, tier=2)


def _follow(
    client: CoordinatorClient, rid: str, verbose: bool, deadline: float, procs: _Processes
) -> dict[str, Any]:
    """Wait until the rollout settles, printing each change of its state, phase and device counts."""
    last = ""

    def settled() -> dict[str, Any] | None:
        nonlocal last
        st: dict[str, Any] = client.get(f"/v1/rollouts/{rid}")
        counts = ", ".join(f"{k.lower()} {v}" for k, v in sorted(st["counts"].items()) if v)
        gate = next((g for g in st.get("gates", []) if g["gate"] == GATE), None)
        line = f"  {rid} {st['state']} phase {st['phase'] + 1} ({st['phase_name']}): {counts}"
        if gate is not None:
            line += f"; gate {gate['decision']}"
        if line != last:
            _say(verbose, line)
            last = line
        return st if st["state"] in ("SUCCEEDED", "PAUSED", "ABORTED") else None

    return _wait(f"rollout {rid} to settle", settled, deadline, procs)


def _outcome(client: CoordinatorClient, final: dict[str, Any]) -> dict[str, Any]:
    """What the summary says of the rollout: its state, every gate decision with its numbers, its
    roll-back, and the devices offered v2 outside the phase the rollout reached."""
    rid = final["id"]
    history = client.get(f"/v1/rollouts/{rid}/history")
    decisions = [
        {
            "gate": e["gate"],
            "phase": e["phase"],
            "at": e["at"],
            "decision": e["decision"],
            "statistic": e["statistic"],
            "p_value": e["p_value"],
            "effect": e["effect"],
            "reason": e["reason"],
            "inputs": e["inputs"],
        }
        for e in history["gate_evaluations"]
        if e["decision"] != "insufficient"
    ]
    beyond = [
        d["device_id"] for d in final["devices"] if d["phase"] > final["phase"] and d["state"] != "PENDING"
    ]
    audit = [  # the rollout's own trail, but its per-device steps and the gate's waiting for data
        {"at": e["at"], "event": e["event"], "detail": e["detail"]}
        for e in history["events"]
        if e["event"] != "device" and not (e["event"] == "gate" and ": insufficient (" in e["detail"])
    ]
    rollback = None
    if final.get("rollbacks"):
        rb = client.get(f"/v1/rollouts/{final['rollbacks'][0]}")
        devices = [d["device_id"] for d in rb["devices"]]
        rollback = {"id": rb["id"], "state": str(rb["state"]).lower(), "devices": devices}
    return {
        "state": str(final["state"]).lower(),
        "phase": final["phase_name"],
        "reason": final.get("reason", ""),
        "gate_decisions": decisions,
        "gate_evaluations": len(history["gate_evaluations"]),
        "devices_exposed_beyond_phase": len(beyond),
        "canary": sorted(d["device_id"] for d in final["devices"] if d["phase"] == 0),
        "rollback": rollback,
        "audit": audit,
    }


def _verdict(scenario: str, ro: dict[str, Any], cars: list[str]) -> str | None:
    """None if the scenario did what it says, else what went otherwise."""
    decisions = [d["decision"] for d in ro["gate_decisions"]]
    if ro["devices_exposed_beyond_phase"]:
        return f"{ro['devices_exposed_beyond_phase']} devices were offered v2 beyond the rollout's phase"
    if scenario == "bad-release":
        if ro["state"] != "aborted" or "trip" not in decisions:
            return f"the bad release was not stopped by its gate: rollout {ro['state']}, gate {decisions}"
        if ro["rollback"] is None or ro["rollback"]["state"] != "succeeded":
            return f"the canary was not rolled back: {ro['rollback']}"
        if ro["devices_on_v2"] or sorted(ro["devices_on_v1"]) != sorted(cars):
            return f"cars still on v2 after the roll-back: {ro['devices_on_v2']}"
        return None
    if ro["state"] != "succeeded" or "trip" in decisions or "pass" not in decisions:
        return f"the good release did not go through: {ro['state']} ({ro['reason']}), gate {decisions}"
    if sorted(ro["devices_on_v2"]) != sorted(cars):
        return f"not every car runs v2: {ro['devices_on_v2']}"
    return None


def _print_decisions(ro: dict[str, Any], sql: str, result: dict[str, Any]) -> None:
    for d in ro["gate_decisions"]:
        print(f"\ngate {d['gate']} (phase {d['phase'] + 1}): {d['decision']} — {d['reason']}", flush=True)
    if ro["rollback"]:
        rb = ro["rollback"]
        print(f"\nroll-back {rb['id']}: {rb['state']}, {', '.join(rb['devices'])} back on v1", flush=True)
    print(f'\nwhy, in SQL:\n$ fleetloop query "{sql}"', flush=True)
    print(render_rows(result["columns"], result["rows"], "table"), flush=True)


def _report(summary: dict[str, Any], args: argparse.Namespace) -> None:
    """One JSON object with ``--json``, else one line (the stages printed the rest as they went)."""
    ro = summary["rollout"]
    if args.json:
        print(json.dumps(summary), flush=True)
        return
    print(
        f"\nsummary: scenario {summary['scenario']}, {summary['devices']} cars; rollout {ro['state']}"
        f" in phase {ro.get('phase', '-')}; gate decisions "
        f"{[d['decision'] for d in ro['gate_decisions']]}; devices offered v2 beyond the phase: "
        f"{ro['devices_exposed_beyond_phase']}; {summary['seconds']} s",
        flush=True,
    )
