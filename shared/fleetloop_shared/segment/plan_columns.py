"""The encoder's plan for a group's columns: each column's codec, and the relations between columns.

Format 5 stores some columns relative to another column of the segment, each only where the block
comes out smaller: in the order of a *key* column (interleaved series: one row per satellite or radar
track), or as the *difference* from a twin column (a calibrated and a raw gyro, four wheel speeds).
Both are decided on a screen of the first rows, so every column is encoded once or twice, not once per
candidate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fleetloop_shared.catalog import DataType
from fleetloop_shared.errors import UserError
from fleetloop_shared.segment import plan_values, registry
from fleetloop_shared.segment.codecs import strings
from fleetloop_shared.segment.layout import Encoded
from fleetloop_shared.segment.model import Segment

Column = tuple[int, DataType, npt.NDArray[Any]]
_NUMERIC = (DataType.FLOAT64, DataType.INT64)


def encode_columns(
    segment: Segment,
    columns: list[Column],
    stamped_with: Sequence[Column] = (),
    *,
    derive: bool,
    grid: bool,
) -> tuple[list[Encoded], int]:
    """The value blocks of one group, and its distinct text (capped per segment by the caller).

    ``stamped_with``: the columns of an earlier group of the segment with the very same timestamps,
    which a column may be stored as the difference from. ``derive`` False: no keyed or difference
    column (format version 4 and older); ``grid`` False: no grid float (format version 5 and older).
    """
    blocks: list[Encoded] = []
    text = 0
    key = plan_key(np.asarray(segment.t_ns), columns) if derive else None
    for i, (signal_id, data_type, values) in enumerate(columns):
        try:
            if data_type is DataType.STRING:
                payload, column_text = registry.STR_DICT.encode(values)
                text += column_text
                blocks.append(registry.STR_DICT.block(payload))
            elif key is not None and i in key.keyed:
                inner = plan_values.encode_values(data_type, values[key.order], grid)
                codec = registry.KEYED_CODECS[data_type]
                blocks.append(codec.block(codec.encode(key.key_id, inner), inner=(inner.codec,)))
            else:
                block = None
                if derive and data_type is DataType.FLOAT64:
                    block = plan_values.recent_values(values, grid)
                if block is None:
                    block = plan_values.encode_values(data_type, values, grid)
                    if derive and data_type in _NUMERIC:
                        block = plan_values.with_dictionary(data_type, values, block)
                blocks.append(block)
        except strings.TextError as exc:
            raise UserError(f"segment {segment.segment_id.hex()}: signal {signal_id}: {exc}") from None
    if derive:
        difference_columns(columns, blocks, stamped_with, grid)
    return blocks, text


# Difference columns (format 5). Signals stamped together are sometimes the same quantity twice or
# nearly so: a phone's calibrated and uncalibrated gyro differ by a constant bias, four wheel speeds
# differ by a little while driving straight. Such a column costs far less as its difference from
# the other one. The decoder adds the two back in IEEE double arithmetic, which is exact for finite
# values wherever the encoder checked it (every row, before choosing it).
#: Columns cheaper than this are not searched for a reference (nothing much to gain).
_DIFF_MIN_BYTES = 1024
#: A reference is tried when, on the screened rows, the difference changes by less than this share of
#: the column's own changes.
DIFF_MAX_STEP_RATIO = 0.5
#: At most one row in this many may need patching (rows the addition does not give back exactly).
_DIFF_MAX_PATCH_SHARE = 16


def difference_columns(
    columns: list[Column], blocks: list[Encoded], stamped_with: Sequence[Column], grid: bool
) -> None:
    """Replace costly FLOAT64 blocks by their difference from another column where that is smaller."""
    rows = int(columns[0][2].shape[0]) if columns else 0
    costly = [
        i
        for i, (_, data_type, _) in enumerate(columns)
        if data_type is DataType.FLOAT64
        and registry.stage(blocks[i].codec) is registry.Stage.OWN
        and len(blocks[i].payload) >= max(_DIFF_MIN_BYTES, rows // 2)
    ]
    if not costly:
        return
    # References: the earlier group's columns (decoded before this group), and this group's columns
    # that are neither keyed nor differences themselves (decoded before any difference).
    refs = [(sid, v) for sid, data_type, v in stamped_with if data_type is DataType.FLOAT64]
    own = len(refs)
    refs += [
        (sid, v)
        for (sid, data_type, v), block in zip(columns, blocks, strict=True)
        if data_type is DataType.FLOAT64 and registry.stage(block.codec) is registry.Stage.OWN
    ]
    if len(refs) < 2:
        return
    screened = min(rows, _KEY_SCREEN_ROWS)
    heads = np.empty((len(refs), screened), dtype=np.float64)
    for j, (_, v) in enumerate(refs):
        heads[j] = v[:screened]
    ids = np.array([sid for sid, _ in refs], dtype=np.int64)
    mine = np.array([columns[i][0] for i in costly], dtype=np.int64)
    # every costly column against every reference at once: (costly, refs, rows) differences
    position = {sid: k for k, (sid, _) in enumerate(refs) if k >= own}  # costly columns are references too
    own_heads = heads[[position[int(sid)] for sid in mine]]
    with np.errstate(invalid="ignore", over="ignore"):
        differences = own_heads[:, None, :] - heads[None, :, :]
        steps = _step_sums(differences.reshape(-1, screened)).reshape(len(costly), len(refs))
        change = _step_sums(own_heads)
        close = steps < DIFF_MAX_STEP_RATIO * change[:, None]
        close &= ids[None, :] != mine[:, None]
    usable = np.ones(len(refs), dtype=np.bool_)
    referenced: set[int] = set()
    for c in np.flatnonzero(close.any(axis=1)):
        i = costly[int(c)]
        signal_id, _, values = columns[i]
        candidates = close[c] & usable
        if signal_id in referenced or not candidates.any():
            continue
        j = int(np.flatnonzero(candidates)[np.argmin(steps[c][candidates])])
        ref_id, ref = refs[j]
        with np.errstate(invalid="ignore", over="ignore"):
            difference = values - ref
            # Rows the addition does not give back bit for bit (-0.0 from x + -x) are patched; so are
            # rows with a NaN operand, whose payload after an addition depends on the machine.
            wrong = (
                ((ref + difference).view(np.int64) != values.view(np.int64))
                | np.isnan(ref)
                | np.isnan(difference)
            )
        patches = np.flatnonzero(wrong)
        if patches.shape[0] * _DIFF_MAX_PATCH_SHARE > rows:
            continue
        inner = plan_values.encode_values(DataType.FLOAT64, difference, grid)
        payload = registry.F64_DIFF.encode(ref_id, patches, values[patches], inner)
        if len(payload) < len(blocks[i].payload):
            blocks[i] = registry.F64_DIFF.block(payload, inner=(inner.codec,))
            referenced.add(ref_id)
            # a difference is never a reference (one level: the decoder needs no ordering among them)
            usable[[k for k in range(own, len(refs)) if refs[k][0] == signal_id]] = False


# Keyed columns (format 5). Some groups interleave several series: a GNSS receiver's measurement
# message has one row per satellite, a radar message one per track, and a *key* column (the satellite or
# track id) says which series a row belongs to. Differences between neighbouring rows then jump from
# one series to another and cost nearly as much as the values; in the order of a stable sort by the
# key, each series' rows follow each other in time and their differences are small. On the real
# comma2k19 sensors this makes the u-blox raw measurements ~26 % and the radar ~30 % smaller.
#: A group needs this many rows before a key is looked for.
KEY_MIN_ROWS = 256
#: ... and at least one row in this many must repeat the previous row's timestamp.
KEY_MIN_REPEATS = 4
#: A key takes at most this many distinct values (within the screened rows).
KEY_MAX_DISTINCT = 128
#: Rows the decision is made on (the sort then covers every row).
_KEY_SCREEN_ROWS = 512
#: Keys span fewer values than this (ids, not measurements; also bounds the screen's histograms).
_KEY_MAX_SPAN = 1 << 16
#: A column is keyed when, on the screened rows, the key order makes the sum of its absolute
#: differences smaller than this share of the sum in time order.
KEY_MAX_STEP_RATIO = 0.5


@dataclass(frozen=True)
class KeyPlan:
    key_id: int
    order: npt.NDArray[np.intp]  # stable sort of every row by the key
    keyed: frozenset[int]  # positions (in the group's columns) of the columns stored in key order


def _key_candidates(columns: list[Column], numeric: list[int]) -> list[int]:
    """Columns that look like a key: whole numbers with few distinct values that change on most rows,
    but not a rolling counter (a message counter also changes on every row and orders nothing)."""
    # Most columns change on few rows or are not whole numbers: one look at the first rows of all of
    # them at once settles it, and only the few that pass are screened further.
    first = np.empty((len(numeric), 64), dtype=np.float64)
    for j, i in enumerate(numeric):
        first[j] = columns[i][2][:64]
    steps = np.diff(first, axis=1)
    with np.errstate(invalid="ignore"):
        maybe = (
            (np.count_nonzero(steps != 0, axis=1) * 2 >= steps.shape[1])
            & (first == np.rint(first)).all(axis=1)
            & (np.abs(first) < 2**53).all(axis=1)
            & (first.max(axis=1) - first.min(axis=1) < _KEY_MAX_SPAN)
            # a counter steps the same way from row to row (+1, now and then a wrap)
            & (np.count_nonzero(steps[:, 1:] == steps[:, :-1], axis=1) * 5 <= (steps.shape[1] - 1) * 4)
        )
    found: list[int] = []
    for j in np.flatnonzero(maybe).tolist():
        i = numeric[j]
        data_type, head = columns[i][1], columns[i][2][:_KEY_SCREEN_ROWS]
        if int(np.count_nonzero(head[1:] != head[:-1])) * 2 < head.shape[0]:
            continue
        if data_type is DataType.FLOAT64:
            with np.errstate(invalid="ignore"):
                whole = (
                    np.isfinite(head).all() and (head == np.rint(head)).all() and (np.abs(head) < 2**53).all()
                )
            if not whole:
                continue
        keys = head.astype(np.int64)
        low = int(keys.min())
        if int(keys.max()) - low >= _KEY_MAX_SPAN:
            continue
        if not 2 <= np.count_nonzero(np.bincount(keys - low)) <= KEY_MAX_DISTINCT:
            continue
        steps = np.diff(keys)
        if int(np.bincount(steps - int(steps.min())).max()) * 5 > steps.shape[0] * 4:
            continue  # one step on ≥ 80 % of rows: a counter (wrapping once in a while)
        found.append(i)
    return found


def plan_key(t_ns: npt.NDArray[Any], columns: list[Column]) -> KeyPlan | None:
    """Which key (if any) to store which columns of a group in the order of, decided before encoding.

    Decided from the screened rows by how much closer neighbouring values get in key order, so every
    column is encoded once: encoding the costliest columns both ways and keeping the smaller found the
    same keys on the real corpus but cost ~20 % more encode time.
    """
    rows = int(columns[0][2].shape[0]) if columns else 0
    if rows < KEY_MIN_ROWS or len(columns) < 3:
        return None
    # A group of interleaved series logs several rows at one instant (a receiver's epoch, a radar
    # scan): its time column repeats. Other groups (one row per frame or sample) are not screened.
    if int(np.count_nonzero(t_ns[1:] == t_ns[:-1])) * KEY_MIN_REPEATS < rows:
        return None
    numeric = [i for i, (_, data_type, _) in enumerate(columns) if data_type in _NUMERIC]
    if len(numeric) < 2:
        return None
    candidates = _key_candidates(columns, numeric)
    if not candidates:
        return None
    screened = min(rows, _KEY_SCREEN_ROWS)
    heads = np.empty((len(numeric), screened), dtype=np.float64)
    for j, i in enumerate(numeric):
        heads[j] = columns[i][2][:screened]
    natural = _step_sums(heads)
    best: tuple[int, int, frozenset[int]] | None = None
    for k in candidates:
        order = np.argsort(heads[numeric.index(k)], kind="stable")
        closer = (_step_sums(heads[:, order]) < KEY_MAX_STEP_RATIO * natural) & (natural > 0)
        keyed = [i for j, i in enumerate(numeric) if closer[j] and i != k]
        # Columns that look like keys themselves (a counter and the checksum computed from it) get
        # "closer" in key order without getting cheaper; a key must help some other column.
        if any(i not in candidates for i in keyed) and (best is None or len(keyed) > len(best[2])):
            best = (len(keyed), k, frozenset(keyed))
    if best is None:
        return None
    _, k, keyed_columns = best
    return KeyPlan(columns[k][0], np.argsort(columns[k][2], kind="stable"), keyed_columns)


def _step_sums(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Per row of ``values``: the sum of absolute differences between neighbours, over the finite
    ones (NaN fills and infinities skipped)."""
    with np.errstate(invalid="ignore", over="ignore"):
        steps = np.abs(np.diff(values, axis=1))
        steps[~np.isfinite(steps)] = 0.0
        sums: npt.NDArray[np.float64] = steps.sum(axis=1)
    return sums
