"""The encoder's plan for one column: which codec its values get.

Every choice is "smallest wins" and none changes what a reader must do; what is *tried* is what keeps
encoding fast. Floats are mostly decimals or scaled integers in disguise (codec 18), sometimes counts on a
grid of another step (24, format 6), and only rarely true doubles (19, or 16 for noise). Format 5 adds
two ways to store a column relative to itself: rows that repeat a recent value name it (22), and few
distinct values become one index a row (23/35).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from fleetloop_shared.catalog import DataType
from fleetloop_shared.segment import registry
from fleetloop_shared.segment.codecs import decimal_float, grid_float, recent
from fleetloop_shared.segment.layout import DICT_MAX_VALUES, Encoded

#: A float column whose best scaling is estimated (on its sample) above this many bytes a value is taken
#: for true doubles: only the bit-level codecs 19 and 16 are made.
_TRUE_DOUBLE_BYTES = 6.0
#: Plain doubles (codec 16) are tried only for a column still costing more than this many bytes a value
#: (on the real corpus they won once, on a column of near-noise).
_RAW_WORTH_TRYING = 6
#: A grid of another step is looked for only where the scaled estimate is at least this many bytes a
#: value (cheaper columns have little to gain, and the look costs a sort of the sample).
GRID_MIN_ESTIMATE = 0.75


def _smallest(blocks: list[Encoded]) -> Encoded:
    return min(blocks, key=lambda block: len(block.payload))


def encode_values(data_type: DataType, values: npt.NDArray[Any], grid: bool) -> Encoded:
    """The column's block through a codec that wraps nothing (``grid`` False: no grid float, for
    format 5 and older)."""
    if data_type is DataType.FLOAT64:
        return _floats(np.ascontiguousarray(values, dtype="<f8"), grid)
    if data_type is DataType.INT64:
        return registry.I64_INTSTREAM.block(*registry.I64_INTSTREAM.encode(values))
    if data_type is DataType.STRING:
        return registry.STR_DICT.block(registry.STR_DICT.encode(values)[0])  # (the caller measures text)
    return registry.BOOL_PACKBITS.block(registry.BOOL_PACKBITS.encode(values))


def _floats(floats: npt.NDArray[np.float64], grid: bool) -> Encoded:
    rows = int(floats.shape[0])
    mode, exponent, estimate = decimal_float.choose_estimated(floats)
    best: Encoded | None = None
    exact = False
    # Not decimals (the scaling was not exact on the sample): perhaps a grid of another step — a unit
    # conversion, a calibration. Cheaper on the sample: the scaled encoding is not even made (making both
    # where the sample's gain was under 20 % and keeping the smaller came out the same on the real
    # corpus, ~3 % slower).
    found = grid_float.find_step(floats, estimate) if grid and estimate >= GRID_MIN_ESTIMATE else None
    if found is not None:
        on_grid = registry.F64_GRID
        packed, planes = on_grid.encode(floats, found[0])
        stepped = [on_grid.as_is(planes)] if planes is not None else []
        if packed is not None:
            stepped.append(on_grid.block(packed))
        best = _smallest(stepped)
    if estimate <= _TRUE_DOUBLE_BYTES and found is None:
        scaling = registry.F64_SCALED
        packed, planes, exact = scaling.encode(floats, (mode, exponent))
        scaled = [scaling.as_is(planes)] if planes is not None else []
        if packed is not None:
            scaled.append(scaling.block(packed))
        best = _smallest(scaled if best is None else [best, *scaled])
    # else: true doubles (no scaling came near: the sample's best cost > 6 bytes a value, as for GNSS
    # pseudoranges or a pose) — the scaled encoding is not even made.
    if best is None or (not exact and len(best.payload) > 2 * rows):
        # Not a decimal or scaled integer in disguise (true doubles): first differences of the bits win
        # for slowly changing values, plain bytes for noise — but plain bytes (8 a value before zstd)
        # only when nothing so far came near them. XOR of neighbours (codec 17, still read) is not
        # tried: on every real data set one of these two was smaller.
        # (the stream's zstd frame was made while choosing its layout: not compressed twice)
        candidate = registry.F64_BITS_INTSTREAM.block(*registry.F64_BITS_INTSTREAM.encode(floats))
        if best is None or len(candidate.payload) < len(best.payload):
            best = candidate
        if len(best.payload) > _RAW_WORTH_TRYING * rows:
            candidate = registry.F64_RAW.block(registry.F64_RAW.encode(floats))
            if len(candidate.payload) < len(best.payload):
                best = candidate
    return best


# Recent values (format 5). A sensor's raw readings are integers under a calibration: an IMU at rest
# dithers between a handful of values, so a third of the xio gyro readings repeat one of the last 255
# (but rarely the one just before). Such a row names how many rows back the same value was instead of
# carrying it: the references are small integers, and the remaining (literal) values get their own codec.
#: Columns of fewer rows are not tried, nor columns whose literals cost less than this a value.
_RECENT_MIN_ROWS = 2048
_RECENT_MIN_BYTES_PER_ROW = 2
#: ... nor columns with fewer distinct values than one in this many rows ...
_RECENT_MIN_DISTINCT_SHARE = 16
#: ... nor columns where fewer than this share of the rows repeat a recent value.
_RECENT_MIN_HITS = 0.15
#: Below this share of the estimated plain size the block is taken without encoding the column plainly.
_RECENT_SURE = 0.9


def recent_values(values: npt.NDArray[np.float64], grid: bool) -> Encoded | None:
    """The recent-values block of a column, or None when the column is stored as it is.

    Decided without encoding the column plainly first (that doubled the cost of every column tried):
    the literals are encoded anyway, and their bytes per value estimate what every row would cost
    plainly; only when the estimate is close is the plain block made to compare.
    """
    rows = int(values.shape[0])
    if rows < _RECENT_MIN_ROWS:
        return None
    bits = values.view(np.int64)
    middle = np.sort(bits[rows // 2 : rows // 2 + 256])
    if int(np.count_nonzero(middle[1:] != middle[:-1])) * _RECENT_MIN_DISTINCT_SHARE < 2 * middle.shape[0]:
        return None  # (a quick look: few distinct values in 256 rows, see below)
    refs, distinct = recent.references(bits)
    if distinct * _RECENT_MIN_DISTINCT_SHARE < rows:
        return None  # few distinct values: cheap for the plain codecs already
    literal = refs == 0
    count = int(np.count_nonzero(literal))
    if count > (1 - _RECENT_MIN_HITS) * rows:
        return None
    literals = encode_values(DataType.FLOAT64, values[literal], grid)
    if len(literals.payload) < _RECENT_MIN_BYTES_PER_ROW * count:
        return None  # cheap values: a reference would cost about as much as the value
    references = registry.I64_INTSTREAM.block(*registry.I64_INTSTREAM.encode(refs, (0,)))
    payload = registry.F64_RECENT.encode(references, literals)
    estimate = len(literals.payload) * rows / max(count, 1)
    if len(payload) > _RECENT_SURE * estimate:
        plain = encode_values(DataType.FLOAT64, values, grid)
        if len(plain.payload) <= len(payload):
            return plain
    return registry.F64_RECENT.block(payload, inner=(references.codec, literals.codec))


# Dictionaries (format 5). A column with few distinct values that do not lie on a grid — a pressure
# gauge printing 6 significant digits of 9 ADC levels, a phone gyro's ~100 calibrated raw counts — costs
# as many bits as the spread of its values under the integer transforms; as one index per row into its
# distinct values it costs what the index sequence carries.
#: Columns of fewer rows, or cheaper than this many bytes a row, are not tried.
_DICT_MIN_ROWS = 256
_DICT_MIN_BYTES_PER_ROW = 0.5


def with_dictionary(data_type: DataType, values: npt.NDArray[Any], plain: Encoded) -> Encoded:
    """``plain``, or the dictionary block of the column when that is smaller."""
    rows = int(values.shape[0])
    if rows < _DICT_MIN_ROWS or len(plain.payload) < _DICT_MIN_BYTES_PER_ROW * rows:
        return plain
    bits = np.ascontiguousarray(values).view(np.int64)
    found = recent.dictionary(bits, DICT_MAX_VALUES)  # (one compiled pass; stops past the limit)
    if found is None:
        return plain
    distinct, index = found
    # an index costs about log2(count) bits before zstd: not worth it where the plain block is cheaper
    if 8 * len(plain.payload) < rows * (math.log2(distinct.shape[0]) + 1):
        return plain
    ints = registry.I64_INTSTREAM
    entries = ints.block(*ints.encode(distinct))
    indices = ints.block(*ints.encode(index))
    codec = registry.DICT_CODECS[data_type]
    payload = codec.encode(distinct.shape[0], entries, indices)
    if len(payload) < len(plain.payload):
        return codec.block(payload, inner=(entries.codec, indices.codec))
    return plain
