"""Hostile bytes made from real segments: whatever is changed, decoding ends in CorruptSegmentError (one
line) or in a segment that round-trips — never in another exception.

The segments are the real comma2k19 recordings (sensor groups and raw CAN frames grouped by message),
written at every format version, so the mutations land in the blocks of nearly every codec the writer
uses (plain, keyed, difference, recent values, dictionaries, grid floats, clock indices, time offsets)
and in format 6's compressed bodies, which are also mutated *inside* (opened, changed, compressed again)
so that the changes reach the decoders rather than only the zstd frame.
"""

from __future__ import annotations

import functools
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from segment_cases import reseal  # (tests/shared/conftest.py loads it)

from fleetloop_shared.catalog import DataType
from fleetloop_shared.datapaths import comma2k19_segment
from fleetloop_shared.errors import CorruptSegmentError
from fleetloop_shared.segment import (
    FLAG_BODY_ZSTD,
    ZSTD_FLAG,
    Segment,
    bundle_segments,
    decode_segment,
    encode_segment,
    framing,
)
from fleetloop_shared.segment.codecs import zstd_frames

SID = bytes(range(48, 64))
#: rows of each group taken (enough for keyed columns, recent values and dictionaries to be chosen)
ROWS = 3000
FIXED = 48


def _sensor_groups(root: Path) -> list[Segment]:
    log = comma2k19_segment(root) / "processed_log"
    groups = []
    first = 1
    for t_path in sorted(log.glob("*/*/t")):
        if t_path.parent.name == "raw_can":
            continue
        t = np.load(t_path)[:ROWS]
        value = np.load(t_path.parent / "value")[:ROWS].reshape(len(t), -1)
        columns = {
            first + j: np.ascontiguousarray(value[:, j], dtype=np.float64) for j in range(value.shape[1])
        }
        first += value.shape[1]
        name = f"{t_path.parent.parent.name}/{t_path.parent.name}"
        t_ns = np.round(t * 1e9).astype(np.int64)
        groups.append(Segment(SID, name, t_ns, columns, dict.fromkeys(columns, DataType.FLOAT64)))
    return groups


def _can_groups(root: Path, frames: int = 20_000, messages: int = 12) -> list[Segment]:
    """Raw CAN frames by message: groups that share arrival times (clock indices, time offsets)."""
    can = comma2k19_segment(root) / "processed_log" / "CAN" / "raw_can"
    t_ns = np.round(np.load(can / "t")[:frames] * 1e9).astype(np.int64)
    address = np.load(can / "address")[:frames].astype(np.int64)
    src = np.load(can / "src")[:frames].astype(np.int64)
    payload = np.frombuffer(np.load(can / "data")[:frames].astype("S8").tobytes(), dtype=">i8").astype(
        np.int64
    )
    found, counts = np.unique(address, return_counts=True)
    groups = []
    for k, a in enumerate(found[np.argsort(-counts, kind="stable")][:messages]):
        rows = address == a
        ids = (10_000 + 3 * k, 10_001 + 3 * k, 10_002 + 3 * k)
        groups.append(
            Segment(
                SID,
                f"can/{a}",
                t_ns[rows],
                dict(zip(ids, (payload[rows], src[rows], src[rows] >= 128), strict=True)),
                dict(zip(ids, (DataType.INT64, DataType.INT64, DataType.BOOL), strict=True)),
            )
        )
    return groups


@functools.cache
def real_segments(root: Path) -> tuple[bytes, ...]:
    sensors, can = _sensor_groups(root), _can_groups(root)
    out = [encode_segment(g, max_version=2) for g in sensors[:4]]
    for version in (4, 5, 6):
        for groups in (sensors, can):
            out += [encode_segment(b, max_version=version) for b in bundle_segments(groups)]
    return tuple(out)


def compressed(opened_body: bytes) -> bytes:
    """An opened format 6 body (flags cleared, no checksum) compressed again, as a writer would."""
    flags = struct.unpack_from("<H", opened_body, 6)[0] | FLAG_BODY_ZSTD
    head = opened_body[:6] + struct.pack("<H", flags) + opened_body[8:FIXED]
    return head + zstd_frames.compress(opened_body[FIXED:])


def expect_corrupt_or_sound(data: bytes, *, again: bool = True) -> None:
    """CorruptSegmentError with a one-line reason, or a segment (a changed value may still be a valid
    one) that round-trips when ``again``."""
    try:
        seg = decode_segment(data)
    except CorruptSegmentError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(seg, Segment)
    if again:
        assert decode_segment(encode_segment(seg)) == seg


def test_the_real_segments_cover_the_codecs_and_versions(recordings: Path) -> None:
    versions: set[int] = set()
    codecs: set[int] = set()
    for data in real_segments(recordings):
        versions.add(struct.unpack_from("<H", data, 4)[0])
        for group in framing.parse(framing.opened(data)).groups:
            codecs.update(block.codec & ~ZSTD_FLAG for block in group.blocks)
    assert versions == {2, 4, 5, 6}
    # every codec the writer uses on recordings without text (17 is never written, 64 needs text,
    # 34 a keyed integer column)
    assert codecs >= {2, 3, 4, 5, 16, 18, 19, 20, 21, 22, 23, 24, 33, 35, 48}, sorted(codecs)


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_mutated_real_segments_are_corrupt_or_sound(recordings: Path, data: st.DataObject) -> None:
    segments = real_segments(recordings)
    original = data.draw(st.sampled_from(segments))
    inside = struct.unpack_from("<H", original, 6)[0] & FLAG_BODY_ZSTD and data.draw(st.booleans())
    body = bytearray(framing.opened(original)[:-4] if inside else original[:-4])
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, len(body) - 1))
        action = data.draw(st.sampled_from(["set", "flip", "insert", "delete"]))
        if action == "set":
            body[at] = data.draw(st.integers(0, 255))
        elif action == "flip":
            body[at] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "insert":
            body[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        else:
            del body[at : at + data.draw(st.integers(1, 16))]
    if data.draw(st.booleans()):
        del body[data.draw(st.integers(0, len(body))) :]
    forged = compressed(bytes(body)) if inside and len(body) >= FIXED else bytes(body)
    if data.draw(st.integers(0, 9)) == 0:  # mostly resealed, as a forger would; else the checksum fails
        expect_corrupt_or_sound(forged + b"\x00\x00\x00\x00")
    else:
        expect_corrupt_or_sound(reseal(forged))


@pytest.mark.parametrize("which", range(4, 10))
def test_every_few_bytes_of_a_real_segment_changed_and_resealed(recordings: Path, which: int) -> None:
    """A sweep over each real multi-group segment (opened, for a compressed one): one byte at a time
    inverted at about 60 places, resealed; without resealing each is a checksum mismatch."""
    original = real_segments(recordings)[which]
    inside = bool(struct.unpack_from("<H", original, 6)[0] & FLAG_BODY_ZSTD)
    body = framing.opened(original)[:-4]
    for at in range(FIXED, len(body), max(1, len(body) // 60)):
        changed = bytearray(body)
        changed[at] ^= 0xFF
        forged = compressed(bytes(changed)) if inside else bytes(changed)
        expect_corrupt_or_sound(reseal(forged), again=False)
        with pytest.raises(CorruptSegmentError):
            decode_segment(forged + struct.pack("<I", zlib.crc32(forged) ^ 1))
