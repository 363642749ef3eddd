"""Decoding: segment bytes to a :class:`Segment`, or a :class:`CorruptSegmentError` with a one-line reason.

The framing is read and checked first (:mod:`.framing`), then each block is decoded through the
registry, group by group and within a group in the order its columns can be decoded (a keyed column
after its key, a difference after the column it names), and finally the time range the header
declares is compared with the times decoded.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy.typing as npt

from fleetloop_shared.errors import CorruptSegmentError
from fleetloop_shared.segment import framing, registry
from fleetloop_shared.segment.model import Segment


def decode_segment(data: bytes) -> Segment:
    """Parse and verify segment bytes; any defect raises :class:`CorruptSegmentError` with a one-line reason.

    Order matters: framing (lengths) is checked first so truncation is reported as such, then the
    checksum, and only then are blocks decompressed — never more than the header implies. A format 6
    compressed body is the exception: its checksum is verified first, then the body decompressed
    (capped, see :data:`BODY_MAX_RATIO`), then its framing checked as above.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CorruptSegmentError(f"segment must be bytes, got {type(data).__name__}")
    data = bytes(data)
    try:
        opened = framing.opened(data)
        header = framing.parse(opened)
        if opened is data:  # (an opened body's checksum was verified before decompressing it)
            framing.check_crc(data)
        return _decode_groups(header)
    except (struct.error, ValueError) as exc:  # defensive: every case is checked before
        raise CorruptSegmentError(f"segment undecodable: {exc}") from None


def _decode_groups(header: framing.Header) -> Segment:
    parts: list[Segment] = []
    reading = registry.Reading(header.version, earlier=parts)
    if header.clock is not None:
        reading.clock = registry.decode(header.clock, header.clock_rows, reading)
    for group in header.groups:
        parts.append(_decode_group(header.segment_id, group, reading))
    ranges = [(int(p.t_ns.min()), int(p.t_ns.max())) for p in parts if p.t_ns.shape[0]]
    first = min((r[0] for r in ranges), default=0)
    last = max((r[1] for r in ranges), default=0)
    if (first, last) != (header.first_ns, header.last_ns):
        raise CorruptSegmentError(
            f"header time range {header.first_ns}..{header.last_ns} differs from timestamps {first}..{last}"
        )
    head = parts[0]
    head.more_groups = tuple(parts[1:])
    return head


def _decode_group(segment_id: bytes, header: framing.GroupHeader, reading: registry.Reading) -> Segment:
    """One group's segment; ``reading`` carries what the groups before it left (the text the segment
    may still hold among it)."""
    rows = header.rows
    t_ns = registry.decode(header.blocks[0], rows, reading)
    reading.data_types = dict(header.columns)
    reading.codecs = {
        signal_id: block.codec
        for (signal_id, _), block in zip(header.columns, header.blocks[1:], strict=True)
    }
    decoded: dict[int, npt.NDArray[Any]] = {}
    reading.decoded = decoded
    reading.orders = {}
    # in the order columns can be decoded (a stable sort: within a stage, the descriptors' order)
    for (signal_id, _), block in sorted(
        zip(header.columns, header.blocks[1:], strict=True),
        key=lambda column: registry.stage(column[1].codec),
    ):
        decoded[signal_id] = registry.decode(block, rows, reading)
    columns = {signal_id: decoded[signal_id] for signal_id, _ in header.columns}
    return Segment(segment_id, header.group, t_ns, columns, reading.data_types)
