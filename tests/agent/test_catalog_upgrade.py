"""An agent upgraded in place over a store the older agent left: the segments it still holds carry
registration-order ids (1 … N), rewritten on the first start to the ids this agent uses before anything
is sent — every row then lands under its right path over real gRPC; a kill at any point of the rewrite
and a restart lose and double nothing; a segment the legacy catalog cannot explain is kept, unsent."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from fleetloop_agent.catalog_upgrade import MARKER_FILE, classify, legacy_catalog
from fleetloop_agent.config import AgentConfig, load_agent_config
from fleetloop_agent.local_store import LocalStore
from fleetloop_agent.runtime import AgentRuntime
from fleetloop_agent.sources import build_source
from fleetloop_cloud.grpc_api import start_grpc_server
from fleetloop_cloud.server import Coordinator
from fleetloop_cloud.services.access import Caller
from fleetloop_shared.catalog_ids import is_local_id
from fleetloop_shared.segment import Segment, decode_segment, encode_segment, segment_from_batch
from tests.agent.test_runtime import free_port, make_config, wait_for

NO_CAMPAIGNS = {"version": 1, "campaigns": []}


def write_legacy_store(config: AgentConfig, seconds: float, slice_s: float = 0.1) -> Counter[str]:
    """Fill the store as the older agent did: its catalog in registration order (``Catalog()``), one
    segment per group and read. Returns the samples stored per path."""
    start = time.time_ns()
    sources = [build_source(spec, base_dir=config.base_dir, start_ns=start) for spec in config.sources]
    catalog = legacy_catalog(sources)
    assert [s.id for s in catalog] == list(range(1, len(catalog) + 1))
    store = LocalStore(config.store_dir, quota_bytes=config.store_quota_bytes)
    rows: Counter[str] = Counter()
    try:
        for step in range(1, int(seconds / slice_s) + 1):
            for src in sources:
                for batch in src.read(start + int(step * slice_s * 1e9)):
                    seg = segment_from_batch(batch, catalog)
                    store.append(seg, capture_id=f"old-{step}", campaign="car", priority=5, now_ns=start)
                    for sid, values in batch.values.items():
                        rows[catalog.by_id(sid).path] += len(values)
    finally:
        store.close()
    assert rows, "the recordings gave no samples"
    return rows


def agent_config(tmp_path: Path, recordings: Path, port: int) -> tuple[AgentConfig, Coordinator]:
    coordinator = Coordinator(tmp_path / "cloud")  # makes the trust roots the config names
    config = load_agent_config(
        make_config(tmp_path / "dev", recordings, f"127.0.0.1:{port}", tmp_path / "cloud" / "keys")
    )
    (config.state_dir / "campaigns.json").write_text(json.dumps(NO_CAMPAIGNS))  # only the old segments
    return config, coordinator


def test_an_upgraded_agent_sends_the_old_agents_segments_under_their_paths(
    tmp_path: Path, recordings: Path
) -> None:
    port = free_port()
    config, coordinator = agent_config(tmp_path, recordings, port)
    expected = write_legacy_store(config, seconds=3)
    assert not (config.state_dir / "catalog_ids.json").exists()  # the older agent had no id cache
    runtime = AgentRuntime(config)
    upgrade = runtime.store_upgrade
    assert upgrade is not None and upgrade.rewritten > 0 and upgrade.held == 0 and upgrade.already == 0
    # rewritten before anything ran: every pending segment carries this agent's (local) ids
    for sid in runtime.store.pending_ids():
        seg = decode_segment(runtime.store.read(sid))
        assert all(is_local_id(k) for g in seg.groups() for k in g.columns)
    assert (config.state_dir / "catalog_ids.json").exists() and (config.store_dir / MARKER_FILE).exists()
    sample = runtime.metrics.registry.get_sample_value
    assert sample("fleetloop_agent_store_upgrade_rewritten_total") == upgrade.rewritten
    assert sample("fleetloop_agent_store_upgrade_held_total") == 0
    assert sample("fleetloop_agent_catalog_local_ids") == len(runtime.catalog)
    assert sample("fleetloop_agent_catalog_local_ids_dropped_total") == 0
    thread = threading.Thread(target=runtime.run, daemon=True)
    thread.start()
    server, _ = start_grpc_server(coordinator, "127.0.0.1", port)
    try:
        assert wait_for(lambda: runtime.store.stats().segments_pending == 0, 60), runtime.link.last_error
    finally:
        runtime.stop()
        thread.join(timeout=20)
        server.stop(grace=0).wait(2)
    rows = coordinator.queries.sql(
        Caller.local(), "SELECT signal, count(*) FROM samples WHERE device_id = 'car-t1' GROUP BY signal"
    ).rows
    assert {str(r[0]): int(r[1]) for r in rows} == dict(expected)
    assert coordinator.repositories.segments.totals().segments == upgrade.rewritten
    # the next start does not rewrite again
    again = AgentRuntime(config)
    try:
        assert again.store_upgrade is None
    finally:
        again.store.close()


CHILD = """
import sys
from fleetloop_agent.config import load_agent_config
from fleetloop_agent.runtime import AgentRuntime
runtime = AgentRuntime(load_agent_config(sys.argv[1]))
runtime.store.close()
"""
#: What CHILD imports before it starts: timed once, so that the kills start near the rewrite.
IMPORTS_ONLY = "import fleetloop_agent.config, fleetloop_agent.runtime"


def store_contents(config: AgentConfig, seen: dict[bytes, str] | None = None) -> dict[bytes, str]:
    """Each pending segment's id → ``legacy``/``done``, opening the store as a restart does.

    ``seen`` (a segment's bytes' digest → its class, kept between calls) spares decoding again what an
    earlier call classified: the same bytes are the same segment; every file is still read."""
    store = LocalStore(config.store_dir, quota_bytes=config.store_quota_bytes)
    sources = [build_source(s, base_dir=config.base_dir, start_ns=0) for s in config.sources]
    by_id = {s.id: s for s in legacy_catalog(sources)}
    seen = {} if seen is None else seen
    out = {}
    try:
        for sid in store.pending_ids():
            data = store.read(sid)
            digest = hashlib.blake2b(data, digest_size=16).digest()
            if digest not in seen:
                seen[digest] = classify(decode_segment(data), by_id)
            out[sid] = seen[digest]
        return out
    finally:
        store.close()


def test_a_kill_anywhere_in_the_rewrite_loses_and_doubles_nothing(tmp_path: Path, recordings: Path) -> None:
    config, _ = agent_config(tmp_path, recordings, free_port())
    expected = write_legacy_store(config, seconds=20, slice_s=0.05)
    seen: dict[bytes, str] = {}
    before = store_contents(config, seen)
    assert set(before.values()) == {"legacy"} and len(before) > 200
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # kills start just before a child could reach the rewrite on this machine at this moment (a loaded
    # machine takes seconds to import the agent) and come 15 % later each time, until one finishes
    startup = []
    for _ in range(2):  # the second with warm caches, as the children start
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", IMPORTS_ONLY], env=env, check=True)
        startup.append(time.monotonic() - t0)
    delay, kills, mid_rewrite = 0.5 * min(startup), 0, 0
    for _ in range(200):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(config.path)], env=env)
        try:
            child.wait(timeout=delay)
            break  # it finished on its own
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGKILL)
            child.wait()
            kills += 1
        now = store_contents(config, seen)
        # every segment still there, each either old or rewritten, never lost, never doubled
        assert set(now) == set(before) and set(now.values()) <= {"legacy", "done"}
        done = sum(1 for v in now.values() if v == "done")
        if 0 < done < len(now) and not (config.store_dir / MARKER_FILE).exists():
            mid_rewrite += 1
        delay = delay * 1.15 + 0.05
    else:
        raise AssertionError("the upgrade never finished")
    assert kills and mid_rewrite, f"no kill fell inside the rewrite ({kills} kills)"
    assert (config.store_dir / MARKER_FILE).exists() and (config.state_dir / "catalog_ids.json").exists()
    # done: every segment rewritten once, under this agent's ids of the same paths, samples all there
    runtime = AgentRuntime(config)
    try:
        assert runtime.store_upgrade is None
        rows: Counter[str] = Counter()
        ids = set(runtime.store.pending_ids())
        assert ids == set(before)
        for sid in ids:
            for g in decode_segment(runtime.store.read(sid)).groups():
                for k, values in g.columns.items():
                    rows[runtime.catalog.by_id(k).path] += len(values)
        assert rows == expected
    finally:
        runtime.store.close()


def one_second_legacy_store(tmp_path: Path, recordings: Path) -> tuple[AgentConfig, LocalStore]:
    """An agent's configuration and its store, open, holding one second of an older agent's segments."""
    config, _ = agent_config(tmp_path, recordings, free_port())
    write_legacy_store(config, seconds=1)
    return config, LocalStore(config.store_dir, quota_bytes=config.store_quota_bytes)


def with_columns(seg: Segment, ids: dict[int, int]) -> Segment:
    """``seg`` with only the columns ``ids`` names, each under its new id (old id → new id)."""
    return seg.__class__(seg.segment_id, seg.group, seg.t_ns,
                         {new: seg.columns[old] for old, new in ids.items()},
                         {new: seg.data_types[old] for old, new in ids.items()})  # fmt: skip


def test_a_segment_the_legacy_catalog_cannot_explain_is_kept_and_never_sent(
    tmp_path: Path, recordings: Path
) -> None:
    config, store = one_second_legacy_store(tmp_path, recordings)
    pending = store.pending_ids()
    seg = decode_segment(store.read(pending[0]))
    # a configuration that had one more signal: an id beyond what this configuration numbers
    beyond = max(k for g in seg.groups() for k in g.columns) + 10_000
    first = next(iter(seg.columns))
    store.replace(with_columns(seg, {first: beyond}))
    store.close()
    runtime = AgentRuntime(config)
    try:
        upgrade = runtime.store_upgrade
        assert upgrade is not None and upgrade.held == 1 and upgrade.rewritten == len(pending) - 1
        assert pending[0] not in runtime.store.pending_ids()
        assert (runtime.store.held_dir / (pending[0].hex() + ".seg")).is_file()
        assert runtime.metrics.registry.get_sample_value("fleetloop_agent_store_upgrade_held_total") == 1
    finally:
        runtime.store.close()


def test_a_file_replaced_before_its_index_row_is_reindexed_not_dropped(
    tmp_path: Path, recordings: Path
) -> None:
    config, store = one_second_legacy_store(tmp_path, recordings)
    sid = store.pending_ids()[0]
    seg = decode_segment(store.read(sid))
    path = config.store_dir / "segments" / (sid.hex() + ".seg")
    old = path.read_bytes()
    offset = len(old) - len(store.read(sid))
    store.close()
    moved = with_columns(seg, {k: k + 2**31 for k in seg.columns})
    blob = old[:offset] + encode_segment(moved)
    assert len(blob) != len(old)  # the index's size is now wrong, as after a kill inside replace()
    path.write_bytes(blob)
    reopened = LocalStore(config.store_dir, quota_bytes=config.store_quota_bytes)
    try:
        assert sid in reopened.pending_ids()
        assert decode_segment(reopened.read(sid)).columns.keys() == moved.columns.keys()
    finally:
        reopened.close()
