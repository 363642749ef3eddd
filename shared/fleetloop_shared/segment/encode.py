"""Encoding: a segment to its bytes, in the lowest format version that expresses it.

The encoder checks the segment (it never writes bytes its own decoder would refuse), lets the plan
choose each block (:mod:`.plan_columns`, :mod:`.plan_values`, :mod:`.plan_times`), asks the registry
which format version those blocks need, and frames them (:mod:`.framing`). A single group without a
derived column is written as format 2 (3 with text), byte for byte as before format 4; several groups,
or a derived column, take format 4's layout (stamped 4 or 5); format 6 compresses the whole body where
that is smaller.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from fleetloop_shared.catalog import DataType
from fleetloop_shared.errors import UserError
from fleetloop_shared.segment import framing, plan_columns, plan_times, registry
from fleetloop_shared.segment.codecs import zstd_frames
from fleetloop_shared.segment.layout import (
    BODY_MAX_RATIO,
    BODY_MAX_SLACK,
    FLAG_BODY_ZSTD,
    FORMAT_VERSION,
    MAX_CELLS,
    MAX_COLUMNS,
    MAX_GROUP_BYTES,
    MAX_GROUPS,
    MAX_ROWS,
    MAX_SIGNAL_ID,
    MAX_TEXT_BYTES,
    READ_VERSIONS,
    ZSTD_FLAG,
    Encoded,
)
from fleetloop_shared.segment.model import TEXT_KINDS, Segment
from fleetloop_shared.segment.plan_columns import Column

#: Format 6: the body (everything between the fixed header and the checksum) is one zstd frame, at this
#: level; top-level blocks stored smaller than :data:`BODY_RAW_BELOW` lose their own zstd frame in it.
#: (Leaving the larger, already compressed blocks outside the frame was tried: no faster, 0.1 % larger —
#: the frame still finds a little in them.)
BODY_LEVEL = 3
BODY_RAW_BELOW = 4096
#: ... and bodies under this many bytes (a small bundle) at this level: cheap there, ~1 % smaller.
BODY_SMALL = 64 * 1024
BODY_SMALL_LEVEL = 9

_Group = tuple[npt.NDArray[np.int64], list[Column]]


def encode_segment(segment: Segment, *, max_version: int = FORMAT_VERSION) -> bytes:
    """The segment's bytes (the lowest format version that expresses it); raises UserError on an invalid one.

    A single-group segment is written as format 2 (or 3 with text), byte for byte as before format 4;
    only a segment with ``more_groups`` is written as format 4, 5 only where a keyed, difference,
    recent-values or dictionary column pays, and 6 only where a compressed body, a grid float or a
    time offset pays. ``max_version`` caps that for a cloud that reads only older versions (the
    versioning rule's rollout order): below 6 none of format 6's, below 5 no derived column; a segment
    that needs more than the cap (several groups below 4, text below 3) is refused with a UserError.
    """
    if max_version not in READ_VERSIONS:
        raise UserError(
            f"segment format version {max_version} cannot be written "
            f"(this build writes {', '.join(map(str, sorted(READ_VERSIONS)))})"
        )
    derive = max_version >= 5
    grid = max_version >= 6
    if segment.more_groups:
        if max_version < 4:
            raise UserError(
                f"a segment of {len(segment.more_groups) + 1} groups needs format version 4, "
                f"the limit is {max_version} (write one group per segment)"
            )
        return _several(segment, derive=derive, grid=grid)
    t_ns, columns = validated(segment)
    values, text = plan_columns.encode_columns(segment, columns, derive=derive, grid=grid)
    if any(registry.needs(block) >= 5 for block in values):
        # derived columns exist from format 5 on, which has the multi-group layout (here of one group)
        return _several(segment, {0: (values, text)}, derive=derive, grid=grid)
    if text > MAX_TEXT_BYTES:
        raise UserError(
            f"segment {segment.segment_id.hex()}: {text} bytes of distinct text exceed {MAX_TEXT_BYTES}"
        )
    time = plan_times.timestamps(t_ns)
    # The lowest version that expresses these blocks: readers of version 2 keep reading segments
    # without text (the versioning rule's rollout order then only matters for text).
    version = max([2, *map(registry.needs, values)])
    if version > max_version:
        raise UserError(f"text columns need segment format version {version}, the limit is {max_version}")
    rows = int(t_ns.shape[0])
    head = framing.fixed_header(
        version, 0, segment.segment_id, rows, int(t_ns.min()) if rows else 0, int(t_ns.max()) if rows else 0
    )
    descriptors = [(signal_id, data_type) for signal_id, data_type, _ in columns]
    plain = framing.sealed(
        b"".join([head, *framing.group(segment.group, None, descriptors, [time, *values])])
    )
    if grid and any(len(block.payload) < BODY_RAW_BELOW for block in [time, *values]):
        # small blocks (stored as they are for the body's frame): one frame may well be smaller
        packed = _several(segment, {0: (values, text)}, derive=derive, grid=grid)
        if len(packed) < len(plain):
            return packed
    return plain


def _several(
    segment: Segment,
    encoded: dict[int, tuple[list[Encoded], int]] | None = None,
    *,
    derive: bool,
    grid: bool,
) -> bytes:
    """Format 4 on: several groups, one optional shared clock (see docs/segment-format.md, version 4).

    ``encoded``: value blocks (and their text) already made for some groups, by position. Stamped 4,
    or the newest version a block needs; with ``grid`` (format 6) the body is compressed where that is
    smaller.
    """
    where = f"segment {segment.segment_id.hex() if isinstance(segment.segment_id, bytes) else '?'}"
    parts = segment.groups()
    groups = _validated_groups(parts, where)
    times = [t_ns for t_ns, _ in groups]
    same_as = plan_times.same_times(times)
    empty = np.zeros(0, dtype=np.int64)
    clock, clock_index = plan_times.choose_clock([empty if i in same_as else t for i, t in enumerate(times)])
    cells = sum(int(t.shape[0]) * (len(c) + 1) for t, c in groups)
    if cells + int(clock.shape[0]) > MAX_CELLS:
        rows, ncols = sum(int(t.shape[0]) for t in times), sum(len(c) for _, c in groups)
        raise UserError(f"{where}: {rows} rows in {ncols} columns exceed {MAX_CELLS} cells")
    clock_block = plan_times.timestamps(clock)

    text = 0
    version = 4
    #: per group: its name, rows, column descriptors, time block and value blocks
    planned: list[tuple[str, int, list[tuple[int, DataType]], Encoded, list[Encoded]]] = []
    for i, (part, (t_ns, columns)) in enumerate(zip(parts, groups, strict=True)):
        time = plan_times.time_block(i, times, same_as, clock_index, offsets=grid)
        known = encoded.get(i) if encoded else None
        if known is None:
            # the columns of the earlier groups stamped with the very same times
            root = same_as.get(i, i)
            stamped_with = [c for j in range(root, i) if same_as.get(j, j) == root for c in groups[j][1]]
            known = plan_columns.encode_columns(part, columns, stamped_with, derive=derive, grid=grid)
        values, column_text = known
        version = max([version, *map(registry.needs, [time, *values])])
        text += column_text
        descriptors = [(signal_id, data_type) for signal_id, data_type, _ in columns]
        planned.append((part.group, int(t_ns.shape[0]), descriptors, time, values))
    if text > MAX_TEXT_BYTES:
        raise UserError(f"{where}: {text} bytes of distinct text exceed {MAX_TEXT_BYTES}")

    def body(compressed: bool) -> bytes:
        """The body as formats 4/5 frame it, or as a format 6 compressed body holds it before its zstd
        frame: blocks stored in fewer than :data:`BODY_RAW_BELOW` bytes without their own frame."""

        def kept(blocks: list[Encoded]) -> list[Encoded]:
            return [_small_block_raw(b) for b in blocks] if compressed else blocks

        framed = [
            framing.group(name, rows, descriptors, kept([time, *values]))
            for name, rows, descriptors, time, values in planned
        ]
        return framing.several(framed, int(clock.shape[0]), kept([clock_block])[0])

    time_range = segment.time_range()
    first_ns, last_ns = time_range if time_range is not None else (0, 0)
    rows = sum(int(t.shape[0]) for t in times)
    plain_body = body(False)
    if grid:
        inner = body(True)
        level = BODY_SMALL_LEVEL if len(inner) < BODY_SMALL else BODY_LEVEL
        packed = zstd_frames.compress(inner, level=level)
        if len(inner) <= BODY_MAX_RATIO * len(packed) + BODY_MAX_SLACK and len(packed) < len(plain_body):
            head = framing.fixed_header(6, FLAG_BODY_ZSTD, segment.segment_id, rows, first_ns, last_ns)
            return framing.sealed(head + packed)
    head = framing.fixed_header(version, 0, segment.segment_id, rows, first_ns, last_ns)
    return framing.sealed(head + plain_body)


def _small_block_raw(block: Encoded) -> Encoded:
    """A block as a format 6 body holds it: a small one without its own zstd frame (the body's frame
    codes it, with tables shared by every small block instead of a frame and tables each)."""
    if block.codec & ZSTD_FLAG and len(block.payload) < BODY_RAW_BELOW:
        return Encoded(
            block.codec & ~ZSTD_FLAG, zstd_frames.decompress(block.payload), block.raw_len, block.inner
        )
    return block


def _validated_groups(parts: list[Segment], where: str) -> list[_Group]:
    """Each group checked as :func:`validated` does, and the segment's groups together: one segment id,
    no nesting, a signal id in one group only, the limits of the whole."""
    if len(parts) > MAX_GROUPS:
        raise UserError(f"{where}: {len(parts)} groups exceed the limit of {MAX_GROUPS}")
    out: list[_Group] = []
    seen: set[int] = set()
    for part in parts:
        if part.segment_id != parts[0].segment_id:
            raise UserError(f"{where}: group {part.group!r} has another segment_id")
        if part.more_groups:
            raise UserError(f"{where}: group {part.group!r} has more_groups of its own")
        t_ns, columns = validated(part)
        for signal_id, _, _ in columns:
            if signal_id in seen:
                raise UserError(f"{where}: signal id {signal_id} appears in two groups")
            seen.add(signal_id)
        out.append((t_ns, columns))
    rows = sum(int(t.shape[0]) for t, _ in out)
    ncols = sum(len(c) for _, c in out)
    if rows > MAX_ROWS:
        raise UserError(f"{where}: {rows} rows exceed the limit of {MAX_ROWS}")
    if ncols > MAX_COLUMNS:
        raise UserError(f"{where}: {ncols} columns exceed the limit of {MAX_COLUMNS}")
    return out


def validated(segment: Segment) -> _Group:
    """Checks an encoder must make so that it never writes bytes its own decoder would refuse."""
    where = f"segment {segment.segment_id.hex() if isinstance(segment.segment_id, bytes) else '?'}"
    if not isinstance(segment.segment_id, bytes) or len(segment.segment_id) != 16:
        raise UserError(f"{where}: segment_id must be 16 bytes")
    if len(segment.group.encode("utf-8")) > MAX_GROUP_BYTES:
        raise UserError(f"{where}: group name longer than {MAX_GROUP_BYTES} bytes")
    t_ns = np.asarray(segment.t_ns)
    if t_ns.ndim != 1 or t_ns.dtype.kind not in "iu":
        raise UserError(f"{where}: t_ns must be a 1-D integer array, got {t_ns.dtype} {t_ns.shape}")
    if t_ns.dtype.kind == "u" and t_ns.size and int(t_ns.max()) > np.iinfo(np.int64).max:
        raise UserError(f"{where}: t_ns exceeds the int64 range")
    t_ns = t_ns.astype(np.int64, copy=False)  # encoding never writes into the caller's arrays
    rows = int(t_ns.shape[0])
    if rows > MAX_ROWS:
        raise UserError(f"{where}: {rows} rows exceed the limit of {MAX_ROWS}")
    if set(segment.columns) != set(segment.data_types):
        raise UserError(f"{where}: columns and data_types name different signal ids")
    if len(segment.columns) > MAX_COLUMNS:
        raise UserError(f"{where}: {len(segment.columns)} columns exceed the limit of {MAX_COLUMNS}")
    if rows * (len(segment.columns) + 1) > MAX_CELLS:
        raise UserError(f"{where}: {rows} rows × {len(segment.columns)} columns exceed {MAX_CELLS} cells")
    out: list[Column] = []
    for signal_id in sorted(segment.columns):
        if not 0 <= signal_id <= MAX_SIGNAL_ID:
            raise UserError(f"{where}: signal id {signal_id} outside 0..{MAX_SIGNAL_ID}")
        data_type = DataType(segment.data_types[signal_id])
        values: npt.NDArray[Any] = np.asarray(segment.columns[signal_id])
        if values.shape != (rows,):
            raise UserError(f"{where}: signal {signal_id} has shape {values.shape}, expected ({rows},)")
        if (data_type is DataType.STRING) != (values.dtype.kind in TEXT_KINDS):
            raise UserError(f"{where}: signal {signal_id} is {data_type.name} but holds {values.dtype}")
        try:
            values = values.astype(data_type.numpy_dtype, casting="same_kind", copy=False)
        except TypeError:
            raise UserError(
                f"{where}: signal {signal_id} is {data_type.name} but holds {values.dtype}"
            ) from None
        out.append((signal_id, data_type, values))
    return t_ns, out
