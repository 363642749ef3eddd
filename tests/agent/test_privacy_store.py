"""The policy stamp of a capture in the device's store: kept in the file's envelope and the index, found
again when the index is lost, and sent with the upload; files without one read as before."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fleetloop_agent.local_store import ENVELOPE_VERSION, ENVELOPE_VERSION_PRIVACY, INDEX_FILE, LocalStore
from fleetloop_agent.uplink.uploader import upload_request
from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.samples import GroupBatch
from fleetloop_shared.segment import Segment, segment_from_batch


def _segment(catalog: Catalog) -> Segment:
    spec = catalog.add("Vehicle.Speed", DataType.FLOAT64)
    return segment_from_batch(GroupBatch("g", np.arange(5, dtype=np.int64), {spec.id: np.ones(5)}), catalog)


def test_the_stamp_survives_a_lost_index_and_goes_with_the_upload(tmp_path: Path) -> None:
    catalog = Catalog()
    store = LocalStore(tmp_path, quota_bytes=1 << 20)
    stamped = store.append(_segment(catalog), capture_id="c1", campaign="trips", priority=5, now_ns=1,
                           privacy="eu-cars@2#p10-abcd")  # fmt: skip
    plain = store.append(_segment(catalog), capture_id="c2", campaign="trips", priority=5, now_ns=2)
    versions = {e.segment_id: store.read(e.segment_id) for e in (stamped, plain)}
    files = {p.stem: p.read_bytes()[4] for p in (tmp_path / "segments").iterdir()}
    assert files == {
        stamped.segment_id.hex(): ENVELOPE_VERSION_PRIVACY,
        plain.segment_id.hex(): ENVELOPE_VERSION,
    }
    store.close()
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / (INDEX_FILE + suffix)).unlink(missing_ok=True)
    store = LocalStore(tmp_path, quota_bytes=1 << 20)  # re-indexed from the files
    try:
        by_id = {e.segment_id: e for e in store.pending()}
        assert by_id[stamped.segment_id].privacy == "eu-cars@2#p10-abcd"
        assert by_id[plain.segment_id].privacy == ""
        assert {i: store.read(i) for i in by_id} == versions
        req = upload_request("car-1", by_id[stamped.segment_id], b"")
        assert (req.privacy_policy, req.privacy_policy_version, req.privacy_key_id) == (
            "eu-cars",
            2,
            "p10-abcd",
        )
        req = upload_request("car-1", by_id[plain.segment_id], b"")
        assert (req.privacy_policy, req.privacy_policy_version, req.privacy_key_id) == ("", 0, "")
    finally:
        store.close()
