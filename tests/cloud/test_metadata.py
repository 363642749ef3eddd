"""Metadata store on a real SQLite file: devices, segments/captures dedupe, campaigns, releases, rollouts."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from fleetloop_cloud.metadata import SCHEMA_VERSION, DeviceChange, MetadataStore, RolloutUpdate
from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.errors import ConfigError, NotFoundError, StateError

CATALOG = [
    {"id": 1, "path": "Vehicle.Speed", "data_type": "FLOAT64", "unit": "km/h"},
    {"id": 2, "path": "Vehicle.Gear", "data_type": "INT64", "unit": ""},
]


@pytest.fixture
def store(tmp_path: Path) -> MetadataStore:
    return MetadataStore(tmp_path / "meta" / "metadata.sqlite")


def hello(store: MetadataStore, device_id: str = "car-1", now: float = 100.0, **labels: str) -> None:
    store.upsert_device(
        device_id, fleet="taxi", labels=labels or {"kind": "car"}, catalog=CATALOG, agent_version="0.1.0",
        data_origin="recordings", now=now,
    )


def test_device_hello_inventory_heartbeat(store: MetadataStore) -> None:
    hello(store, kind="car", hw="gen2")
    store.update_inventory(
        "car-1", hardware_id="sim-a", firmware_version="1.0.0", firmware_sha256="ab" * 32, active_slot="a",
        campaigns_version=0, now=101.0,
    )
    store.touch_device("car-1", 150.0, online=False)
    store.touch_device("nobody", 150.0)  # a heartbeat of an unknown device is ignored
    d = store.device("car-1")
    assert d is not None
    assert (d.fleet, d.labels, d.hardware_id, d.firmware_version, d.active_slot) == (
        "taxi", {"hw": "gen2", "kind": "car"}, "sim-a", "1.0.0", "a")
    assert d.online is False and d.last_seen == 150.0 and d.registered_at == 100.0
    assert d.catalog == CATALOG
    assert d.selector_labels() == {"fleet": "taxi", "hardware_id": "sim-a", "hw": "gen2", "kind": "car"}
    # a second hello refreshes labels but keeps inventory and registration time
    hello(store, now=200.0, kind="car", hw="gen3")
    d = store.device("car-1")
    assert d is not None
    assert d.labels["hw"] == "gen3" and d.firmware_version == "1.0.0" and d.registered_at == 100.0
    assert d.online is True
    assert [x.device_id for x in store.devices()] == ["car-1"]
    assert store.device("nobody") is None


def test_device_catalog_and_unknown_devices(store: MetadataStore) -> None:
    hello(store)
    catalog = store.device_catalog("car-1")
    assert isinstance(catalog, Catalog)
    assert catalog.by_id(2).path == "Vehicle.Gear" and catalog.by_id(2).data_type is DataType.INT64
    with pytest.raises(NotFoundError):
        store.device_catalog("ghost")
    with pytest.raises(NotFoundError):
        store.update_inventory("ghost", hardware_id="", firmware_version="", firmware_sha256="",
                               active_slot="", campaigns_version=0, now=1.0)
    with pytest.raises(NotFoundError):
        store.set_device_campaign_status("ghost", 1, [], {}, 0)


def test_campaign_status_is_recorded(store: MetadataStore) -> None:
    hello(store)
    store.set_device_campaign_status("car-1", 4, ["braking"], {"bad": "line 3: unknown signal"}, 17)
    d = store.device("car-1")
    assert d is not None
    assert (d.campaigns_version, d.campaigns_running, d.campaigns_refused, d.captures_total) == (
        4, ["braking"], {"bad": "line 3: unknown signal"}, 17)


def test_segments_are_deduplicated_and_folded_into_captures(store: MetadataStore) -> None:
    seg1, seg2 = b"\x01" * 16, b"\x02" * 16
    assert store.record_segment("car-1", seg1, capture_id="cap-1", campaign="braking", priority=8,
                                samples=100, first_ns=1_000, last_ns=2_000, now=10.0)
    assert store.has_segment("car-1", seg1)
    assert not store.has_segment("car-2", seg1)  # the key is (device, segment)
    # the same segment again: idempotent
    assert not store.record_segment("car-1", seg1, capture_id="cap-1", campaign="braking", priority=8,
                                    samples=100, first_ns=1_000, last_ns=2_000, now=11.0)
    assert store.record_segment("car-1", seg2, capture_id="cap-1", campaign="braking", priority=8, samples=50,
                                first_ns=500, last_ns=3_000, now=12.0)
    assert store.record_segment("car-2", seg1, capture_id="cap-9", campaign="braking", priority=1, samples=7,
                                first_ns=0, last_ns=1, now=13.0)
    caps = {c.capture_id: c for c in store.captures()}
    assert set(caps) == {"cap-1", "cap-9"}
    c = caps["cap-1"]
    assert (c.device_id, c.samples, c.segments, c.first_ns, c.last_ns) == ("car-1", 150, 2, 500, 3_000)
    assert (c.first_received, c.last_received) == (10.0, 12.0)
    assert store.ingest_totals() == (3, 157, 2)


def test_campaign_versions_rise_and_identical_reapply_is_a_no_op(store: MetadataStore) -> None:
    assert store.campaigns() == (0, [])
    assert store.put_campaign("braking", "doc-v1", 1.0) == 1
    assert store.put_campaign("idle", "doc-idle", 2.0) == 2
    assert store.put_campaign("braking", "doc-v1", 3.0) == 2  # unchanged: no bump
    assert store.put_campaign("braking", "doc-v2", 4.0) == 3
    version, docs = store.campaigns()
    assert version == 3
    assert docs == [("braking", 2, "doc-v2"), ("idle", 1, "doc-idle")]
    assert store.delete_campaign("idle", 5.0) == 4
    assert store.campaigns() == (4, [("braking", 2, "doc-v2")])
    with pytest.raises(NotFoundError):
        store.delete_campaign("idle", 6.0)


def test_releases(store: MetadataStore) -> None:
    store.put_release("fw", "1.0.0", "sim-a", b"{m1}", b"sig1", 1.0)
    store.put_release("fw", "2.0.0", "sim-a", b"{m2}", b"sig2", 2.0)
    with pytest.raises(StateError):
        store.put_release("fw", "2.0.0", "sim-a", b"{m2}", b"sig2", 3.0)
    r = store.release("2.0.0")
    assert r is not None and (r.manifest, r.signature, r.hardware_id) == (b"{m2}", b"sig2", "sim-a")
    assert store.release("9.9.9") is None
    assert [x.version for x in store.releases()] == ["1.0.0", "2.0.0"]


def test_rollout_transitions_are_atomic_and_audited(store: MetadataStore) -> None:
    store.create_rollout("ro-1", release_version="2.0.0", policy={"release_version": "2.0.0"},
                         state="RUNNING", phase=0, reason="created", devices={"a": 0, "b": 1},
                         device_state="PENDING", now=1.0,
                         audit=[("created", "2 devices")], initial={"b": ("COMMITTED", "already there")})
    with pytest.raises(StateError):
        store.create_rollout("ro-1", release_version="2.0.0", policy={}, state="RUNNING", phase=0, reason="",
                             devices={}, device_state="PENDING", now=1.0)
    store.update_rollout("ro-1", RolloutUpdate(state="RUNNING", reason="offering",
                                               devices={"a": DeviceChange(state="OFFERED", delivered=False)},
                                               audit=[("offer", "a")]), 2.0)
    # a change naming a device outside the rollout rolls the whole step back
    with pytest.raises(NotFoundError):
        bad = RolloutUpdate(state="PAUSED", devices={"zz": DeviceChange(state="FAILED")})
        store.update_rollout("ro-1", bad, 3.0)
    r = store.rollout("ro-1")
    assert r is not None and r.state == "RUNNING" and r.reason == "offering" and r.updated_at == 2.0
    store.set_rollout_device("ro-1", "a", DeviceChange(delivered=True), 4.0)
    devs = {d.device_id: d for d in store.rollout_devices("ro-1")}
    assert (devs["a"].state, devs["a"].delivered) == ("OFFERED", True)
    assert (devs["b"].state, devs["b"].reason) == ("COMMITTED", "already there")
    events = [(a.event, a.detail) for a in store.audit("ro-1")]
    assert events == [("created", "2 devices"), ("offer", "a"), ("device", "a: PENDING -> OFFERED")]
    assert [r.rollout_id for r in store.rollouts(states=["RUNNING"])] == ["ro-1"]
    assert store.rollouts(states=["PAUSED"]) == []
    assert [d.rollout_id for d in store.device_rollouts("a")] == ["ro-1"]
    with pytest.raises(NotFoundError):
        store.update_rollout("ro-none", RolloutUpdate(state="PAUSED"), 5.0)


def test_state_survives_reopen_and_schema_is_versioned(tmp_path: Path) -> None:
    path = tmp_path / "m.sqlite"
    first = MetadataStore(path)
    hello(first)
    first.put_campaign("braking", "doc", 1.0)
    first.close()
    again = MetadataStore(path)
    assert again.device("car-1") is not None
    assert again.campaigns()[0] == 1
    again.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(ConfigError, match="schema version"):
        MetadataStore(path)


def test_a_file_that_is_not_a_database_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.sqlite"
    path.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(ConfigError, match=r"junk\.sqlite"):
        MetadataStore(path)


def test_concurrent_writers_lose_nothing(store: MetadataStore) -> None:
    def worker(k: int) -> None:
        for i in range(50):
            store.record_segment(f"car-{k}", i.to_bytes(16, "big"), capture_id=f"cap-{k}", campaign="c",
                                 priority=1, samples=2, first_ns=i, last_ns=i, now=float(i))
            store.record_segment(f"car-{k}", i.to_bytes(16, "big"), capture_id=f"cap-{k}", campaign="c",
                                 priority=1, samples=2, first_ns=i, last_ns=i, now=float(i))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.ingest_totals() == (200, 400, 4)


def test_a_database_from_before_delta_formats_gains_the_column(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    MetadataStore(db).close()
    raw = sqlite3.connect(db)  # the devices table as it was before devices reported delta formats
    raw.execute("ALTER TABLE devices DROP COLUMN delta_formats")
    raw.commit()
    raw.close()
    store = MetadataStore(db)
    hello(store)
    assert store.device("car-1").delta_formats == ()  # type: ignore[union-attr]
    store.update_inventory(
        "car-1", hardware_id="hw", firmware_version="1", firmware_sha256="", active_slot="a",
        campaigns_version=0, now=1.0, delta_formats=("fldelta2", "fldelta1"),
    )  # fmt: skip
    assert store.device("car-1").delta_formats == ("fldelta2", "fldelta1")  # type: ignore[union-attr]
    store.close()
