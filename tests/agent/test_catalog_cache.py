"""The device's cache of fleet catalog ids: local ids for signals the fleet has not assigned (stable,
durable, never another path's), the cloud's assignment taken in or refused whole, and the agent end to
end — offline with local ids, then online where new segments carry the fleet's ids and every row lands
under its path, then offline again from the cache."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from fleetloop_agent.catalog_cache import CatalogIds, local_id_for
from fleetloop_agent.config import load_agent_config
from fleetloop_agent.local_store import LocalStore
from fleetloop_agent.runtime import AgentRuntime
from fleetloop_cloud.grpc_api import start_grpc_server
from fleetloop_cloud.server import Coordinator
from fleetloop_cloud.services.access import Caller
from fleetloop_shared.catalog import Catalog, DataType, SignalSpec
from fleetloop_shared.catalog_ids import LOCAL_ID_MAX, LOCAL_ID_MIN, Assignment, is_fleet_id, is_local_id
from fleetloop_shared.errors import MalformedMessageError
from fleetloop_shared.segment import Segment
from tests.agent.test_runtime import free_port, make_config, wait_for

F, INT = DataType.FLOAT64, DataType.INT64
#: A capture of everything every two seconds of data (with the replay at 8×: several a second).
OFTEN = """
apiVersion: fleetloop/v1
kind: Campaign
metadata: {name: often, version: 1}
spec:
  trigger: {when: "Vehicle.Speed > -1", mode: always, min_interval: 2s}
  collect: {signals: ["*"], pre: 1s, post: 1s}
  priority: 8
"""


def test_a_signal_without_a_fleet_id_gets_a_local_id_from_its_path_and_keeps_it(tmp_path: Path) -> None:
    path = tmp_path / "catalog_ids.json"
    ids = CatalogIds(path, "taxi")
    speed = ids.assign("Vehicle.Speed", F)
    assert is_local_id(speed) and speed == local_id_for("Vehicle.Speed", set())
    assert ids.assign("Vehicle.Speed", F) == speed and not path.exists()  # written when saved
    ids.save()
    assert CatalogIds(path, "taxi").assign("Vehicle.Speed", F) == speed
    path.unlink()  # a device whose cache is lost gives the same local id again
    assert CatalogIds(path, "taxi").assign("Vehicle.Speed", F) == speed
    # a collision takes the next free id, wrapping at the top of the range
    assert local_id_for("Vehicle.Speed", {speed}) == (speed + 1 if speed < LOCAL_ID_MAX else LOCAL_ID_MIN)


def test_an_assignment_is_cached_and_used_from_the_next_start(tmp_path: Path) -> None:
    path = tmp_path / "catalog_ids.json"
    ids = CatalogIds(path, "taxi")
    catalog = Catalog(assign=ids.assign)
    speed, gear = catalog.add("Vehicle.Speed", F), catalog.add("Vehicle.Gear", INT)
    ids.save()
    assert ids.segment_ids(catalog) == {}
    ids.apply(Assignment("taxi", (SignalSpec(7, "Vehicle.Speed", F), SignalSpec(8, "Vehicle.Gear", F)),
                         (("Vehicle.Gear", "is FLOAT64 in the fleet"),)))  # fmt: skip
    # this run keeps its ids; segments carry the fleet's where the datatype agrees
    assert ids.segment_ids(catalog) == {speed.id: 7}
    later = CatalogIds(path, "taxi")  # the next start, offline
    again = Catalog(assign=later.assign)
    assert again.add("Vehicle.Speed", F).id == 7 and again.add("Vehicle.Gear", INT).id == gear.id
    assert CatalogIds(path, "bus").assign("Vehicle.Speed", F) == speed.id  # another fleet's ids are not ours


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        (Assignment("taxi", (SignalSpec(9, "Vehicle.Speed", F),)), "signal 'Vehicle.Speed' has id 7, not 9"),
        (Assignment("taxi", (SignalSpec(7, "Vehicle.Gear", F),)), "id 7 is 'Vehicle.Speed''s"),
        (Assignment("bus", (SignalSpec(7, "Vehicle.Speed", F),)), "this device is in fleet 'taxi'"),
    ],
)
def test_an_assignment_that_reassigns_is_refused_and_the_cache_stays(
    tmp_path: Path, assignment: Assignment, message: str
) -> None:
    path = tmp_path / "catalog_ids.json"
    ids = CatalogIds(path, "taxi")
    ids.apply(Assignment("taxi", (SignalSpec(7, "Vehicle.Speed", F),)))
    before = path.read_bytes()
    with pytest.raises(MalformedMessageError, match=message):
        ids.apply(assignment)
    assert path.read_bytes() == before and ids.fleet_ids == CatalogIds(path, "taxi").fleet_ids


@pytest.mark.parametrize(
    "text",
    ["{not json", '{"fleet": "taxi", "fleet_ids": {"A": [0, "FLOAT64", ""]}, "local_ids": {}}',
     '{"fleet": "taxi", "fleet_ids": {}, "local_ids": {"A": 5}}',
     '{"fleet": "taxi", "fleet_ids": {"A": [1, "NOPE", ""]}, "local_ids": {}}', "[]"],
)  # fmt: skip
def test_an_unreadable_cache_is_ignored_with_a_warning(
    tmp_path: Path, text: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "catalog_ids.json"
    path.write_text(text)
    ids = CatalogIds(path, "taxi")
    assert ids.fleet_ids == {} and ids.local_ids == {} and "ignoring unreadable" in caplog.text


def test_the_agent_moves_from_local_to_fleet_ids_mid_life(tmp_path: Path, recordings: Path) -> None:
    port = free_port()
    coordinator = Coordinator(tmp_path / "cloud")
    keys = tmp_path / "cloud" / "keys"
    config = load_agent_config(make_config(tmp_path / "dev", recordings, f"127.0.0.1:{port}", keys))
    desired = {"version": 1, "campaigns": [["often", 1, OFTEN]]}
    (config.state_dir / "campaigns.json").write_text(json.dumps(desired))
    runtime = AgentRuntime(config)
    assert runtime.catalog and all(is_local_id(s.id) for s in runtime.catalog)  # never online: all local
    written: list[set[int]] = []
    append = runtime.store.append

    def recording_append(seg: Segment, **kw: object) -> object:
        written.append({sid for g in seg.groups() for sid in g.columns})
        return append(seg, **kw)  # type: ignore[arg-type]

    runtime.store.append = recording_append  # type: ignore[method-assign]
    thread = threading.Thread(target=runtime.run, daemon=True)
    thread.start()
    server = None
    try:
        assert wait_for(lambda: written, 60), "no capture while offline"
        offline = len(written)
        assert all(is_local_id(i) for ids in written for i in ids)
        coordinator.campaigns.apply(Caller.local(), OFTEN, source="often.yaml", now=time.time())  # kept on
        server, _ = start_grpc_server(coordinator, "127.0.0.1", port)
        assert wait_for(lambda: runtime.segment_ids, 30), runtime.link.last_error
        assert wait_for(lambda: len(written) > offline + 2, 60), "no capture after the assignment"
        assert wait_for(lambda: runtime.store.stats().segments_pending == 0, 30)
    finally:
        runtime.stop()
        thread.join(timeout=20)
        if server is not None:
            server.stop(grace=0).wait(2)
    # segments stored after the assignment carry the fleet's ids only
    fleet = {s.path: s.id for s in coordinator.repositories.fleet_catalog.signals("test")}
    late = written[-1]
    assert late and all(is_fleet_id(i) for i in late) and late <= set(fleet.values())
    # every row, before and after, is under a path of the device's catalog; none is lost
    rows = coordinator.queries.sql(
        Caller.local(), "SELECT DISTINCT signal FROM samples WHERE device_id = 'car-t1'"
    ).rows
    paths = {s.path for s in runtime.catalog}
    assert rows and {r[0] for r in rows} <= paths
    # every segment written was uploaded or is still in the store (the runtime captures until it stops,
    # and a segment appended after the last upload stays pending): none lost, none doubled
    store = LocalStore(config.store_dir, quota_bytes=config.store_quota_bytes)
    try:
        still_pending = store.stats().segments_pending
    finally:
        store.close()
    assert coordinator.repositories.segments.totals().segments + still_pending == len(written)
    # the cache on disk holds the fleet's ids; the next start (offline) uses them
    cached = json.loads((config.state_dir / "catalog_ids.json").read_text())
    assert cached["fleet"] == "test" and {p: v[0] for p, v in cached["fleet_ids"].items()} == {
        p: i for p, i in fleet.items() if p in paths
    }
    restarted = AgentRuntime(config)
    try:
        assert {s.path: s.id for s in restarted.catalog} == {p: fleet[p] for p in paths}
        assert restarted.segment_ids == {}
    finally:
        restarted.store.close()


def test_local_ids_beyond_the_bound_drop_the_oldest_and_count_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fleetloop_agent import catalog_cache

    monkeypatch.setattr(catalog_cache, "MAX_LOCAL_IDS", 2)
    ids = CatalogIds(tmp_path / "catalog_ids.json", "taxi")
    for path in ("A", "B", "C"):
        ids.assign(path, F)
    assert list(ids.local_ids) == ["B", "C"] and ids.local_ids_dropped == 1
