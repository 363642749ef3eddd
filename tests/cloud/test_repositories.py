"""The metadata repositories' contract, run against every backend (conftest.py ``repos``): the in-memory
fakes the service tests use, a real SQLite file and a real private PostgreSQL. Then what only a database
has: reopening, schema versions, a file that is not ours, two connections sharing one database, one
that cannot be reached."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from fleetloop_cloud.repositories import Repositories, open_repositories
from fleetloop_cloud.repositories.records import (
    DeviceChange,
    DeviceTelemetry,
    Inventory,
    NewRollout,
    Registration,
    ReleaseRecord,
    RolloutUpdate,
    SegmentReceipt,
)
from fleetloop_cloud.repositories.schema import SCHEMA_VERSION
from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.errors import ConfigError, NotFoundError, StateError, UnavailableError

CATALOG = [
    {"id": 1, "path": "Vehicle.Speed", "data_type": "FLOAT64", "unit": "km/h"},
    {"id": 2, "path": "Vehicle.Gear", "data_type": "INT64", "unit": ""},
]


def hello(repos: Repositories, device_id: str = "car-1", now: float = 100.0, owner: str = "c1",
          **labels: str) -> None:  # fmt: skip
    registration = Registration("taxi", labels or {"kind": "car"}, CATALOG, "0.1.0", "recordings")
    repos.devices.register(device_id, registration, owner=owner, now=now)


def receipt(capture: str, samples: int, first_ns: int, last_ns: int, priority: int = 8) -> SegmentReceipt:
    return SegmentReceipt(capture, "braking", priority, samples, first_ns, last_ns)


# -- devices ---------------------------------------------------------------------------------------


def test_device_hello_inventory_heartbeat(repos: Repositories) -> None:
    devices = repos.devices
    hello(repos, kind="car", hw="gen2")
    devices.update_inventory("car-1", Inventory("sim-a", "1.0.0", "ab" * 32, "a", 0), 101.0)
    devices.touch("car-1", 150.0, owner="c2")
    devices.touch("nobody", 150.0, owner="c2")  # a heartbeat of an unknown device is ignored
    d = devices.get("car-1")
    assert d is not None
    assert (d.fleet, d.labels, d.hardware_id, d.firmware_version, d.active_slot) == (
        "taxi", {"hw": "gen2", "kind": "car"}, "sim-a", "1.0.0", "a")  # fmt: skip
    assert d.session_owner == "c2" and d.last_seen == 150.0 and d.registered_at == 100.0
    assert d.catalog == CATALOG
    assert d.selector_labels() == {"fleet": "taxi", "hardware_id": "sim-a", "hw": "gen2", "kind": "car"}
    # a second hello refreshes labels but keeps inventory and registration time
    hello(repos, now=200.0, owner="c1", kind="car", hw="gen3")
    d = devices.get("car-1")
    assert d is not None
    assert d.labels["hw"] == "gen3" and d.firmware_version == "1.0.0" and d.registered_at == 100.0
    assert d.session_owner == "c1"
    assert [x.device_id for x in devices.all()] == ["car-1"]
    assert devices.get("nobody") is None


def test_a_heartbeat_keeps_the_latest_telemetry(repos: Repositories) -> None:
    devices = repos.devices
    hello(repos)
    assert devices.telemetry() == {}
    first = DeviceTelemetry(150.0, 3, 4096, 1 << 20, 1 << 28, -12.5, "wifi")
    devices.touch("car-1", 150.0, owner="c1", telemetry=first)
    devices.touch("nobody", 150.0, owner="c1", telemetry=first)  # unknown devices report nothing
    assert devices.telemetry() == {"car-1": first}
    devices.touch("car-1", 151.0, owner="c1")  # a sign of life without a report keeps the last one
    later = DeviceTelemetry(152.0, 0, 0, 2 << 20, 1 << 28, 3.0, "cellular")
    devices.touch("car-1", 152.0, owner="c2", telemetry=later)
    assert devices.telemetry() == {"car-1": later}


def test_a_session_ends_only_where_it_is_held(repos: Repositories) -> None:
    devices = repos.devices
    hello(repos, owner="c1")
    # the device moved to c2 (a reconnect); c1 notices its old stream ending afterwards
    devices.touch("car-1", 101.0, owner="c2")
    assert devices.end_session("car-1", owner="c1") is False
    assert devices.get("car-1").session_owner == "c2"  # type: ignore[union-attr]
    assert devices.end_session("car-1", owner="c2") is True
    assert devices.get("car-1").session_owner == ""  # type: ignore[union-attr]
    assert devices.end_session("car-1", owner="c2") is False  # already over
    # the transport's last will ends it wherever it is held
    devices.touch("car-1", 102.0, owner="c3")
    assert devices.end_session("car-1", owner=None) is True
    assert devices.end_session("ghost", owner=None) is False


def test_device_catalog_and_unknown_devices(repos: Repositories) -> None:
    hello(repos)
    catalog = repos.devices.catalog("car-1")
    assert isinstance(catalog, Catalog)
    assert catalog.by_id(2).path == "Vehicle.Gear" and catalog.by_id(2).data_type is DataType.INT64
    with pytest.raises(NotFoundError):
        repos.devices.catalog("ghost")
    with pytest.raises(NotFoundError):
        repos.devices.update_inventory("ghost", Inventory("", "", "", "", 0), 1.0)
    with pytest.raises(NotFoundError):
        repos.devices.set_campaign_status("ghost", 1, [], {}, 0)


def test_campaign_status_is_recorded(repos: Repositories) -> None:
    hello(repos)
    repos.devices.set_campaign_status("car-1", 4, ["braking"], {"bad": "line 3: unknown signal"}, 17)
    d = repos.devices.get("car-1")
    assert d is not None
    assert (d.campaigns_version, d.campaigns_running, d.campaigns_refused, d.captures_total) == (
        4, ["braking"], {"bad": "line 3: unknown signal"}, 17)  # fmt: skip


# -- the ingest ledger -----------------------------------------------------------------------------


def test_segments_are_deduplicated_and_folded_into_captures(repos: Repositories) -> None:
    segments = repos.segments
    seg1, seg2 = b"\x01" * 16, b"\x02" * 16
    assert segments.record("car-1", seg1, receipt("cap-1", 100, 1_000, 2_000), 10.0)
    assert segments.has("car-1", seg1)
    assert not segments.has("car-2", seg1)  # the key is (device, segment)
    assert not segments.record("car-1", seg1, receipt("cap-1", 100, 1_000, 2_000), 11.0)  # idempotent
    assert segments.record("car-1", seg2, receipt("cap-1", 50, 500, 3_000), 12.0)
    assert segments.record("car-2", seg1, receipt("cap-9", 7, 0, 1, priority=1), 13.0)
    caps = {c.capture_id: c for c in segments.captures()}
    assert set(caps) == {"cap-1", "cap-9"}
    c = caps["cap-1"]
    assert (c.device_id, c.samples, c.segments, c.first_ns, c.last_ns) == ("car-1", 150, 2, 500, 3_000)
    assert (c.first_received, c.last_received) == (10.0, 12.0)
    assert [c.capture_id for c in segments.captures()] == ["cap-1", "cap-9"]
    totals = segments.totals()
    assert (totals.segments, totals.samples, totals.captures) == (3, 157, 2)


def test_concurrent_writers_lose_nothing(repos: Repositories) -> None:
    def worker(k: int) -> None:
        for i in range(50):
            for _ in range(2):
                sid = i.to_bytes(16, "big")
                repos.segments.record(f"car-{k}", sid, receipt(f"cap-{k}", 2, i, i), float(i))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    totals = repos.segments.totals()
    assert (totals.segments, totals.samples, totals.captures) == (200, 400, 4)


# -- campaigns and releases ------------------------------------------------------------------------


def test_campaign_versions_rise_and_identical_reapply_is_a_no_op(repos: Repositories) -> None:
    campaigns = repos.campaigns
    assert (campaigns.desired().version, campaigns.desired().campaigns) == (0, ())
    assert campaigns.put("braking", "doc-v1", 1.0) == 1
    assert campaigns.put("idle", "doc-idle", 2.0) == 2
    assert campaigns.put("braking", "doc-v1", 3.0) == 2  # unchanged: no bump
    assert campaigns.put("braking", "doc-v2", 4.0) == 3
    desired = campaigns.desired()
    assert desired.version == 3
    assert [(c.name, c.revision, c.document) for c in desired.campaigns] == [
        ("braking", 2, "doc-v2"), ("idle", 1, "doc-idle")]  # fmt: skip
    assert campaigns.delete("idle", 5.0) == 4
    assert [c.name for c in campaigns.desired().campaigns] == ["braking"]
    assert campaigns.desired().version == 4
    with pytest.raises(NotFoundError):
        campaigns.delete("idle", 6.0)


def test_releases(repos: Repositories) -> None:
    releases = repos.releases
    releases.put(ReleaseRecord("fw", "1.0.0", "sim-a", b"{m1}", b"sig1", 1.0))
    releases.put(ReleaseRecord("fw", "2.0.0", "sim-a", b"{m2}", b"sig2", 2.0))
    with pytest.raises(StateError, match="already exists"):
        releases.put(ReleaseRecord("fw", "2.0.0", "sim-a", b"{other}", b"sig3", 3.0))
    r = releases.get("2.0.0")
    assert r is not None and (r.manifest, r.signature, r.hardware_id) == (b"{m2}", b"sig2", "sim-a")
    assert releases.get("9.9.9") is None
    assert [x.version for x in releases.all()] == ["1.0.0", "2.0.0"]
    # the same version for another hardware and a pack of the same version: the latest registered wins
    releases.put(ReleaseRecord("fw", "2.0.0", "sim-b", b"{m3}", b"sig3", 2.0))
    releases.put(ReleaseRecord("pack", "2.0.0", "sim-a", b"{p}", b"sigp", 2.0))
    assert releases.get("2.0.0").manifest == b"{p}"  # type: ignore[union-attr]
    assert releases.get("2.0.0", "fw").manifest == b"{m3}"  # type: ignore[union-attr]
    assert releases.names("2.0.0") == ["fw", "pack"]


# -- rollouts --------------------------------------------------------------------------------------


def test_rollout_transitions_are_atomic_and_audited(repos: Repositories) -> None:
    rollouts = repos.rollouts
    first = NewRollout(
        "ro-1", "2.0.0", {"release_version": "2.0.0"}, "RUNNING", 0, "created", {"a": 0, "b": 1}, "PENDING",
        audit=[("created", "2 devices")], initial={"b": ("COMMITTED", "already there")},
    )  # fmt: skip
    rollouts.create(first, 1.0)
    with pytest.raises(StateError):
        rollouts.create(NewRollout("ro-1", "2.0.0", {}, "RUNNING", 0, "", {}, "PENDING"), 1.0)
    rollouts.update("ro-1", RolloutUpdate(state="RUNNING", reason="offering",
                                          devices={"a": DeviceChange(state="OFFERED", delivered=False)},
                                          audit=[("offer", "a")]), 2.0)  # fmt: skip
    # a change naming a device outside the rollout rolls the whole step back
    with pytest.raises(NotFoundError):
        bad = RolloutUpdate(state="PAUSED", devices={"zz": DeviceChange(state="FAILED")})
        rollouts.update("ro-1", bad, 3.0)
    r = rollouts.get("ro-1")
    assert r is not None and r.state == "RUNNING" and r.reason == "offering" and r.updated_at == 2.0
    assert r.phase_started_at == 1.0 and r.created_at == 1.0 and r.accepted_failures == frozenset()
    rollouts.set_device("ro-1", "a", DeviceChange(delivered=True), 4.0)
    devs = {d.device_id: d for d in rollouts.devices("ro-1")}
    assert (devs["a"].state, devs["a"].delivered) == ("OFFERED", True)
    assert (devs["b"].state, devs["b"].reason) == ("COMMITTED", "already there")
    events = [(a.event, a.detail) for a in rollouts.audit("ro-1")]
    assert events == [("created", "2 devices"), ("offer", "a"), ("device", "a: PENDING -> OFFERED")]
    assert [r.rollout_id for r in rollouts.all(states=["RUNNING"])] == ["ro-1"]
    assert rollouts.all(states=["PAUSED"]) == []
    assert [d.rollout_id for d in rollouts.of_device("a")] == ["ro-1"]
    with pytest.raises(NotFoundError):
        rollouts.update("ro-none", RolloutUpdate(state="PAUSED"), 5.0)


def test_a_rollout_update_checks_what_it_was_decided_on(repos: Repositories) -> None:
    rollouts = repos.rollouts
    rollouts.create(NewRollout("ro-1", "2.0.0", {}, "RUNNING", 0, "created", {"a": 0}, "PENDING"), 1.0)
    stale = RolloutUpdate(state="SUCCEEDED", accepted_failures=frozenset({"a"}), expect=("PAUSED", 0))
    assert rollouts.update("ro-1", stale, 2.0) is False
    assert rollouts.get("ro-1").state == "RUNNING"  # type: ignore[union-attr]
    fresh = RolloutUpdate(phase=1, phase_started_at=3.0, accepted_failures=frozenset({"a"}),
                          devices={"a": DeviceChange(state="OFFERED", only_from="COMMITTED")},
                          expect=("RUNNING", 0))  # fmt: skip
    assert rollouts.update("ro-1", fresh, 3.0) is True
    r = rollouts.get("ro-1")
    assert r is not None and (r.phase, r.phase_started_at, r.accepted_failures) == (1, 3.0, frozenset({"a"}))
    assert rollouts.devices("ro-1")[0].state == "PENDING"  # only_from did not hold: left as it was


# -- coordinator leases ----------------------------------------------------------------------------


def test_leases_say_which_coordinators_are_alive(repos: Repositories) -> None:
    leases = repos.leases
    leases.beat("c1", 100.0)
    leases.beat("c2", 110.0)
    assert leases.alive(since=100.0) == {"c1", "c2"}
    assert leases.alive(since=105.0) == {"c2"}
    leases.beat("c1", 120.0)
    assert leases.alive(since=115.0) == {"c1"}
    leases.retire("c1")
    assert leases.alive(since=0.0) == {"c2"}
    assert leases.reap(before=111.0) == 1
    assert leases.alive(since=0.0) == set()


def test_a_writer_lock_has_one_holder_until_given_up_or_expired(repos: Repositories) -> None:
    leases = repos.leases
    assert leases.take("tuf/image", "c1", 100.0, 30.0)
    assert not leases.take("tuf/image", "c2", 110.0, 30.0)
    assert leases.take("tuf/director/d1", "c2", 110.0, 30.0)  # another name, another lock
    assert leases.take("tuf/image", "c1", 110.0, 30.0)  # renewed by its holder
    leases.give_up("tuf/image", "c2")  # not c2's: nothing happens
    assert not leases.take("tuf/image", "c2", 120.0, 30.0)
    leases.give_up("tuf/image", "c1")
    assert leases.take("tuf/image", "c2", 121.0, 30.0)
    assert leases.take("tuf/image", "c1", 151.5, 30.0)  # c2 died holding it: expired
    assert repos.rollouts.lease() is None  # the controller lease is not one of them


# -- what only a database has ----------------------------------------------------------------------


def test_tokens_by_name_and_hash_revoked_once(repos: Repositories) -> None:
    from fleetloop_cloud.repositories.records import TokenRecord

    t = TokenRecord("ci", "viewer", "ab" * 32, 1.0, "admin", None, None, None)
    repos.tokens.add(t)
    with pytest.raises(StateError, match="exists already"):
        repos.tokens.add(t)
    assert repos.tokens.by_hash("ab" * 32) == t and repos.tokens.by_hash("cd" * 32) is None
    repos.tokens.used("ci", 5.0)
    assert repos.tokens.revoke("ci", 7.0).revoked_at is None  # the token as it was
    after = repos.tokens.get("ci")
    assert after is not None and (after.revoked_at, after.last_used_at) == (7.0, 5.0)
    with pytest.raises(StateError, match="revoked already"):
        repos.tokens.revoke("ci", 8.0)
    with pytest.raises(NotFoundError):
        repos.tokens.revoke("nobody", 8.0)
    assert [x.name for x in repos.tokens.all()] == ["ci"]


def test_the_audit_log_chains_entries_and_filters_them(repos: Repositories) -> None:
    from fleetloop_cloud.identity.audit_chain import verify
    from fleetloop_cloud.repositories.records import AuditFilter, NewAuditEntry

    for i, action in enumerate(["campaigns.apply", "rollouts.create", "rollouts.pause"]):
        repos.audit_log.append(NewAuditEntry(10.0 + i, "alice", "admin", "http", "127.0.0.1", f"r{i}", action,
                                             "t", "1", "2", ""))  # fmt: skip
    entries = repos.audit_log.chain(0, 100)
    assert [e.seq for e in entries] == [1, 2, 3] and verify(e.fields() for e in entries).ok
    assert [e.seq for e in repos.audit_log.entries(AuditFilter(kind="rollouts", since=11.5))] == [3]
    assert [e.seq for e in repos.audit_log.chain(1, 1)] == [2]


def test_state_survives_reopen(sql_location: str | Path) -> None:
    first = open_repositories(sql_location)
    hello(first)
    first.campaigns.put("braking", "doc", 1.0)
    first.close()
    again = open_repositories(sql_location)
    assert again.devices.get("car-1") is not None
    assert again.campaigns.desired().version == 1
    again.close()


def test_two_connections_share_one_database(sql_location: str | Path) -> None:
    a, b = open_repositories(sql_location), open_repositories(sql_location)
    hello(a)
    assert b.devices.get("car-1") is not None
    sid = b"\x01" * 16
    assert a.segments.record("car-1", sid, receipt("c", 5, 1, 2), 3.0)
    assert not b.segments.record("car-1", sid, receipt("c", 5, 1, 2), 3.0)
    assert a.campaigns.put("x", "doc", 1.0) == 1 and b.campaigns.put("y", "doc", 1.0) == 2
    a.close()
    b.close()


def test_schema_is_versioned_and_a_newer_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.sqlite"
    open_repositories(path).close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(ConfigError, match="schema version"):
        open_repositories(path)


def test_a_version_1_database_is_upgraded_in_place(tmp_path: Path) -> None:
    """What the previous release wrote: devices with an ``online`` flag and no session owner."""
    path = tmp_path / "m.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(
            """CREATE TABLE schema_version (version INTEGER NOT NULL);
               INSERT INTO schema_version VALUES (1);
               CREATE TABLE devices (
                   device_id TEXT PRIMARY KEY, fleet TEXT NOT NULL, labels_json TEXT NOT NULL,
                   catalog_json TEXT NOT NULL, agent_version TEXT NOT NULL, data_origin TEXT NOT NULL,
                   hardware_id TEXT NOT NULL DEFAULT '', firmware_version TEXT NOT NULL DEFAULT '',
                   firmware_sha256 TEXT NOT NULL DEFAULT '', active_slot TEXT NOT NULL DEFAULT '',
                   campaigns_version INTEGER NOT NULL DEFAULT 0,
                   campaigns_running_json TEXT NOT NULL DEFAULT '[]',
                   campaigns_refused_json TEXT NOT NULL DEFAULT '{}',
                   captures_total INTEGER NOT NULL DEFAULT 0, online INTEGER NOT NULL DEFAULT 0,
                   last_seen REAL NOT NULL, registered_at REAL NOT NULL);
               INSERT INTO devices (device_id, fleet, labels_json, catalog_json, agent_version, data_origin,
                                    online, last_seen, registered_at)
                 VALUES ('car-1', 'taxi', '{}', '[]', '0.1', 'sim', 1, 5.0, 1.0);"""
        )
    repos = open_repositories(path)
    d = repos.devices.get("car-1")
    assert d is not None and d.session_owner == "" and d.registered_at == 1.0  # the stale flag is gone
    hello(repos, "car-2")
    assert repos.devices.get("car-2").session_owner == "c1"  # type: ignore[union-attr]
    repos.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


def test_a_version_3_rollout_gains_the_rollout_controller_columns(tmp_path: Path) -> None:
    """What the operator-plane release wrote: rollouts with a flat policy, executions without attempts."""
    path = tmp_path / "m.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(
            """CREATE TABLE schema_version (version INTEGER NOT NULL);
               INSERT INTO schema_version VALUES (3);
               CREATE TABLE rollouts (
                   rollout_id TEXT PRIMARY KEY, release_version TEXT NOT NULL, policy_json TEXT NOT NULL,
                   state TEXT NOT NULL, phase INTEGER NOT NULL, phase_started_at REAL NOT NULL,
                   reason TEXT NOT NULL, accepted_failures_json TEXT NOT NULL DEFAULT '[]',
                   created_at REAL NOT NULL, updated_at REAL NOT NULL);
               CREATE TABLE rollout_devices (
                   rollout_id TEXT NOT NULL, device_id TEXT NOT NULL, phase INTEGER NOT NULL,
                   state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', delivered INTEGER NOT NULL DEFAULT 0,
                   updated_at REAL NOT NULL, PRIMARY KEY (rollout_id, device_id));
               INSERT INTO rollouts VALUES ('ro-old', '2.0.0',
                 '{"release_version": "2.0.0", "phases": [{"name": "all", "percent": 100}]}',
                 'RUNNING', 0, 1.0, 'created', '[]', 1.0, 2.0);
               INSERT INTO rollout_devices VALUES ('ro-old', 'car-1', 0, 'COMMITTED', '', 1, 2.0);"""
        )
    repos = open_repositories(path)
    record = repos.rollouts.get("ro-old")
    assert record is not None and (record.revision, record.parent_id, record.state) == (0, "", "RUNNING")
    (device,) = repos.rollouts.devices("ro-old")
    assert (device.state, device.attempt, device.windows, device.running_version) == ("COMMITTED", 0, (), "")
    assert repos.rollouts.latest_evaluations("ro-old", 0) == {} and repos.rollouts.lease() is None
    repos.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


def test_a_file_that_is_not_a_database_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.sqlite"
    path.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(ConfigError, match=r"junk\.sqlite"):
        open_repositories(path)


def test_unreachable_and_wrong_databases_are_one_line_errors(pg_server: str) -> None:
    with pytest.raises(UnavailableError) as exc:
        open_repositories("postgresql://fleetloop:secret@127.0.0.1:1/nothing")
    assert "secret" not in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises((UnavailableError, ConfigError)):
        open_repositories(pg_server.rsplit("/", 1)[0] + "/no_such_database")


def test_devices_keep_the_delta_formats_they_report(repos: Repositories) -> None:
    hello(repos)
    assert repos.devices.get("car-1").delta_formats == ()  # type: ignore[union-attr]
    inventory = Inventory("sim-a", "1.0.0", "ab" * 32, "a", 0, delta_formats=("fldelta2", "fldelta1"))
    repos.devices.update_inventory("car-1", inventory, 101.0)
    assert repos.devices.get("car-1").delta_formats == ("fldelta2", "fldelta1")  # type: ignore[union-attr]
    hello(repos, now=200.0)  # a new hello keeps what the last inventory said
    assert repos.devices.get("car-1").delta_formats == ("fldelta2", "fldelta1")  # type: ignore[union-attr]


def test_a_version_4_database_gains_the_delta_formats_column(tmp_path: Path) -> None:
    """What the previous release wrote: devices without ``delta_formats``; they read FLDELTA1 only."""
    path = tmp_path / "m.sqlite"
    hello(repos := open_repositories(path))
    repos.close()
    with sqlite3.connect(path) as db:  # the devices table as version 4 had it
        db.execute("ALTER TABLE devices DROP COLUMN delta_formats")
        db.execute("UPDATE schema_version SET version = 4")
    repos = open_repositories(path)
    assert repos.devices.get("car-1").delta_formats == ()  # type: ignore[union-attr]
    inventory = Inventory("sim-a", "1.0.0", "ab" * 32, "a", 0, delta_formats=("fldelta1",))
    repos.devices.update_inventory("car-1", inventory, 101.0)
    assert repos.devices.get("car-1").delta_formats == ("fldelta1",)  # type: ignore[union-attr]
    repos.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
