"""Framing: the fixed header, groups, column descriptors, block headers and checksum, both ways.

Reading trusts nothing: every length is checked against what the header implies *before* anything is
allocated or decompressed, and every codec a descriptor names is checked with the registry (valid for
the column's data type, known at the segment's version), so hostile or truncated bytes end in
:class:`CorruptSegmentError` naming where — never in a crash or a huge allocation. A format 6
compressed body is opened first (checksum, then a capped decompression) and then read like any other.
Writing lays out blocks the encoder already made.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fleetloop_shared.catalog import DataType
from fleetloop_shared.errors import CorruptSegmentError
from fleetloop_shared.segment import registry
from fleetloop_shared.segment.codecs import StreamError, zstd_frames
from fleetloop_shared.segment.layout import (
    BLOCK,
    BODY_MAX_RATIO,
    BODY_MAX_SLACK,
    COLUMN,
    CRC,
    FIXED,
    FLAG_BODY_ZSTD,
    MAGIC,
    MAX_CELLS,
    MAX_COLUMNS,
    MAX_GROUP_BYTES,
    MAX_GROUPS,
    MAX_ROWS,
    READ_VERSIONS,
    SMALLEST_BODY,
    U16,
    U32,
    ZSTD_FLAG,
    Block,
    Encoded,
)

# ------------------------------------------------------------------------------------------- writing


def fixed_header(
    version: int, flags: int, segment_id: bytes, rows: int, first_ns: int, last_ns: int
) -> bytes:
    return FIXED.pack(MAGIC, version, flags, segment_id, rows, first_ns, last_ns)


def group(
    name: str, rows: int | None, columns: Sequence[tuple[int, DataType]], blocks: Sequence[Encoded]
) -> list[bytes]:
    """A group's parts: its name, its row count (format 4 on; ``None`` in formats 2/3, where the fixed
    header's is the group's), its time codec, its column descriptors, then its blocks (the time block
    first) as *Blocks* frames them. (Parts, not bytes: a body is joined once, not copied per group.)"""
    encoded = name.encode("utf-8")
    parts = [U16.pack(len(encoded)), encoded]
    if rows is not None:
        parts.append(U32.pack(rows))
    parts += [bytes([blocks[0].codec]), U16.pack(len(columns))]
    parts += [
        COLUMN.pack(signal_id, int(data_type), block.codec)
        for (signal_id, data_type), block in zip(columns, blocks[1:], strict=True)
    ]
    return parts + _framed(blocks)


def several(groups: Sequence[list[bytes]], clock_rows: int, clock: Encoded) -> bytes:
    """The body of format 4 on: the group count, the shared clock, then the groups."""
    head = [U16.pack(len(groups)), U32.pack(clock_rows), *_framed([clock])]
    return b"".join(head + [part for parts in groups for part in parts])


def _framed(blocks: Sequence[Encoded]) -> list[bytes]:
    """Blocks as *Blocks* frames them: codec, decoded length, stored length, stored bytes."""
    parts: list[bytes] = []
    for block in blocks:
        parts += [BLOCK.pack(block.codec, block.raw_len, len(block.payload)), block.payload]
    return parts


def sealed(data: bytes) -> bytes:
    """The segment's bytes: ``data`` and its checksum."""
    return data + CRC.pack(zlib.crc32(data))


# ------------------------------------------------------------------------------------------- reading


class _Reader:
    """Bounds-checked cursor: every read names what it wanted, so truncation says where it happened."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise CorruptSegmentError(
                f"segment truncated at byte {len(self.data)}: {what} needs bytes {self.pos}..{end}"
            )
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def unpack(self, fmt: struct.Struct, what: str) -> tuple[Any, ...]:
        return fmt.unpack(self.take(fmt.size, what))


@dataclass(frozen=True)
class GroupHeader:
    group: str
    rows: int
    columns: list[tuple[int, DataType]]
    #: the time block, then one value block per column
    blocks: list[Block]


@dataclass(frozen=True)
class Header:
    segment_id: bytes
    version: int
    rows: int
    first_ns: int
    last_ns: int
    groups: list[GroupHeader]
    #: format 4's shared clock block (``None`` before format 4) and its row count
    clock: Block | None = None
    clock_rows: int = 0


def opened(data: bytes) -> bytes:
    """The segment as :func:`parse` reads it: a format 6 segment with a compressed body gets its
    checksum verified, then its body decompressed — never to more than :data:`BODY_MAX_RATIO` times the
    stored bytes — and its flag cleared (offsets in later errors are then offsets in the opened body).
    Every other segment is returned as it is."""
    if len(data) < FIXED.size or data[:4] != MAGIC:
        return data
    version, flags = struct.unpack_from("<HH", data, 4)
    if version not in READ_VERSIONS or version < 6 or not flags & FLAG_BODY_ZSTD:
        return data  # (an unknown version is refused by its number, before anything is decompressed)
    if len(data) < FIXED.size + CRC.size:
        raise CorruptSegmentError(
            f"segment truncated at byte {len(data)}: "
            f"the compressed body and checksum start at byte {FIXED.size}"
        )
    check_crc(data)
    stored = data[FIXED.size : len(data) - CRC.size]
    where = f"compressed body at byte {FIXED.size}"
    try:
        declared = zstd_frames.content_size(stored)
        limit = BODY_MAX_RATIO * len(stored) + BODY_MAX_SLACK
        if not SMALLEST_BODY <= declared <= limit:
            raise StreamError(
                f"declares {declared} bytes (at most {limit} for its {len(stored)} stored bytes)"
            )
        body = zstd_frames.decompress_at_most(stored, declared)
    except StreamError as exc:
        raise CorruptSegmentError(f"{where}: {exc}") from None
    if len(body) != declared:
        raise CorruptSegmentError(f"compressed body decompressed to {len(body)} bytes, declares {declared}")
    return data[:6] + U16.pack(flags & ~FLAG_BODY_ZSTD) + data[8 : FIXED.size] + body + data[-CRC.size :]


def check_crc(data: bytes) -> None:
    (stored,) = CRC.unpack_from(data, len(data) - CRC.size)
    actual = zlib.crc32(memoryview(data)[: len(data) - CRC.size])
    if stored != actual:
        raise CorruptSegmentError(f"checksum mismatch: stored 0x{stored:08x}, computed 0x{actual:08x}")


def parse(data: bytes) -> Header:
    """The header and block framing of an (opened) segment, every length and codec checked."""
    r = _Reader(data)
    if len(data) >= 4 and data[:4] != MAGIC:
        raise CorruptSegmentError(f"not a segment: magic is {data[:4]!r}, expected {MAGIC!r}")
    if len(data) >= 6:
        (version,) = U16.unpack_from(data, 4)
        if version not in READ_VERSIONS:
            raise CorruptSegmentError(
                f"unsupported segment format version {version} "
                f"(this build reads {', '.join(map(str, sorted(READ_VERSIONS)))})"
            )
    magic, version, flags, segment_id, rows, first_ns, last_ns = r.unpack(FIXED, "fixed header")
    if magic != MAGIC:  # pragma: no cover - checked above whenever 4 bytes exist
        raise CorruptSegmentError(f"not a segment: magic is {magic!r}")
    if flags != 0:
        raise CorruptSegmentError(f"unknown header flags 0x{flags:04x} at byte 6")
    if rows > MAX_ROWS:
        raise CorruptSegmentError(f"impossible row count {rows} (limit {MAX_ROWS})")
    if version < 4:
        one = _parse_group(r, version, rows, "", 0, set(), 0)
        header = Header(segment_id, version, rows, first_ns, last_ns, [one])
    else:
        (ngroups,) = r.unpack(U16, "group count")
        if not 1 <= ngroups <= MAX_GROUPS:
            raise CorruptSegmentError(f"impossible group count {ngroups} (1 … {MAX_GROUPS})")
        (clock_rows,) = r.unpack(U32, "clock row count")
        if clock_rows > rows:
            raise CorruptSegmentError(f"clock of {clock_rows} rows exceeds the segment's {rows} rows")
        clock = _parse_block(r, "clock block", registry.ids(registry.TS_INTSTREAM), clock_rows, version)
        groups: list[GroupHeader] = []
        seen: set[int] = set()
        total_rows = columns = 0
        cells = clock_rows
        for g in range(ngroups):
            where = f"group {g}: "
            part = _parse_group(r, version, -1, where, columns, seen, cells)
            groups.append(part)
            total_rows += part.rows
            columns += len(part.columns)
            cells += part.rows * (len(part.columns) + 1)
            if total_rows > rows:
                raise CorruptSegmentError(f"{where}rows add up to more than the segment's {rows}")
        if total_rows != rows:
            raise CorruptSegmentError(f"groups hold {total_rows} rows, header says {rows}")
        header = Header(segment_id, version, rows, first_ns, last_ns, groups, clock, clock_rows)
    r.take(CRC.size, "checksum")
    if r.pos != len(data):
        raise CorruptSegmentError(f"{len(data) - r.pos} unexpected bytes after the checksum")
    return header


def _parse_group(
    r: _Reader, version: int, rows: int, where: str, columns_before: int, seen: set[int], cells_before: int
) -> GroupHeader:
    """One group's header and block framing; ``rows`` < 0 means the group states its own (format 4)."""
    (group_len,) = r.unpack(U16, f"{where}group name length")
    if group_len > MAX_GROUP_BYTES:
        raise CorruptSegmentError(f"{where}group name length {group_len} exceeds {MAX_GROUP_BYTES}")
    group_bytes = r.take(group_len, f"{where}group name")
    try:
        name = group_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptSegmentError(f"{where}group name is not valid UTF-8") from None
    if rows < 0:
        (rows,) = r.unpack(U32, f"{where}row count")
        if rows > MAX_ROWS:
            raise CorruptSegmentError(f"{where}impossible row count {rows} (limit {MAX_ROWS})")
    ts_codec = r.take(1, f"{where}timestamp codec id")[0]
    registry.time_codec(ts_codec, version, where)
    (ncols,) = r.unpack(U16, f"{where}column count")
    if columns_before + ncols > MAX_COLUMNS:
        raise CorruptSegmentError(f"{where}impossible column count {ncols} (limit {MAX_COLUMNS})")
    if cells_before + rows * (ncols + 1) > MAX_CELLS:
        raise CorruptSegmentError(
            f"{where}impossible size: {rows} rows × {ncols} columns exceed {MAX_CELLS} cells"
        )
    columns: list[tuple[int, DataType]] = []
    codecs = [ts_codec]
    for i in range(ncols):
        signal_id, dt_raw, codec = r.unpack(COLUMN, f"{where}column {i} descriptor")
        try:
            data_type = DataType(dt_raw)
        except ValueError:
            raise CorruptSegmentError(f"{where}column {i}: unknown data type {dt_raw}") from None
        registry.value_codec(codec, data_type, version, f"{where}column {i}: ")
        if signal_id in seen:
            raise CorruptSegmentError(f"{where}column {i}: signal id {signal_id} appears twice")
        seen.add(signal_id)
        columns.append((signal_id, data_type))
        codecs.append(codec)
    found: list[Block] = []
    for i, expected_codec in enumerate(codecs):
        what = f"{where}timestamp block" if i == 0 else f"value block of signal {columns[i - 1][0]}"
        found.append(_parse_block(r, what, frozenset({expected_codec}), rows, version))
    return GroupHeader(name, rows, columns, found)


def _parse_block(r: _Reader, what: str, codecs: frozenset[int], rows: int, version: int) -> Block:
    start = r.pos
    codec, raw_len, stored_len = r.unpack(BLOCK, f"{what} header")
    if codec not in codecs:
        expected = next(iter(codecs)) if len(codecs) == 1 else "a timestamp codec"
        raise CorruptSegmentError(
            f"{what} at byte {start}: codec id {codec} differs from header's {expected}"
        )
    lo, hi = registry.bounds(codec, rows)
    if not lo <= raw_len <= hi:
        raise CorruptSegmentError(
            f"{what} at byte {start}: decoded length {raw_len} impossible for {rows} rows"
        )
    if not codec & ZSTD_FLAG and stored_len != raw_len:
        raise CorruptSegmentError(
            f"{what} at byte {start}: stored length {stored_len} differs from decoded length {raw_len}"
        )
    payload = r.take(stored_len, what)
    return Block(codec, raw_len, payload, what, version)
