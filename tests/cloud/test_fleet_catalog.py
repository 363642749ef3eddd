"""Fleet catalogs on the cloud: the repository on every backend, two processes assigning at once on one
database (the database arbitrates), and the coordinator's side of the conversation — a device asking
for fleet ids, one from before them, hostile hellos — with what the fleet store and the console then
show, on Parquet and on Iceberg."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fleetloop_cloud.fleet_store.settings import TableSettings
from fleetloop_cloud.identity.roles import Role
from fleetloop_cloud.repositories import Repositories, open_repositories
from fleetloop_cloud.repositories.records import AuditFilter
from fleetloop_cloud.server import Coordinator
from fleetloop_cloud.services.access import Caller
from fleetloop_shared.catalog import DataType, SignalSpec
from fleetloop_shared.catalog_ids import LOCAL_ID_MIN, assignment_from_wire
from fleetloop_shared.errors import MalformedMessageError, PermissionDeniedError, UserError
from fleetloop_shared.segment import Segment, encode_segment, new_segment_id
from fleetloop_shared.wire import device_pb2, ingest_pb2

F, INT, S = DataType.FLOAT64, DataType.INT64, DataType.STRING
NOW = 1_800_000_000.0


# -- the repository ----------------------------------------------------------------------------------


def test_each_path_gets_one_id_per_fleet_and_a_datatype_conflict_is_refused(repos: Repositories) -> None:
    cat = repos.fleet_catalog
    first = cat.assign("taxi", [("Vehicle.Speed", F, "km/h"), ("Vehicle.Gear", INT, "")])
    assert [(s.id, s.path) for s in first.signals] == [(1, "Vehicle.Speed"), (2, "Vehicle.Gear")]
    declared = [("Vehicle.Mode", S, ""), ("Vehicle.Speed", F, "m/s"), ("Vehicle.Gear", F, "")]
    again = cat.assign("taxi", declared)
    assert [(s.id, s.path, s.unit) for s in again.signals] == [(3, "Vehicle.Mode", ""),
                                                               (1, "Vehicle.Speed", "km/h")]  # fmt: skip
    ((path, reason),) = again.refused
    assert path == "Vehicle.Gear" and reason == (
        "signal 'Vehicle.Gear' is INT64 in the fleet's catalog (id 2); declared as FLOAT64"
    )
    assert cat.signals("taxi") == [SignalSpec(1, "Vehicle.Speed", F, "km/h"),
                                   SignalSpec(2, "Vehicle.Gear", INT),
                                   SignalSpec(3, "Vehicle.Mode", S)]  # fmt: skip
    found = cat.lookup("taxi", ["Vehicle.Gear", "Vehicle.Nope", "Vehicle.Gear"])
    assert found == [SignalSpec(2, "Vehicle.Gear", INT)]
    assert [s.id for s in cat.assign("bus", [("Vehicle.Mode", INT, "")]).signals] == [1]  # fleets apart
    assert cat.signals("nobody") == []


#: One coordinator process: assigns the paths in its own order, in small batches, on its own connection,
#: and prints what it was told.
_ASSIGN_MANY = """
import json, random, sys
from fleetloop_cloud.repositories import open_repositories
from fleetloop_shared.catalog import DataType
location, seed, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
order = [f"Vehicle.S{i}" for i in range(count)]
random.Random(seed).shuffle(order)
repos = open_repositories(location)
told = {}
for i in range(0, len(order), 7):
    batch = [(p, DataType.FLOAT64, "") for p in order[i : i + 7]]
    told.update((s.path, s.id) for s in repos.fleet_catalog.assign("taxi", batch).signals)
repos.close()
print(json.dumps(told))
"""


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_two_processes_assigning_at_once_never_give_a_path_two_ids(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    pg = backend == "postgres"
    location = str(request.getfixturevalue("pg_url")) if pg else str(tmp_path / "meta.sqlite")
    open_repositories(location).close()  # the schema, made once before the race
    procs = [
        subprocess.Popen([sys.executable, "-c", _ASSIGN_MANY, location, str(seed), "120"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for seed in (1, 2)
    ]  # fmt: skip
    told = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        told.append(json.loads(out))
    repos = open_repositories(location)
    try:
        table = {s.path: s.id for s in repos.fleet_catalog.signals("taxi")}
    finally:
        repos.close()
    assert sorted(table.values()) == list(range(1, 121)) and len(table) == 120
    assert told[0] == told[1] == table  # both were told what the database holds


# -- the coordinator ---------------------------------------------------------------------------------

CAR = Caller.device("car-1", transport="test", proven=True)
OPERATOR = Caller.operator("ops", Role.OPERATOR)
VIEWER = Caller.operator("eyes", Role.VIEWER)


@pytest.fixture(params=["parquet", "iceberg"])
def coordinator(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Coordinator]:
    tables = TableSettings(format="iceberg", batch_wait_s=0) if request.param == "iceberg" else None
    c = Coordinator(tmp_path / "cloud", clock=lambda: NOW, tables=tables)
    try:
        yield c
    finally:
        c.close()


def hello(device_id: str, *signals: tuple[int, str, DataType], fleet_ids: bool = True) -> device_pb2.Hello:
    h = device_pb2.Hello(device_id=device_id, fleet="taxi", fleet_ids=fleet_ids, data_origin="sim")
    for i, path, dtype in signals:
        h.catalog.add(id=i, path=path, data_type=int(dtype), unit="u")  # type: ignore[arg-type]
    return h


def connect(c: Coordinator, h: device_pb2.Hello) -> list[device_pb2.CloudMessage]:
    caller = Caller.device(h.device_id, transport="test", proven=True)
    c.devices.connect(caller, h, NOW)
    return c.devices.welcome(caller)


def assignment_in(messages: list[device_pb2.CloudMessage]) -> dict[str, int] | None:
    found = [m.catalog_assignment for m in messages if m.WhichOneof("kind") == "catalog_assignment"]
    if not found:
        return None
    return {s.path: s.id for s in assignment_from_wire(found[0]).signals}


def upload(c: Coordinator, device_id: str, columns: dict[int, DataType], t0: int, capture: str) -> None:
    t = (NOW - 60) * 1e9 + t0 + np.arange(10, dtype=np.int64) * 1_000_000
    values = {i: (np.arange(10.0) if d is F else np.arange(10)) for i, d in columns.items()}
    seg = Segment(new_segment_id(), "g", t.astype(np.int64), values, dict(columns))
    request = ingest_pb2.UploadSegmentRequest(
        device_id=device_id, segment_id=seg.segment_id, capture_id=capture, campaign="c", priority=5,
        segment=encode_segment(seg),
    )  # fmt: skip
    ack = c.ingest.segment(Caller.device(device_id, transport="test", proven=True), request, NOW)
    assert ack.samples == 10 * len(columns)


def rows(c: Coordinator, device_id: str) -> list[tuple[object, ...]]:
    sql = (f"SELECT capture_id, signal, count(*) FROM samples WHERE device_id = '{device_id}' "
           "GROUP BY 1, 2 ORDER BY 1, 2")  # fmt: skip
    return [tuple(r) for r in c.queries.sql(Caller.local(), sql).rows]


def test_a_device_learns_its_fleet_ids_and_segments_under_either_id_land_under_the_path(
    coordinator: Coordinator,
) -> None:
    c = coordinator
    c.catalogs.push(OPERATOR, "taxi", {"signals": [{"path": "Vehicle.Gear", "data_type": "int64"}]}, NOW)
    speed_local, gear_local = LOCAL_ID_MIN + 11, LOCAL_ID_MIN + 12
    # offline, the device gave both signals local ids and wrote a segment with them
    welcome = connect(c, hello("car-1", (speed_local, "Vehicle.Speed", F), (gear_local, "Vehicle.Gear", INT)))
    assert welcome[0].welcome.assigns_catalog_ids
    assert assignment_in(welcome) == {"Vehicle.Gear": 1, "Vehicle.Speed": 2}  # pushed first: Gear is 1
    upload(c, "car-1", {speed_local: F, gear_local: INT}, 0, "before")  # written before the assignment
    upload(c, "car-1", {2: F, 1: INT}, 1_000_000_000, "after")  # written after it
    expected = [("after", "Vehicle.Gear", 10), ("after", "Vehicle.Speed", 10),
                ("before", "Vehicle.Gear", 10), ("before", "Vehicle.Speed", 10)]  # fmt: skip
    assert rows(c, "car-1") == expected
    # the console's capture view names the paths, with their units
    for capture in ("before", "after"):
        detail = c.captures.detail(VIEWER, capture, "car-1", NOW)
        shown = sorted((s.signal, s.unit) for s in detail.signals)
        assert shown == [("Vehicle.Gear", "u"), ("Vehicle.Speed", "u")]
    # the next hello says the fleet ids; a segment still carrying a local id decodes all the same
    again = connect(c, hello("car-1", (2, "Vehicle.Speed", F), (1, "Vehicle.Gear", INT)))
    assert assignment_in(again) == {"Vehicle.Gear": 1, "Vehicle.Speed": 2}
    upload(c, "car-1", {speed_local: F}, 2_000_000_000, "late")
    assert ("late", "Vehicle.Speed", 10) in rows(c, "car-1")
    # a second device of the fleet gets the same ids
    assert assignment_in(connect(c, hello("car-2", (LOCAL_ID_MIN + 1, "Vehicle.Speed", F)))) == {
        "Vehicle.Speed": 2
    }


def test_a_device_from_before_fleet_ids_keeps_its_own_ids(coordinator: Coordinator) -> None:
    c = coordinator
    connect(c, hello("car-1", (LOCAL_ID_MIN, "Vehicle.Speed", F)))  # Speed takes fleet id 1
    old = hello("old-1", (1, "Vehicle.Gear", INT), (2, "Vehicle.Speed", F), fleet_ids=False)
    messages = connect(c, old)
    assert assignment_in(messages) is None  # an old agent is sent nothing it cannot read
    record = c.repositories.devices.get("old-1")
    assert record is not None and [(e["id"], e["path"]) for e in record.catalog] == [
        (1, "Vehicle.Gear"), (2, "Vehicle.Speed")]  # fmt: skip
    upload(c, "old-1", {1: INT, 2: F}, 0, "old")  # its id 1 is its Gear, not the fleet's Speed
    assert rows(c, "old-1") == [("old", "Vehicle.Gear", 10), ("old", "Vehicle.Speed", 10)]
    assert [s.path for s in c.repositories.fleet_catalog.signals("taxi")] == ["Vehicle.Speed", "Vehicle.Gear"]


def test_a_datatype_the_fleet_has_otherwise_keeps_the_devices_local_id(coordinator: Coordinator) -> None:
    c = coordinator
    c.catalogs.push(OPERATOR, "taxi", {"signals": [{"path": "Vehicle.Gear", "data_type": "string"}]}, NOW)
    found = [m for m in connect(c, hello("car-1", (LOCAL_ID_MIN + 3, "Vehicle.Gear", INT)))
             if m.WhichOneof("kind") == "catalog_assignment"]  # fmt: skip
    (refusal,) = found[0].catalog_assignment.refused
    assert refusal.path == "Vehicle.Gear" and "is STRING in the fleet's catalog" in refusal.reason
    upload(c, "car-1", {LOCAL_ID_MIN + 3: INT}, 0, "cap")
    assert rows(c, "car-1") == [("cap", "Vehicle.Gear", 10)]


@pytest.mark.parametrize(
    ("signals", "message"),
    [
        ([(5, "A", F), (5, "B", F)], "id 5 names both 'A' and 'B'"),
        ([(LOCAL_ID_MIN, "A", F), (LOCAL_ID_MIN + 1, "A", F)], "signal 'A' comes twice"),
        ([(0, "A", F)], "outside 1"),
        ([(9, "A", F)], "signal 'A' claims fleet id 9; the fleet's id for it is 1"),
        ([(LOCAL_ID_MIN + 7, "B", F)], f"local id {LOCAL_ID_MIN + 7} was 'A''s, now 'B''s"),
    ],
)
def test_a_hostile_hello_is_refused_and_changes_nothing(
    coordinator: Coordinator, signals: list[tuple[int, str, DataType]], message: str
) -> None:
    c = coordinator
    connect(c, hello("car-1", (LOCAL_ID_MIN + 7, "A", F)))
    before = c.repositories.devices.get("car-1"), c.repositories.fleet_catalog.signals("taxi")
    with pytest.raises(MalformedMessageError, match=message):
        connect(c, hello("car-1", *signals))
    assert (c.repositories.devices.get("car-1"), c.repositories.fleet_catalog.signals("taxi")) == before


def test_pushing_a_catalog_needs_an_operator_is_audited_and_says_what_it_refused(
    coordinator: Coordinator,
) -> None:
    c = coordinator
    doc = {"signals": [{"path": "Vehicle.Speed", "data_type": "float64", "unit": "km/h", "source": "x"},
                       {"path": "Vehicle.Gear", "data_type": "int64"}]}  # fmt: skip
    with pytest.raises(PermissionDeniedError, match=r"catalog\.push needs role operator or admin"):
        c.catalogs.push(VIEWER, "taxi", doc, NOW)
    result = c.catalogs.push(OPERATOR, "taxi", doc, NOW)
    assert (result["added"], result["refused"]) == (2, [])
    as_bool = {"signals": [{"path": "Vehicle.Gear", "data_type": "bool"}]}
    again = c.catalogs.push(OPERATOR, "taxi", as_bool, NOW)
    assert again["added"] == 0 and "is INT64 in the fleet's catalog" in again["refused"][0]["reason"]
    assert c.catalogs.list(VIEWER, "taxi") == [
        {"id": 1, "path": "Vehicle.Speed", "data_type": "float64", "unit": "km/h"},
        {"id": 2, "path": "Vehicle.Gear", "data_type": "int64", "unit": ""},
    ]
    entries = c.audit.entries(VIEWER, AuditFilter(kind="catalog.push"))
    assert [(e.actor, e.target, e.after) for e in entries] == [("ops", "taxi", "2 signals"),
                                                               ("ops", "taxi", "2 signals")]  # fmt: skip
    with pytest.raises(UserError, match=r"signal 'X': data_type must be one of .*, got 'float'$"):
        c.catalogs.push(OPERATOR, "taxi", {"signals": [{"path": "X", "data_type": "float"}]}, NOW)
    with pytest.raises(UserError, match="a list 'signals'"):
        c.catalogs.push(OPERATOR, "taxi", [1, 2], NOW)


def test_the_bounded_lists_of_fleet_ids_are_counted_with_their_drops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fleetloop_cloud.services import devices

    monkeypatch.setattr(devices, "PENDING_ASSIGNMENTS", 2)
    c = Coordinator(tmp_path / "cloud", clock=lambda: NOW)
    try:

        def metric(name: str) -> float:
            text = c.metrics.exposition()[0].decode()
            found = [line.split()[-1] for line in text.splitlines() if line.split(" ")[0] == name]
            assert found, f"{name} not exported"
            return float(found[0])

        assert metric("fleetloop_catalog_assignments_pending") == 0
        for n in range(3):  # hellos whose welcomes never came: the oldest assignment is dropped
            c.devices.connect(Caller.device(f"car-{n}", transport="test", proven=True),
                              hello(f"car-{n}", (LOCAL_ID_MIN, "A", F)), NOW)  # fmt: skip
        assert metric("fleetloop_catalog_assignments_pending") == 2
        assert metric("fleetloop_catalog_assignments_dropped_total") == 1
        connect(c, hello("car-2", (LOCAL_ID_MIN, "A", F)))
        assert metric("fleetloop_catalog_assignments_pending") == 1
        # a path whose local id changed at every hello: 16 aliases kept, the oldest beyond dropped
        for k in range(18):
            connect(c, hello("car-9", (LOCAL_ID_MIN + 100 + k, "A", F)))
        assert metric("fleetloop_catalog_aliases_dropped_total") == 2
        stored = c.repositories.devices.get("car-9")
        assert stored is not None and len(stored.catalog[0]["aliases"]) == 16
    finally:
        c.close()
