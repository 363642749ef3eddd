"""Recent values: for each row, how many rows back the same value last occurred (segment codec 22).

Why: a sensor's raw readings are integers under a calibration, so an IMU at rest dithers between a
handful of values: a third of the xio gyro readings repeat one of the last 255, but rarely the one just
before. Such a row can name the earlier row instead of carrying its value. This module only finds the
references; the segment codec stores them and the remaining (literal) values.

The numba kernel (one pass with a small open-addressing table of "last row of this value") and the
numpy version (a stable sort: equal values keep row order, so the one before in sorted order is the
most recent) return the same references — there is exactly one most recent earlier occurrence.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from fleetloop_shared.codecs import bitpack

I64 = npt.NDArray[np.int64]

#: How far back a reference may point.
WINDOW = 255


def references(bits: I64) -> tuple[I64, int]:
    """Per row: rows back to the most recent earlier row with the very same bits, when that is 2 …
    :data:`WINDOW` back; else 0 (a literal: new, too far back, or the same as the row just before —
    a zero first difference among the literals costs less than a reference). And the number of
    distinct values (few distinct values are cheap for the plain codecs already)."""
    bits = np.ascontiguousarray(bits, dtype=np.int64)
    kernel = _load_kernel()
    if kernel is not None:
        n = int(bits.shape[0])
        size = 1 << max(4, (2 * n).bit_length())
        out = np.zeros(n, dtype=np.int64)
        distinct = kernel(bits, np.full(size, -1, dtype=np.int64), out)
        return out, int(distinct)
    return _references_numpy(bits)


def _references_numpy(bits: I64) -> tuple[I64, int]:
    n = int(bits.shape[0])
    order = np.argsort(bits, kind="stable")
    ranked = bits[order]
    same = ranked[1:] == ranked[:-1]
    distinct = n - int(np.count_nonzero(same))
    previous = np.full(n, -1, dtype=np.int64)
    previous[order[1:][same]] = order[:-1][same]
    back = np.arange(n, dtype=np.int64) - previous
    out: I64 = np.where((previous >= 0) & (back > 1) & (back <= WINDOW), back, 0)
    return out, distinct


def distinct_up_to(bits: I64, limit: int) -> int:
    """How many distinct values ``bits`` holds, or ``limit + 1`` if more (the kernel stops there: most
    columns have thousands, and a dictionary is only wanted for a few)."""
    bits = np.ascontiguousarray(bits, dtype=np.int64)
    kernel = _load_kernel()
    if kernel is not None:
        size = 1 << max(4, (4 * limit).bit_length())
        return int(_count_kernel(bits, np.full(size, -1, dtype=np.int64), limit))
    return min(int(np.unique(bits).shape[0]), limit + 1)


def dictionary(bits: I64) -> tuple[I64, I64]:
    """The distinct values in ascending order and each row's index among them (as ``np.unique`` with
    ``return_inverse``; the kernel numbers values in a hash table as they come, then sorts the few)."""
    bits = np.ascontiguousarray(bits, dtype=np.int64)
    kernel = _load_kernel()
    if kernel is None:
        table, index = np.unique(bits, return_inverse=True)
        return table, index.astype(np.int64).ravel()
    n = int(bits.shape[0])
    size = 1 << max(4, (2 * n).bit_length())
    ids = np.empty(n, dtype=np.int64)
    firsts = np.empty(n, dtype=np.int64)
    count = int(_number_kernel(bits, np.full(size, -1, dtype=np.int64), ids, firsts))
    values = bits[firsts[:count]]
    order = np.argsort(values, kind="stable")
    rank = np.empty(count, dtype=np.int64)
    rank[order] = np.arange(count, dtype=np.int64)
    return values[order], rank[ids]


_kernel: Any = None
_count_kernel: Any = None
_number_kernel: Any = None
_tried = False


def _load_kernel() -> Any:
    global _kernel, _tried
    if _tried:
        return _kernel
    _tried = True
    if not bitpack.have_numba():
        return None
    import numba

    @numba.njit(cache=True, nogil=True)
    def refs(bits: Any, table: Any, out: Any) -> int:  # pragma: no cover - compiled
        mask = table.shape[0] - 1
        distinct = 0
        for i in range(bits.shape[0]):
            b = bits[i]
            h = (np.uint64(b) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)
            slot = np.int64(h) & mask
            while True:
                j = table[slot]
                if j < 0:
                    table[slot] = i
                    distinct += 1
                    break
                if bits[j] == b:
                    back = i - j
                    if 1 < back <= 255:
                        out[i] = back
                    table[slot] = i
                    break
                slot = (slot + 1) & mask
        return distinct

    @numba.njit(cache=True, nogil=True)
    def count(bits: Any, table: Any, limit: int) -> int:  # pragma: no cover - compiled
        mask = table.shape[0] - 1
        distinct = 0
        for i in range(bits.shape[0]):
            b = bits[i]
            h = (np.uint64(b) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)
            slot = np.int64(h) & mask
            while True:
                j = table[slot]
                if j < 0:
                    table[slot] = i
                    distinct += 1
                    if distinct > limit:
                        return distinct
                    break
                if bits[j] == b:
                    break
                slot = (slot + 1) & mask
        return distinct

    @numba.njit(cache=True, nogil=True)
    def number(bits: Any, table: Any, ids: Any, firsts: Any) -> int:  # pragma: no cover - compiled
        mask = table.shape[0] - 1
        count = 0
        for i in range(bits.shape[0]):
            b = bits[i]
            h = (np.uint64(b) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)
            slot = np.int64(h) & mask
            while True:
                j = table[slot]
                if j < 0:
                    table[slot] = i
                    ids[i] = count
                    firsts[count] = i
                    count += 1
                    break
                if bits[j] == b:
                    ids[i] = ids[j]
                    break
                slot = (slot + 1) & mask
        return count

    global _count_kernel, _number_kernel
    try:
        probe = np.array([1, 2, 1, 1, 3, 2], dtype=np.int64)
        if (
            count(probe, np.full(16, -1, dtype=np.int64), 2) != 3
            or count(probe, np.full(16, -1, dtype=np.int64), 5) != 3
        ):
            return None
        got = np.zeros(6, dtype=np.int64)
        distinct = refs(probe, np.full(16, -1, dtype=np.int64), got)
        if (got.tolist(), distinct) != (lambda r: (r[0].tolist(), r[1]))(_references_numpy(probe)):
            return None
    except Exception:  # any failure of the optional accelerator falls back to the numpy path
        return None
    _kernel = refs
    _count_kernel = count
    _number_kernel = number
    return refs
