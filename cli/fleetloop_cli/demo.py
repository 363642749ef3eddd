"""``fleetloop demo``: the whole loop on one machine, as separate processes on loopback.

A coordinator and four simulated machines are started, each agent on live sources exactly as on a real
machine; only the far side of each bus is simulated (``fleetloop sim far-side``, one process per machine):
a car reading a CAN bus that its ECU drives with the comma2k19 frames, plus OBD-II over ISO-TP from its
engine ECU; a robot whose controller pushes the x-io IMU through the push API; a PLC gateway polling a
Modbus server that plays the SKAB pump; a home hub reading zigbee2mqtt devices from its own mosquitto.
Without the recordings the far sides play firmware-sim's generated signals. A campaign per kind is
applied; captures are waited for and queried with SQL; then firmware v2 is uploaded (the cloud builds a
delta from the installed v1) and rolled out in two phases. The summary tells the truth: a rollback or a
failed download shows up as such, with the reason, and makes the demo exit non-zero.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from fleetloop_cli.client import CoordinatorClient
from fleetloop_cli.output import render_rows
from fleetloop_cli.release_commands import upload_release
from fleetloop_fwsim import firmware, profiles
from fleetloop_fwsim.provisioning import provision_sim_device
from fleetloop_shared.datapaths import find_recordings
from fleetloop_shared.errors import FleetloopError, NotFoundError, StateError, UnavailableError
from fleetloop_shared.update.release_keys import generate_key_file, load_key_file, public_pem_path

HARDWARE_ID = "fleetloop-sim-gen1"
FLEET = "demo"
#: The demo's release manager's key, in the workdir (never in the coordinator's data directory).
RELEASE_KEY = "release-manager.pem"
DEVICES = (("car-001", "car"), ("robot-001", "robot"), ("plc-001", "plc"), ("hub-001", "hub"))
#: The far sides play their data this many times as fast as it was recorded.
REPLAY_SPEED = 2.0
VIN, POSITIONS = "Vehicle.VehicleIdentification.VIN", "Vehicle.CurrentLocation.*"
#: More than a kind's default campaign collects on a live machine: the car's OBD-II signals, its VIN
#: and its GNSS position.
EXTRA_SIGNALS = {"car": ("Vehicle.OBD.*", VIN, POSITIONS)}
#: The car campaign's privacy policy (docs/privacy.md): the VIN hashed under the fleet's key, positions
#: snapped to the centre of their 0.01° cell (about 1.1 km north-south) before anything is stored.
GRID_DEG = 0.01
PRIVACY = {"car": {"name": "demo-car", "version": 1, "hash": [VIN],
                   "coarsen": {"position": {"grid": GRID_DEG}}}}  # fmt: skip
#: What the store holds of the car's VIN and positions: hashed / clear VIN values, positions, and
#: positions off their cell's centre (by more than float rounding).
PRIVACY_QUERY = (
    f"SELECT count(*) FILTER (WHERE signal = '{VIN}' AND value_str LIKE 'h:%'), "
    f"count(*) FILTER (WHERE signal = '{VIN}' AND (value_str IS NULL OR value_str NOT LIKE 'h:%')), "
    "count(*) FILTER (WHERE signal LIKE 'Vehicle.CurrentLocation.%'), "
    f"count(*) FILTER (WHERE signal LIKE 'Vehicle.CurrentLocation.%' AND "
    f"abs(value / {GRID_DEG} - floor(value / {GRID_DEG}) - 0.5) > 1e-6) "
    "FROM samples WHERE device_id = '{device}'"
)
T = TypeVar("T")

QUERY = (
    "SELECT device_id, campaign, count(DISTINCT capture_id) AS captures, count(DISTINCT signal) AS signals, "
    "count(*) AS samples, round(avg(value), 2) AS avg_value FROM samples "
    "GROUP BY device_id, campaign ORDER BY device_id, campaign"
)


class DemoFailed(FleetloopError, exit_code=1):
    """The demo could not complete a stage; the message says which and why."""


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Ctrl-C inside the block is raised when it ends, not inside it.

    A KeyboardInterrupt raised inside ``Popen`` (after the child was started, before it returned) would
    leave a child nobody knows of, still running after the demo exits; deferring it past the line that
    records the child lets :meth:`_Processes.stop_all` stop it like the others."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


class _Processes:
    """Child processes of the demo, each in its own process group, all stopped on exit: the last tier
    started first (the agents before the far sides of their buses, those before the coordinator), so
    none sees its peer vanish while it is still running."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._tiers: dict[int, int] = {}

    def start(
        self, name: str, argv: list[str], log: Path, env: dict[str, str], *, tier: int = 0
    ) -> subprocess.Popen[bytes]:
        fh = open(log, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        with _interrupts_deferred():
            proc = subprocess.Popen(
                argv,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
            self.procs.append((name, proc))
            self._tiers[proc.pid] = tier
        fh.close()
        return proc

    def stop_all(self) -> None:
        for tier in sorted(set(self._tiers.values()), reverse=True):
            self._stop([p for _, p in self.procs if self._tiers[p.pid] == tier])

    @staticmethod
    def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise DemoFailed(f"{name} exited with code {proc.returncode} (see its log)")


def _wait(what: str, probe: Callable[[], T | None], deadline: float, procs: _Processes) -> T:
    while True:
        procs.check_alive()
        try:
            result = probe()
        except UnavailableError:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise DemoFailed(f"timed out waiting for {what}")
        time.sleep(0.5)


def _say(enabled: bool, text: str) -> None:
    if enabled:
        print(text, flush=True)


def run_demo(args: argparse.Namespace) -> int:
    started = time.monotonic()
    deadline = started + float(args.timeout)
    verbose = not args.json
    recordings = None if args.simulated else find_recordings(args.data)
    origin_text = (
        f"recordings in {recordings}"
        if recordings
        else "simulated signals" + ("" if args.simulated else " (no recordings found)")
    )
    work, tmp, env = workspace(args.workdir, "fleetloop-demo-")
    logs = work / "logs"
    procs = _Processes()
    broker: Any = None
    summary_transport = getattr(args, "transport", "grpc")
    summary: dict[str, Any] = {
        "ok": False,
        "data": "recordings" if recordings else "simulated",
        "devices": 0,
        "campaigns": 0,
        "captures_ingested": 0,
        "samples_ingested": 0,
        "query_rows": 0,
        "rollout": {
            "state": "not-started",
            "phases": 0,
            "devices_updated": 0,
            "delta_bytes": 0,
            "full_bytes": 0,
        },
        "workdir": str(work) if args.workdir else None,
        "transport": summary_transport,
    }
    error: str | None = None
    serving: tuple[str, str] | None = None  # the console's URL and a viewer token, with --serve
    try:
        _say(verbose, f"fleetloop demo — data: {origin_text}")
        mqtt_args: list[str] = []
        if getattr(args, "transport", "grpc") == "mqtt":  # devices over MQTT 5 via a private broker
            from fleetloop_fwsim.broker import MosquittoProcess

            broker = MosquittoProcess(work / "broker")
            # certificates (CN = identity) registered with the broker: the coordinator in the group of
            # coordinators, each device in the demo's fleet
            ca, (ccert, ckey) = broker.ca, broker.add_coordinator("coordinator")
            broker.add_devices(FLEET, [device_id for device_id, _ in DEVICES])
            broker.start()
            mqtt_args = [f"--mqtt=127.0.0.1:{broker.port}", f"--mqtt-ca={ca.ca_path}"]
            mqtt_args += [f"--mqtt-cert={ccert}", f"--mqtt-key={ckey}"]
            _say(verbose, f"MQTT 5 broker (TLS, a role per device) on 127.0.0.1:{broker.port}")
        admin = _start_cloud(work, logs, env, procs, deadline, extra=mqtt_args)
        # Least privilege, as an operator team would run it: campaigns with an operator token, releases
        # and rollouts with a release manager's; the admin token from init only makes those two.
        operator = admin.with_token(_mint(admin, "demo-operator", "operator"))
        client = admin.with_token(_mint(admin, "demo-release-manager", "release-manager"))
        client.grpc = admin.grpc  # type: ignore[attr-defined]
        if broker is not None:
            client.mqtt = {  # type: ignore[attr-defined]
                "host": "127.0.0.1",
                "port": broker.port,
                "ca": str(broker.ca.ca_path),
                "cert": str(broker.ca.dir / "{device_id}.pem"),
                "key": str(broker.ca.dir / "{device_id}.key"),
            }
        _say(
            verbose,
            f"coordinator up at {client.base} (tokens: admin from cloud init, an operator, "
            "a release manager)",
        )
        if getattr(args, "serve", False):
            serving = (client.base, _mint(admin, "demo-viewer", "viewer"))

        v1 = firmware.build_image("1.0.0", HARDWARE_ID)
        v2 = firmware.build_image("2.0.0", HARDWARE_ID, variant=1)
        _upload(client, v1, "1.0.0", work)
        _say(verbose, f"firmware v1 ({len(v1):,} bytes) released and installed on the devices")

        devices, skipped = _machines()
        for device_id, why in skipped.items():
            _say(verbose, f"{device_id} left out: {why}")
        if skipped:
            summary["skipped"] = skipped
        sides = _start_far_sides(devices, work, logs, env, procs, recordings, deadline)
        machines: dict[str, dict[str, Any]] = {}
        legacy = getattr(args, "fldelta1_devices", 0)
        for i, (device_id, kind) in enumerate(devices):
            side = sides[device_id]
            _start_device(
                device_id,
                kind,
                work,
                logs,
                env,
                procs,
                (side["sources"], side["data"]),
                client,
                bad_health=("bad-health" in args.inject and kind == "car"),
                fldelta1_only=i < legacy,
            )
            machines[device_id] = {
                "kind": kind,
                "data": side["data"],
                "far_side": side["description"],
                "sources": {src["name"]: src["kind"] for src in side["sources"]},
            }
        summary["machines"] = machines
        summary["devices"] = len(devices)

        def online() -> list[Any] | None:
            devs = client.get("/v1/devices")
            return devs if sum(1 for d in devs if d.get("online")) == len(devices) else None

        connected = _wait("all devices to connect", online, deadline, procs)
        for dev in connected:
            if dev["device_id"] in machines:
                machines[dev["device_id"]]["origin"] = dev.get("data_origin", "")
        _say(verbose, f"{len(devices)} devices connected, each agent on live sources:")
        for device_id, m in machines.items():
            _say(verbose, f"  {device_id:<9} {m['kind']:<5} {m.get('origin', '?'):<4} {m['far_side']}")

        kinds = sorted({k for _, k in devices})
        for kind in kinds:
            campaign = profiles.default_campaign(kind, EXTRA_SIGNALS.get(kind, ()), PRIVACY.get(kind))
            operator.request(
                "POST",
                f"/v1/campaigns?source=demo-{kind}.yaml",
                body=campaign.encode(),
                content_type="text/yaml",
            )
        summary["campaigns"] = len(kinds)
        _say(verbose, f"{summary['campaigns']} campaigns applied; waiting for captures …")

        def captured() -> list[Any] | None:
            caps = client.get("/v1/captures")
            devices_with = {c["device_id"] for c in caps}
            return caps if devices_with >= {d for d, _ in devices} else None

        _wait("a capture from every device", captured, deadline, procs)
        time.sleep(1.0)  # let the segments of the last captures land
        totals = client.get("/v1/summary")
        summary["captures_ingested"] = totals["captures_ingested"]
        summary["samples_ingested"] = totals["samples_ingested"]
        _say(
            verbose,
            f"{totals['captures_ingested']} captures, {totals['samples_ingested']:,} samples ingested",
        )

        result = client.post_json("/v1/query", {"sql": QUERY})
        summary["query_rows"] = len(result["rows"])
        caps = client.get("/v1/captures")
        for device_id, m in machines.items():
            m["captures"] = len({c["capture_id"] for c in caps if c["device_id"] == device_id})
            m["samples"] = sum(int(r[4]) for r in result["rows"] if r[0] == device_id)
        summary["query"] = QUERY
        _say(
            verbose,
            f'\n$ fleetloop query "{QUERY}"\n' + render_rows(result["columns"], result["rows"], "table"),
        )

        # read back as the admin: a release manager's view withholds the VIN (personal) and coarsens
        # positions itself, which would hide what the device's policy did (the read is recorded)
        summary["privacy"] = _privacy(admin, machines)
        for kind, p in summary["privacy"].items():
            _say(verbose, f"privacy: {kind} policy {p['policy']} — VIN hashed ({p['vin_hashed']} values, "
                          f"{p['vin_clear']} in clear), positions coarsened to {GRID_DEG}° cells (≈1.1 km; "
                          f"{p['positions']} positions, {p['positions_off_grid']} off grid)")  # fmt: skip

        release = _upload(client, v2, "2.0.0", work)
        full = next(p["size"] for p in release["payloads"] if p["kind"] == "full")
        deltas = [p["size"] for p in release["payloads"] if p["kind"] == "delta"]
        summary["rollout"].update(full_bytes=full, delta_bytes=min(deltas) if deltas else full)
        _say(
            verbose,
            f"\nfirmware v2 uploaded: full {full:,} bytes, delta from v1 "
            f"{summary['rollout']['delta_bytes']:,} bytes",
        )
        if "corrupt-artifact" in args.inject:
            _corrupt_payloads(work, release)
            _say(verbose, "injected: the stored delta is corrupted after signing")

        status = client.post_json(
            "/v1/rollouts",
            {
                "release_version": "2.0.0",
                "selector": "hw=gen1",
                "phases": [{"name": "canary", "percent": 33}, {"name": "everyone", "percent": 100}],
                "max_failure_percent": 20,
                "success_percent": 100,
            },
        )
        rid = status["id"]
        _say(verbose, f"rollout {rid} started: 2 phases (canary 33 %, then everyone)")
        last_line = ""

        def finished() -> dict[str, Any] | None:
            nonlocal last_line
            st: dict[str, Any] = client.get(f"/v1/rollouts/{rid}")
            line = f"  rollout {st['state']} phase {st['phase'] + 1}: " + ", ".join(
                f"{d['device_id']}={d['state']}" for d in st["devices"]
            )
            if line != last_line:
                _say(verbose, line)
                last_line = line
            return st if st["state"] in ("SUCCEEDED", "PAUSED", "ABORTED") else None

        final = _wait("the rollout to finish", finished, deadline, procs)
        summary["rollout"]["payloads"] = {d: _directed_payload(client, d) for d, _ in devices}
        devices_after = client.get("/v1/devices")
        updated = [d["device_id"] for d in devices_after if d.get("firmware_version") == "2.0.0"]
        ro = summary["rollout"]
        ro.update(
            id=rid,
            state=str(final["state"]).lower(),
            phases=len(final.get("phases", [])) or 2,
            devices_updated=len(updated),
            reason=final.get("reason", ""),
            devices={
                d["device_id"]: {"state": d["state"], "reason": d.get("reason", "")} for d in final["devices"]
            },
        )
        if ro["state"] != "succeeded":
            error = f"rollout {ro['state']}: {ro['reason'] or 'see devices'}"
        elif len(updated) != len(devices):
            error = f"rollout reported success but only {len(updated)} devices run v2"
        elif summary["captures_ingested"] <= 0 or summary["query_rows"] <= 0:
            error = "no captures were ingested"
        elif any(p["vin_clear"] or p["positions_off_grid"] for p in summary["privacy"].values()):
            error = f"the store holds what a privacy policy keeps on the device: {summary['privacy']}"
        elif any(m.get("origin") != "live" for m in machines.values()):
            error = "a device did not run on live sources: " + ", ".join(
                f"{d}={m.get('origin')}" for d, m in machines.items() if m.get("origin") != "live"
            )
        summary["ok"] = error is None
    except FleetloopError as exc:
        error = str(exc)
    except KeyboardInterrupt:
        error = "interrupted"
    finally:
        summary["seconds"] = round(time.monotonic() - started, 1)
        if error:
            summary["error"] = error
        try:
            _report(summary, args)
            if getattr(args, "serve", False) and serving is not None and error is None:
                error = _serve(serving, procs)
        finally:
            procs.stop_all()
            if broker is not None:
                broker.stop()
            if tmp is not None:
                tmp.cleanup()
    return exit_code(error, "demo")


def _privacy(client: CoordinatorClient, machines: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per kind with a privacy policy, what its device's data in the store shows of it: the policy its
    captures were taken under, its VIN values hashed and in clear, its positions and those off grid."""
    out: dict[str, dict[str, Any]] = {}
    caps = client.get("/v1/captures")
    for device_id, m in machines.items():
        policy = PRIVACY.get(m["kind"])
        if policy is None:
            continue
        rows = client.post_json("/v1/query", {"sql": PRIVACY_QUERY.format(device=device_id)})["rows"]
        hashed, clear, positions, off_grid = (int(v or 0) for v in rows[0])
        stamps = sorted({str(c.get("privacy", "")).split("#")[0] for c in caps
                         if c["device_id"] == device_id})  # fmt: skip
        out[m["kind"]] = {"policy": f"{policy['name']}@{policy['version']}", "stamps": stamps,
                          "vin_hashed": hashed, "vin_clear": clear, "positions": positions,
                          "positions_off_grid": off_grid, "grid_deg": GRID_DEG}  # fmt: skip
    return out


def attempt(stages: Callable[[], str | None]) -> str | None:
    """Run a demo's stages: None when they did what they say, else why not (a FleetloopError's
    message, or "interrupted" on Ctrl-C)."""
    try:
        return stages()
    except FleetloopError as exc:
        return str(exc)
    except KeyboardInterrupt:
        return "interrupted"


def exit_code(error: str | None, what: str) -> int:
    """0, or the error on stderr and 1 (130 when interrupted)."""
    if error is None:
        return 0
    print(f"error: {what} failed: {error}", file=sys.stderr, flush=True)
    return 130 if error == "interrupted" else 1


def workspace(
    workdir: str | None, prefix: str
) -> tuple[Path, tempfile.TemporaryDirectory[str] | None, dict[str, str]]:
    """The demo's directory (``--workdir``, kept; else a temporary one to clean up), with ``logs/`` in
    it, and the environment of its child processes (unbuffered, so their logs are complete)."""
    tmp = None
    if workdir:
        work = Path(workdir).resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix=prefix)
        work = Path(tmp.name)
    (work / "logs").mkdir(exist_ok=True)
    return work, tmp, {**os.environ, "PYTHONUNBUFFERED": "1"}


def _report(summary: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(summary), flush=True)
        return
    ro = summary["rollout"]
    print(
        f"\nsummary: {summary['devices']} devices ({summary['data']}), {summary['captures_ingested']} "
        f"captures / {summary['samples_ingested']:,} samples ingested, "
        f"{summary['query_rows']} query rows; "
        f"rollout {ro['state']}: {ro['devices_updated']}/{summary['devices']} devices on v2, delta "
        f"{ro['delta_bytes']:,} of {ro['full_bytes']:,} bytes; {summary['seconds']} s",
        flush=True,
    )
    for kind, p in summary.get("privacy", {}).items():
        print(f"  privacy: {kind} policy {p['policy']} — VIN hashed ({p['vin_hashed']} values, "
              f"{p['vin_clear']} in clear), positions coarsened to {p['grid_deg']}° cells (≈1.1 km)",
              flush=True)  # fmt: skip
    for device_id, m in summary.get("machines", {}).items():
        sources = " + ".join(f"{name} ({kind})" for name, kind in m["sources"].items())
        print(
            f"  {device_id:<9} {m['kind']:<5} {m.get('origin', '?')} sources {sources}: "
            f"{m.get('captures', 0)} captures, {m.get('samples', 0):,} samples",
            flush=True,
        )
    for device_id, dev in sorted(ro.get("devices", {}).items()):
        if dev["state"] not in ("COMMITTED", "PENDING"):
            print(f"  {device_id}: {dev['state']} — {dev['reason']}", flush=True)


def _serve(serving: tuple[str, str], procs: _Processes) -> str | None:
    """``demo --serve``: keep the coordinator and the devices running until Ctrl-C (or SIGTERM), with the
    console's address and a viewer token on screen; why it stopped early, if one of them died."""
    url, viewer = serving
    print(
        f"\nconsole: {url}/  (sign in with this viewer token: {viewer})\n"
        "the coordinator and the devices keep running; Ctrl-C stops them",
        flush=True,
    )
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        while not stop.wait(1.0):
            procs.check_alive()
    except KeyboardInterrupt:
        pass
    except DemoFailed as exc:
        return str(exc)
    finally:
        signal.signal(signal.SIGTERM, previous)
        print("stopping the coordinator and the devices", flush=True)
    return None


def _start_cloud(
    work: Path, logs: Path, env: dict[str, str], procs: _Processes, deadline: float, extra: Sequence[str] = ()
) -> CoordinatorClient:
    from fleetloop_cloud.ota.tuf_repository import ImageKeyCustody
    from fleetloop_cloud.server import initialise

    ready = work / "cloud.ready"
    ready.unlink(missing_ok=True)
    cloud_dir = work / "cloud"
    # the release manager's key lives in the workdir, not in the coordinator's data directory: what
    # `fleetloop keys generate` makes on a release manager's machine (unencrypted: a demo)
    rm_key = work / RELEASE_KEY
    if not rm_key.exists():
        generate_key_file(rm_key, None)
    # what `fleetloop cloud init --dir --targets-key` does: the data directory, its online keys and the
    # first admin token, which stays in this process's memory (a kept workdir is initialised once; later
    # runs recover); the image repository's root keys go to the workdir too
    custody = ImageKeyCustody(
        release_keys=work / "release-keys", targets_key_files=(public_pem_path(rm_key),)
    )
    admin = initialise(cloud_dir, recover=(cloud_dir / "metadata.sqlite").exists(), custody=custody)
    procs.start(
        "coordinator",
        [
            sys.executable,
            "-m",
            "fleetloop_cli.main",
            "cloud",
            "serve",
            "--dir",
            str(work / "cloud"),
            "--grpc-port",
            "0",
            "--http-port",
            "0",
            "--ready-file",
            str(ready),
            *extra,
        ],
        logs / "cloud.log",
        env,
    )
    info = _wait(
        "the coordinator to start",
        lambda: json.loads(ready.read_text()) if ready.exists() else None,
        min(deadline, time.monotonic() + 30),
        procs,
    )
    client = CoordinatorClient(info["http"], token=admin.secret)
    client.grpc = info["grpc"]  # type: ignore[attr-defined]
    return client


def _mint(admin: CoordinatorClient, name: str, role: str) -> str:
    """A token of ``role`` for the demo's own use (a kept workdir gets a fresh name each run)."""
    taken = {t["name"] for t in admin.get("/v1/tokens")}
    unique = name if name not in taken else f"{name}-{int(time.time())}"
    return str(admin.post_json("/v1/tokens", {"name": unique, "role": role})["token"])


def _cloud_config(client: CoordinatorClient, device_id: str) -> dict[str, Any]:
    """The agent's ``cloud:`` section: gRPC, or MQTT 5 with the device's own certificate (CN = id)."""
    mqtt = getattr(client, "mqtt", None)
    if mqtt is None:
        return {"grpc": client.grpc}  # type: ignore[attr-defined]
    m = {k: (v.replace("{device_id}", device_id) if isinstance(v, str) else v) for k, v in mqtt.items()}
    return {"transport": "mqtt", "grpc": client.grpc, "mqtt": m}  # type: ignore[attr-defined]


def _upload(client: CoordinatorClient, image: bytes, version: str, work: Path) -> dict[str, Any]:
    """What `fleetloop artifacts upload --key` does: the release manager signs the targets here."""
    key = load_key_file(work / RELEASE_KEY, None)
    result: dict[str, Any] = upload_release(
        client, image, name="firmware", version=version, hardware=HARDWARE_ID, keys=[key]
    )
    return result


def _start_device(
    device_id: str,
    kind: str,
    work: Path,
    logs: Path,
    env: dict[str, str],
    procs: _Processes,
    live: tuple[list[dict[str, Any]], str],
    client: CoordinatorClient,
    *,
    bad_health: bool,
    fldelta1_only: bool = False,
) -> None:
    device = provision_sim_device(
        work / "devices" / device_id,
        device_id=device_id,
        kind=kind,
        hardware_id=HARDWARE_ID,
        cloud=_cloud_config(client, device_id),
        # TUF trust anchors: the image repository's and the director's roots
        trust_files=[work / "cloud" / "keys" / f"{repo}-root.json" for repo in ("image", "director")],
        recordings=None,
        live=live,
        fleet=FLEET,
        labels={"kind": kind, "hw": "gen1"},
        health_fail_versions=["2.0.0"] if bad_health else [],
        # an agent that reads only FLDELTA1, as agents did before FLDELTA2
        extra={"ota": {"delta_formats": ["fldelta1"]}} if fldelta1_only else None,
    )
    ddir, cfg = device.directory, device.config_path
    procs.start(
        device_id,
        [
            sys.executable,
            "-m",
            "fleetloop_cli.main",
            "sim",
            "device",
            "--dir",
            str(ddir),
            "--config",
            str(cfg),
        ],
        logs / f"{device_id}.log",
        env,
        tier=2,
    )


def _machines() -> tuple[list[tuple[str, str]], dict[str, str]]:
    """The demo's machines, and those left out with the reason: the home hub needs mosquitto for its
    own broker (the other three need nothing installed)."""
    from fleetloop_fwsim.broker import mosquitto_binary

    if mosquitto_binary() is not None:
        return list(DEVICES), {}
    skipped = {d: "its broker needs mosquitto (apt-get install mosquitto)" for d, k in DEVICES if k == "hub"}
    return [(d, k) for d, k in DEVICES if d not in skipped], skipped


def _start_far_sides(
    devices: Sequence[tuple[str, str]],
    work: Path,
    logs: Path,
    env: dict[str, str],
    procs: _Processes,
    recordings: Path | None,
    deadline: float,
) -> dict[str, dict[str, Any]]:
    """Start the far side of every machine's bus (all at once), and wait until each announces the
    ``sources:`` entries that reach it."""
    ready: dict[str, Path] = {}
    for device_id, kind in devices:
        directory = work / "machines" / device_id
        directory.mkdir(parents=True, exist_ok=True)
        ready[device_id] = directory / "ready.json"
        ready[device_id].unlink(missing_ok=True)
        argv = [sys.executable, "-m", "fleetloop_cli.main", "sim", "far-side", "--kind", kind]
        argv += ["--dir", str(directory), "--ready-file", str(ready[device_id]), "--speed", str(REPLAY_SPEED)]
        if recordings is not None:
            argv += ["--data", str(recordings)]
        if kind == "robot":  # short: a UNIX socket's path is limited to 107 bytes
            argv += ["--socket", str(work / f"{device_id}.sock")]
        procs.start(f"{device_id} far side", argv, logs / f"{device_id}-far-side.log", env, tier=1)
    sides: dict[str, dict[str, Any]] = {}
    for device_id, path in ready.items():
        sides[device_id] = _wait(
            f"the far side of {device_id}",
            lambda p=path: json.loads(p.read_text()) if p.exists() else None,  # type: ignore[misc]
            min(deadline, time.monotonic() + 60),
            procs,
        )
    return sides


def _directed_payload(client: CoordinatorClient, device_id: str) -> str:
    """What the director sent this device for its job: the delta's format, "full", or "none" (no job:
    a paused rollout never reached it)."""
    try:
        signed = client.get(f"/tuf/director/{device_id}/targets.json").get("signed", {})
    except NotFoundError:
        return "none"
    facts = [t.get("custom", {}).get("fleetloop", {}) for t in signed.get("targets", {}).values()]
    return next((str(f.get("algorithm")) for f in facts if f.get("kind") == "delta"), "full")


def _corrupt_payloads(work: Path, release: dict[str, Any]) -> None:
    """Flip bytes in the stored delta payloads after signing: what a bad disk or a tamperer would do."""
    touched = 0
    for payload in release["payloads"]:
        if payload["kind"] != "delta":
            continue
        f = work / "cloud" / "artifacts" / payload["path"]
        data = bytearray(f.read_bytes())
        for i in range(0, len(data), max(1, len(data) // 16)):
            data[i] ^= 0xFF
        f.write_bytes(bytes(data))
        touched += 1
    if not touched:
        raise StateError("no delta payload to corrupt")
