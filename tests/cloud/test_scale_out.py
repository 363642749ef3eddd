"""Three coordinators, one PostgreSQL, one S3 endpoint: one of them dies (SIGKILL) while devices upload
and a rollout runs, and nothing is lost, doubled or decided twice.

Three ``fleetloop cloud serve`` processes share a private PostgreSQL (metadata, the Iceberg catalog,
the controller lease, the change feed) and moto's S3 server (the Iceberg tables' files). Devices are
the simulator's agents — the agent's own link and local store — spread over the coordinators: over gRPC
each has the list of all three and starts on its own, over MQTT they publish to a private mosquitto
whose shared subscription hands each upload to any coordinator. OTA devices answer the rollout's jobs.

The coordinator that holds the controller lease is killed mid-ingest and mid-rollout. Then: its gRPC
devices carry on with the others, the lease passes to a survivor (a higher fencing token) and the
rollout ends SUCCEEDED with every phase opened once and every device offered once; after the devices
drain, every acknowledged segment is in the table once (rows and segments counted per capture), no
sample is stored twice, and the two survivors answer the same queries alike.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from fleetloop_cloud.repositories.rollouts import LEASE_NAME
from fleetloop_fwsim.broker import MosquittoProcess, mosquitto_binary
from fleetloop_fwsim.fleet import (
    CoordinatorProcess,
    MqttEndpoint,
    SimFleet,
    _counter,
    coordinator_mqtt_args,
    register_mqtt_devices,
    store_counts,
)
from fleetloop_fwsim.rollout_kill import (
    CoordinatorApi,
    OtaDevice,
    check_rollouts,
    publish_firmware,
)
from fleetloop_fwsim.swarm import Swarm
from fleetloop_shared.update.release_keys import generate_key_file, load_key_file, public_pem_path

#: Every wait is on a condition; this only bounds how long a broken run takes to say so.
DEADLINE_S = 120.0
GRPC_DEVICES = 4
MQTT_DEVICES = 2
OTA_DEVICES = 4
#: The controller lease: a survivor takes over this long after the leader died.
LEASE_S = 1
#: The canaries' soak: the leader dies during it, so the next phase opens under its successor.
SOAK_S = 5
#: How often each device cuts a capture (each a few segments). A device uploads one segment at a time and
#: each waits for its batch's commit, so on a loaded two-core machine the drain after the producers stop
#: takes most of the run: fewer captures, a shorter drain, and still a backlog in flight at the kill.
CAPTURE_PERIOD_S = 4.0
#: A device waits this long for an upload's ack before it sends it again: longer than a commit takes
#: on a loaded two-core machine, so retries do not add to the load that made the answer late.
UPLOAD_DEADLINE_S = 20.0
#: The coordinators' Iceberg settings: batches of up to a quarter second. Each upload's answer waits for
#: its batch, so a longer wait slows every device's serial uploads; a shorter one makes more commits, whose
#: cost grows with the snapshots already made (docs/scale.md).
TABLES_YAML = "fleet_store:\n  batch_wait_s: 0.25\n"


def wait_for(what: str, done: Callable[[], bool], timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.05)


def lease(pg_url: str) -> tuple[str, int] | None:
    """(holder, fencing token) of the controller lease, if one was ever taken."""
    with psycopg.connect(pg_url) as conn:
        query = "SELECT holder, token FROM controller_lease WHERE name = %s"
        row = conn.execute(query, (LEASE_NAME,)).fetchone()
    return None if row is None else (str(row[0]), int(row[1]))


def holder_pid(holder: str) -> int:
    """The process id in a lease holder's name (``host:pid:nonce``)."""
    return int(holder.split(":")[1])


def sim_fleet(target: str | list[str], devices: int, work: Path, name: str, mqtt: MqttEndpoint | None = None
              ) -> SimFleet:  # fmt: skip
    return SimFleet(target, devices, work / f"{name}-fleet", recordings=None, fleet="scale", id_prefix=name,
                    capture_period_s=CAPTURE_PERIOD_S, upload_deadline_s=UPLOAD_DEADLINE_S,
                    mqtt=mqtt)  # fmt: skip


def unlisted(c: CoordinatorProcess, fleets: tuple[SimFleet, ...]) -> list[tuple[str, str, str]]:
    """(device, capture, segment) of every acknowledged segment the captures table has no row for."""
    listed = {(str(d), str(s)) for d, s in c.query("SELECT device_id, segment_id FROM captures_segments",
                                                   max_rows=100_000)}  # fmt: skip
    return sorted((a.device_id, a.counters.capture_of[sid], sid.hex()) for f in fleets for a in f.agents
                  for sid in a.counters.acked if (a.device_id, sid.hex()) not in listed)  # fmt: skip


@dataclass
class Cluster:
    coordinators: list[CoordinatorProcess]
    broker: MosquittoProcess
    pg_url: str
    workdir: Path


@pytest.fixture
def cluster(tmp_path: Path, pg_url: str, s3: Any) -> Iterator[Cluster]:
    if mosquitto_binary() is None:
        pytest.fail("mosquitto is not installed; .ci/run installs it")
    broker = MosquittoProcess(tmp_path / "broker")
    broker.start()
    generate_key_file(tmp_path / "release-manager.pem", None)
    custody = ["--targets-key", str(public_pem_path(tmp_path / "release-manager.pem")),
               "--release-keys", str(tmp_path / "root-keys")]  # fmt: skip
    config = tmp_path / "cloud.yaml"
    config.write_text(TABLES_YAML + f"  format: iceberg\nstorage:\n  bucket: {s3.bucket}\n"
                      f"  endpoint: {s3.backend_url}\n")  # fmt: skip
    storage = ["--config", str(config)]
    # One data directory for the three holds only the online keys and the admin token of `cloud init`;
    # artifacts and TUF metadata are in the bucket (coordinators with a --dir each: test_shared_artifacts).
    shared_dir = tmp_path / "cloud"
    coordinators = [
        CoordinatorProcess(
            shared_dir,
            log_path=tmp_path / f"c{i}.log",
            extra_args=["--db", pg_url, *storage, *coordinator_mqtt_args(broker, f"coordinator-{i}")],
            env={"FLEETLOOP_CONTROLLER_LEASE_S": str(LEASE_S)},
            init_args=custody,
        )
        for i in range(3)
    ]
    try:
        # the first makes the shared directory, database and Iceberg catalog (coordinators creating a new
        # catalog at once race on its SQL tables); the other two then start together
        # `cloud init` makes the TUF repositories in the data directory; `cloud migrate` moves them to the
        # bucket (docs/deploy.md), where every coordinator reads them
        coordinators[0].init()
        migrated = subprocess.run(
            [sys.executable, "-m", "fleetloop_cli.main", "cloud", "migrate", "--config", str(config),
             "--dir", str(shared_dir), "--db", pg_url],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert migrated.returncode == 0, migrated.stderr[-2000:]
        coordinators[0].start()
        with ThreadPoolExecutor(len(coordinators) - 1) as starting:
            list(starting.map(lambda c: c.start(), coordinators[1:]))
        yield Cluster(coordinators, broker, pg_url, tmp_path)
    finally:
        for c in coordinators:
            c.stop()
        broker.stop()


def test_a_coordinator_killed_mid_ingest_and_mid_rollout_loses_and_doubles_nothing(cluster: Cluster) -> None:
    coordinators, work = cluster.coordinators, cluster.workdir
    targets = [c.grpc_target for c in coordinators]
    api = CoordinatorApi(coordinators[0], load_key_file(work / "release-manager.pem", None))
    grpc_fleet = sim_fleet(targets, GRPC_DEVICES, work, "grpc")
    broker = cluster.broker
    mqtt_fleet = sim_fleet(
        targets[0], MQTT_DEVICES, work, "mqtt", MqttEndpoint(broker.host, broker.port, broker.ca)
    )
    register_mqtt_devices(cluster.broker, mqtt_fleet)
    swarm = Swarm()
    ota = [
        OtaDevice(f"ota-{i}", targets[i % 3 :] + targets[: i % 3], swarm, install_s=0.2, version="1.0.0")
        for i in range(OTA_DEVICES)
    ]
    fleets = (grpc_fleet, mqtt_fleet)
    try:
        publish_firmware(api, 1)
        publish_firmware(api, 2)
        for fleet in fleets:
            fleet.start()
        for device in ota:
            device.link.start()
        wait_for("every device connected", lambda: all(f.connected() == len(f.agents) for f in fleets)
                 and all(d.link.connected.is_set() for d in ota))  # fmt: skip
        # ingest under way on every coordinator's devices (and over MQTT)
        wait_for("uploads acknowledged by every device", lambda: all(
            a.counters.acked for f in fleets for a in f.agents))  # fmt: skip
        policy = {
            "release": {"name": "firmware", "version": "2.0.0"},
            "target": {"selector": "kind=sim"},
            "phases": [{"name": "canary", "count": 2, "soak": f"{SOAK_S}s"}, {"name": "everyone"}],
            "success": {"percent": 100, "timeout": "10m", "action": "next"},
        }
        rollout = str(api.call("POST", "/v1/rollouts", json.dumps(policy).encode())["id"])
        # mid-rollout: the canaries run 2.0.0, the rest of the fleet has not been offered it yet
        wait_for("the canaries committed", lambda: sum(d.version == "2.0.0" for d in ota) == 2)
        led = lease(cluster.pg_url)
        assert led is not None, "nobody holds the controller lease while a rollout runs"
        by_pid = {c.proc.pid: c for c in coordinators if c.proc is not None}
        leader = by_pid[holder_pid(led[0])]
        assert sum(d.version == "2.0.0" for d in ota) < OTA_DEVICES, "the rollout ended before the kill"
        acked_before = sum(len(a.counters.acked) for f in fleets for a in f.agents)
        assert sum(f.pending() for f in fleets) > 0, "no upload in flight at the kill"
        leader.kill()
        killed_at = time.time()
        survivors = [c for c in coordinators if c is not leader]
        api.c = survivors[0]
        dead = leader.grpc_target

        # the lease passes to a survivor, under a new fencing token
        def taken_over() -> bool:
            now = lease(cluster.pg_url)
            return now is not None and now[1] > led[1] and holder_pid(now[0]) in {
                c.proc.pid for c in survivors if c.proc is not None}  # fmt: skip

        wait_for("a survivor to take the controller lease", taken_over)
        wait_for("the rollout to succeed", lambda: api.call("GET", f"/v1/rollouts/{rollout}")["state"]
                 == "SUCCEEDED")  # fmt: skip
        # the dead coordinator's devices went on with the others, and uploads went on after the kill
        wait_for("every device connected to a survivor", lambda: all(
            a.link.connected.is_set() and a.link.transport.target != dead for a in grpc_fleet.agents
        ) and all(d.link.connected.is_set() and d.link.transport.target != dead for d in ota))  # fmt: skip
        wait_for(
            "uploads acknowledged after the kill",
            lambda: (
                sum(len(a.counters.acked) for f in fleets for a in f.agents)
                > acked_before + 2 * len(coordinators)
            ),
        )
        for fleet in fleets:
            fleet.stop_producing()
        for fleet in fleets:
            if not fleet.drain(DEADLINE_S):
                stuck = {a.device_id: (a.pending(), a.link.transport.target, a.link.connected.is_set(),
                                       a.link.in_session, a.link.sessions_ended, a.link.uploader.retry_at
                                       if a.link.uploader else None, _counter(a, "upload_errors"),
                                       [(t.done(), t.get_stack(limit=8)) for t in a.link._tasks])
                         for a in fleet.agents if a.pending()}  # fmt: skip
                pytest.fail(
                    f"segments never acknowledged (device: pending, address, connected, in session, "
                    f"sessions ended, retry at, upload errors, tasks): {stuck}"
                )

        report = check_rollouts(api, ota, [rollout], 1, 0.0, 2)
        assert report.ok, report.problems
        # the next phase was opened after the kill: by the successor, under its lease
        history = api.call("GET", f"/v1/rollouts/{rollout}/history")["events"]
        assert [e["at"] > killed_at for e in history if e["event"] == "phase"] == [True]
        executions = api.call("GET", f"/v1/rollouts/{rollout}/executions")
        assert sorted(e["device_id"] for e in executions) == sorted(d.device_id for d in ota)

        expected: dict[tuple[str, str], tuple[int, int]] = {}
        for fleet in fleets:
            expected.update(fleet.acked_by_capture())
        assert sum(s for _, s in expected.values()) == sum(f.totals()["samples_stored"] for f in fleets)
        answers = []
        for c in survivors:
            rows = c.query("SELECT device_id, capture_id, count(*) FROM samples GROUP BY ALL ORDER BY ALL",
                           max_rows=10_000)  # fmt: skip
            segments = c.query("SELECT device_id, capture_id, segments FROM captures ORDER BY ALL",
                               max_rows=10_000)  # fmt: skip
            stored = {(str(d), str(cap)): int(n) for d, cap, n in rows}
            per_capture = {(str(d), str(cap)): int(n) for d, cap, n in segments}
            assert stored == {k: samples for k, (_, samples) in expected.items()}, "rows per capture differ"
            assert per_capture == {k: segs for k, (segs, _) in expected.items()}, (
                f"segments differ; acknowledged, without a captures row: {unlisted(c, fleets)}"
            )
            total, duplicates = store_counts(c)
            assert duplicates == 0
            answers.append((rows, segments, total))
        assert answers[0] == answers[1], "the survivors answer the same query differently"
    finally:
        for device in ota:
            device.link.stop()
        swarm.close()
        for fleet in fleets:
            fleet.close()
