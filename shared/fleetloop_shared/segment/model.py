"""What a segment is: one or several groups' samples, with bit-exact equality; made from batches and
packed into multi-group bundles.

A segment is the unit the agent stores, the uplink sends and the cloud ingests. This module holds the
value only; its bytes are :mod:`.encode` and :mod:`.decode`'s.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.errors import UserError
from fleetloop_shared.samples import GroupBatch
from fleetloop_shared.segment.layout import MAX_CELLS, MAX_COLUMNS, MAX_GROUPS


def new_segment_id() -> bytes:
    """A 16-byte id that sorts by creation time (UUIDv7 layout: 48-bit ms timestamp, then random).

    Time order lets the cloud and the store list segments chronologically without a second key; the
    74 random bits make collisions between devices negligible without any coordination.
    """
    ms = time.time_ns() // 1_000_000
    raw = bytearray(ms.to_bytes(6, "big") + os.urandom(10))
    raw[6] = 0x70 | (raw[6] & 0x0F)  # version 7
    raw[8] = 0x80 | (raw[8] & 0x3F)  # RFC 4122 variant
    return bytes(raw)


@dataclass(eq=False)
class Segment:
    """One group's samples: a shared timestamp column and one value column per signal id.

    A segment may carry further groups in ``more_groups`` (format version 4): single-group segments of
    the same ``segment_id`` and no ``more_groups`` of their own. They exist because groups that share
    arrival times (the frames of one CAN bus) store those times once; everything that turns a segment
    into rows must walk :meth:`groups`, not just the first group's fields.

    Equality is bit-exact (NaN payloads and -0.0 included), which is what a codec round trip promises.
    """

    segment_id: bytes
    group: str
    t_ns: npt.NDArray[np.int64]
    columns: dict[int, npt.NDArray[Any]]
    data_types: dict[int, DataType]
    more_groups: tuple[Segment, ...] = ()

    @property
    def sample_count(self) -> int:
        """Number of (timestamp, value) samples: rows × columns, summed over every group."""
        own = int(self.t_ns.shape[0]) * len(self.columns)
        return own + sum(g.sample_count for g in self.more_groups)

    def groups(self) -> list[Segment]:
        """Every group of the segment as a single-group segment (the first one is this one's fields)."""
        if not self.more_groups:
            return [self]
        head = Segment(self.segment_id, self.group, self.t_ns, self.columns, self.data_types)
        return [head, *self.more_groups]

    def time_range(self) -> tuple[int, int] | None:
        """(earliest, latest) timestamp over every group, ``None`` when the segment has no rows."""
        times = [np.asarray(g.t_ns) for g in self.groups()]
        ranges = [(int(t.min()), int(t.max())) for t in times if t.size]
        if not ranges:
            return None
        return min(r[0] for r in ranges), max(r[1] for r in ranges)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Segment):
            return NotImplemented
        if (
            self.segment_id != other.segment_id
            or self.group != other.group
            or self.data_types != other.data_types
            or self.columns.keys() != other.columns.keys()
            or not _bits_equal(self.t_ns, other.t_ns)
            or len(self.more_groups) != len(other.more_groups)
        ):
            return False
        if not all(a == b for a, b in zip(self.more_groups, other.more_groups, strict=True)):
            return False
        return all(_bits_equal(self.columns[k], other.columns[k]) for k in self.columns)

    __hash__ = None  # type: ignore[assignment]


def _bits_equal(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> bool:
    if a.dtype == object or b.dtype == object:  # text: the same strings (their bytes are pointers)
        return (
            a.dtype == b.dtype
            and a.shape == b.shape
            and all(type(x) is type(y) and x == y for x, y in zip(a.tolist(), b.tolist(), strict=True))
        )
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and np.ascontiguousarray(a).tobytes() == (np.ascontiguousarray(b).tobytes())
    )


#: numpy dtype kinds that hold text: Python objects (``str``), fixed-width unicode, numpy 2 StringDType.
TEXT_KINDS = frozenset("OUT")


def segment_from_batch(batch: GroupBatch, catalog: Catalog, segment_id: bytes | None = None) -> Segment:
    """Turn a batch into a segment, typing each column as the catalog declares its signal.

    Values are converted to the catalog's dtype only where no information is lost in kind (ints to
    float64, bools to int64, numpy text to Python ``str``); anything else is a caller error, not a
    silent truncation or a number turned into text.
    """
    t_ns = np.asarray(batch.t_ns)
    if t_ns.ndim != 1 or t_ns.dtype.kind not in "iu":
        raise UserError(f"group {batch.group!r}: t_ns must be a 1-D integer array, got {t_ns.dtype}")
    columns: dict[int, npt.NDArray[Any]] = {}
    data_types: dict[int, DataType] = {}
    for signal_id, values in batch.values.items():
        data_type = catalog.by_id(signal_id).data_type
        arr = np.asarray(values)
        if (data_type is DataType.STRING) != (arr.dtype.kind in TEXT_KINDS):
            raise UserError(
                f"group {batch.group!r}: signal id {signal_id} is {data_type.name} in the catalog "
                f"but its values are {arr.dtype}"
            )
        try:
            columns[signal_id] = arr.astype(data_type.numpy_dtype, casting="same_kind")
        except TypeError:
            raise UserError(
                f"group {batch.group!r}: signal id {signal_id} is {data_type.name} in the catalog "
                f"but its values are {arr.dtype}"
            ) from None
        data_types[signal_id] = data_type
    return Segment(
        segment_id=new_segment_id() if segment_id is None else segment_id,
        group=batch.group,
        t_ns=t_ns.astype(np.int64),
        columns=columns,
        data_types=data_types,
    )


#: Rows (all groups together) of one segment made by :func:`bundle_segments`: bounds what one decode
#: holds in memory (a CAN capture's groups are ~5–10 columns, so ~20 MB decoded at most).
BUNDLE_MAX_ROWS = 262_144


def bundle_segments(segments: Iterable[Segment], *, max_rows: int = BUNDLE_MAX_ROWS) -> Iterator[Segment]:
    """Pack consecutive single-group segments into multi-group (format 4) segments of ≤ ``max_rows`` rows.

    Why: on a CAN bus the arrival times are most of the bytes, and frames of different messages that
    arrived in one USB batch carry the same timestamp; a multi-group segment stores those shared times
    once (see :func:`encode_segment`). The bundle takes the first segment's id. A segment with text (its
    distinct text is capped per segment), one that is already multi-group, or a signal id already in the
    bundle (the next chunk of the same group) starts a new bundle; a bundle of one is yielded unchanged,
    so it is written as format 2/3 exactly as before. ``max_rows`` ≤ 0 yields every segment unchanged.
    """
    current: list[Segment] = []
    rows = columns = cells = 0
    ids: set[int] = set()

    def flush() -> Iterator[Segment]:
        if len(current) == 1:
            yield current[0]
        elif current:
            head = current[0]
            more = tuple(
                Segment(head.segment_id, s.group, s.t_ns, s.columns, s.data_types) for s in current[1:]
            )
            yield Segment(head.segment_id, head.group, head.t_ns, head.columns, head.data_types, more)

    for seg in segments:
        seg_rows = int(np.asarray(seg.t_ns).shape[0])
        alone = (
            max_rows <= 0
            or bool(seg.more_groups)
            or any(DataType(t) is DataType.STRING for t in seg.data_types.values())
        )
        fits = (
            not alone
            and current
            and rows + seg_rows <= max_rows
            and columns + len(seg.columns) <= MAX_COLUMNS
            and cells + seg_rows * (len(seg.columns) + 2) <= MAX_CELLS
            and len(current) < MAX_GROUPS
            and not ids & seg.columns.keys()
        )
        if not fits:
            yield from flush()
            current, rows, columns, cells, ids = [], 0, 0, 0, set()
        current.append(seg)
        rows += seg_rows
        columns += len(seg.columns)
        cells += seg_rows * (len(seg.columns) + 2)  # + its time column + its share of the clock
        ids |= seg.columns.keys()
        if alone:
            yield from flush()
            current, rows, columns, cells, ids = [], 0, 0, 0, set()
    yield from flush()
