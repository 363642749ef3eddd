"""Resumable uploads: pieces cut anywhere, resent, lost or reordered, a coordinator restarted mid-upload —
the whole arrives once, exactly as sent; hostile pieces are refused; every bound has its policy."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetloop_cloud.server import Coordinator
from fleetloop_cloud.services.access import Caller
from fleetloop_cloud.services.ingest import ChunkAck
from fleetloop_cloud.uploads.staging import MAX_CHUNK_BYTES, UploadStaging
from fleetloop_shared.catalog import DataType
from fleetloop_shared.errors import MalformedMessageError, StorageFullError
from fleetloop_shared.segment import Segment, encode_segment, new_segment_id
from fleetloop_shared.wire import device_pb2, ingest_pb2

DEVICE = "car-1"
CALLER = Caller.device(DEVICE, transport="test", proven=True)


def staging(path: Path, **kw: int) -> UploadStaging:
    return UploadStaging(path, max_upload_bytes=kw.pop("max_upload_bytes", 1 << 20), **kw)


def send(st_: UploadStaging, sid: bytes, whole: bytes, offset: int, end: int) -> tuple[int, bytes | None]:
    out = st_.put(DEVICE, sid, offset=offset, total_bytes=len(whole),
                  total_sha256=hashlib.sha256(whole).digest(), data=whole[offset:end])
    return out.next_offset, out.whole


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 5000),
    pieces=st.integers(1, 20),
    script=st.lists(st.sampled_from(["send", "resend", "skip", "restart", "probe"]), max_size=60),
)
def test_any_cut_resend_loss_or_restart_delivers_the_whole_once(
    tmp_path_factory: pytest.TempPathFactory, size: int, pieces: int, script: list[str]
) -> None:
    """A device that only ever sends from what the cloud answered gets the exact bytes through, whatever
    the link does (resent pieces, lost pieces, the coordinator restarted, questions with no data)."""
    root = tmp_path_factory.mktemp("staging")
    whole, piece = os.urandom(size), max(1, size // pieces)
    sid = new_segment_id()
    st_ = staging(root)
    cursor, got, steps, restarted = 0, None, 0, 0
    for action in [*script, *["send"] * (len(whole) // piece + 2)]:
        steps += 1
        if got is not None:
            break
        if action == "restart":
            restarted += st_.counters["restarted"]
            st_ = staging(root)  # a coordinator restart: the staging file is the state
            continue
        if action == "probe":
            cursor, got = send(st_, sid, whole, cursor, cursor)
            continue
        if action == "skip":  # this piece is lost on the way: the device moves on regardless
            cursor = min(cursor + piece, len(whole) - 1)
            continue
        start = max(0, cursor - piece // 2) if action == "resend" else cursor
        cursor, got = send(st_, sid, whole, start, min(start + piece, len(whole)))
    while got is None:  # what is left: follow the cloud's answers
        cursor, got = send(st_, sid, whole, cursor, min(cursor + piece, len(whole)))
    assert got == whole
    assert list(root.rglob("*.part")) == []
    # No byte was ever staged twice or out of place: the hash never had to throw the staging away.
    assert restarted + st_.counters["restarted"] == 0


def test_garbage_in_the_staging_file_is_caught_by_the_hash_and_restarts(tmp_path: Path) -> None:
    st_ = staging(tmp_path)
    sid, whole = new_segment_id(), os.urandom(3000)
    assert send(st_, sid, whole, 0, 1000) == (1000, None)
    (part,) = tmp_path.rglob("*.part")
    part.write_bytes(b"\0" * 1000)  # what a crash may leave behind
    assert send(st_, sid, whole, 1000, 3000) == (0, None)
    assert st_.counters["restarted"] == 1
    assert send(st_, sid, whole, 0, 3000) == (3000, whole)


def test_hostile_pieces_are_refused_with_what_was_wrong(tmp_path: Path) -> None:
    st_ = staging(tmp_path, max_upload_bytes=10_000)
    sid, sha = new_segment_id(), b"\1" * 32

    def put(**kw: object) -> None:
        args: dict[str, object] = {"offset": 0, "total_bytes": 100, "total_sha256": sha, "data": b"x"}
        args.update(kw)
        st_.put(str(args.pop("device", DEVICE)), args.pop("sid", sid), **args)  # type: ignore[arg-type]

    cases = [
        ({"device": "../etc"}, "not a valid device id"),
        ({"sid": b"short"}, "segment id must be 16 bytes"),
        ({"total_sha256": b"x"}, "total_sha256 must be 32 bytes"),
        ({"total_bytes": 10**12}, "outside 1..10000"),
        ({"total_bytes": 0}, "outside 1..10000"),
        ({"data": b"x" * (MAX_CHUNK_BYTES + 1), "total_bytes": 10_000}, "at most"),
        ({"offset": 99, "data": b"xx"}, "runs past total_bytes 100"),
    ]
    for kw, message in cases:
        with pytest.raises(MalformedMessageError, match=message):
            put(**kw)
    assert list(tmp_path.rglob("*.part")) == []


def test_bounds_evict_a_devices_oldest_partial_and_refuse_when_full(tmp_path: Path) -> None:
    st_ = staging(tmp_path, max_per_device=2, max_total_bytes=2500)
    wholes = [(new_segment_id(), os.urandom(2000)) for _ in range(3)]
    for sid, whole in wholes:
        send(st_, sid, whole, 0, 1000)
    assert st_.counters["evicted"] == 1  # the third partial pushed out the first
    assert send(st_, wholes[0][0], wholes[0][1], 0, 0) == (0, None)  # gone: starts again
    assert send(st_, wholes[2][0], wholes[2][1], 0, 0) == (1000, None)
    with pytest.raises(StorageFullError, match="upload staging is full"):
        send(st_, wholes[1][0], wholes[1][1], 1000, 2000)  # 2000 staged + 1000 > 2500
    assert send(st_, wholes[1][0], wholes[1][1], 0, 0) == (1000, None)  # nothing was lost
    assert st_.expire(now=2e10) == 2 and st_.staged_bytes() == 0


def _coordinator(tmp_path: Path) -> Coordinator:
    c = Coordinator(tmp_path / "cloud")
    hello = device_pb2.Hello(device_id=DEVICE, fleet="test", labels={"kind": "car"}, data_origin="recordings")
    hello.catalog.add(id=1, path="Vehicle.Speed", data_type=device_pb2.DATA_TYPE_FLOAT64, unit="km/h")
    c.devices.connect(CALLER, hello, time.time())
    return c


def chunk(c: Coordinator, sid: bytes, whole: bytes, offset: int, size: int) -> ChunkAck:
    request = ingest_pb2.UploadChunkRequest(
        device_id=DEVICE, segment_id=sid, offset=offset, total_bytes=len(whole),
        total_sha256=hashlib.sha256(whole).digest(), data=whole[offset:offset + size],
    )  # fmt: skip
    return c.ingest.chunk(CALLER, request, time.time())


def test_a_segment_uploaded_in_pieces_across_a_restart_lands_once(tmp_path: Path) -> None:
    rows = 200_000
    sid = new_segment_id()
    seg = Segment(sid, "speed", np.arange(rows, dtype=np.int64) * 10_000_000 + 1_700_000_000 * 10**9,
                  {1: np.random.default_rng(1).normal(50, 10, rows)}, {1: DataType.FLOAT64})
    whole = ingest_pb2.UploadSegmentRequest(
        device_id=DEVICE, segment_id=sid, capture_id="cap", campaign="c", priority=5,
        segment=encode_segment(seg),
    ).SerializeToString()
    assert len(whole) > 3 * 256 * 1024

    def put(c: Coordinator, offset: int, size: int) -> tuple[int, bool, bool]:
        ack = chunk(c, sid, whole, offset, size)
        return ack.next_offset, ack.ack is not None, bool(ack.ack and ack.ack.duplicate)

    c = _coordinator(tmp_path)
    assert put(c, 0, 256 * 1024) == (256 * 1024, False, False)
    del c  # the coordinator dies mid-upload
    c = _coordinator(tmp_path)
    offset, done, _ = put(c, 0, 0)  # where are we?
    assert (offset, done) == (256 * 1024, False)
    while not done:
        offset, done, duplicate = put(c, offset, 256 * 1024)
    assert not duplicate
    count = "SELECT count(*) FROM samples"
    assert c.queries.sql(Caller.local(), count).rows[0][0] == rows
    assert put(c, 0, 256 * 1024) == (len(whole), True, True)  # a retry of the finished upload
    assert c.queries.sql(Caller.local(), count).rows[0][0] == rows


def test_an_assembled_upload_claiming_another_device_is_refused(tmp_path: Path) -> None:
    c = _coordinator(tmp_path)
    sid = new_segment_id()
    claim = ingest_pb2.UploadSegmentRequest(device_id="car-2", segment_id=sid, segment=b"x")
    whole = claim.SerializeToString()
    with pytest.raises(MalformedMessageError, match="names another device or segment"):
        chunk(c, sid, whole, 0, len(whole))
    garbage = b"\xff" * 40
    with pytest.raises(MalformedMessageError, match="cannot decode"):
        chunk(c, new_segment_id(), garbage, 0, len(garbage))
