"""Repeated values: where each row's value occurred before, and how many distinct values a column has.

Why: a sensor's raw readings are integers under a calibration, so an IMU at rest dithers between a
handful of values — a third of the xio gyro readings repeat one of the last 255, but rarely the one just
before — and a gauge may only ever show a few levels. The segment codec stores such rows as references
to an earlier row (codec 22) or as indices into the distinct values (codecs 23/35); this module finds
them.

One numba kernel numbers the distinct values in a small open-addressing hash table as they come and
records, per row, how far back the same value last was; it can stop once a column has more distinct
values than wanted. The numpy versions (a stable sort: equal values keep row order) return the same
results — the most recent earlier occurrence and the distinct values are unique.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from fleetloop_shared.segment.codecs.compiled import numba_kernels

I64 = npt.NDArray[np.int64]

#: How far back a reference may point.
WINDOW = 255


def _scan(bits: I64, limit: int) -> tuple[int, I64, I64, I64] | None:
    """The kernel's (distinct count, id per row, rows back to the last occurrence per row, first row
    of each id), or None without numba. Stops when the count passes ``limit`` (then only the count is
    meaningful)."""
    kernel = _load_kernel()
    if kernel is None:
        return None
    n = int(bits.shape[0])
    ids = np.empty(n, dtype=np.int64)
    back = np.empty(n, dtype=np.int64)
    first = np.empty(n, dtype=np.int64)
    last = np.empty(n, dtype=np.int64)
    table = np.full(1 << max(4, (2 * min(n, limit + 1)).bit_length()), -1, dtype=np.int64)
    count = int(kernel(bits, table, ids, back, first, last, limit))
    return count, ids, back, first


def references(bits: I64) -> tuple[I64, int]:
    """Per row: rows back to the most recent earlier row with the very same bits, when that is 2 …
    :data:`WINDOW` back; else 0 (a literal: new, too far back, or the same as the row just before —
    a zero first difference among the literals costs less than a reference). And the number of
    distinct values (few distinct values are cheap for the plain codecs already)."""
    bits = np.ascontiguousarray(bits, dtype=np.int64)
    scanned = _scan(bits, int(bits.shape[0]))
    if scanned is None:
        return _references_numpy(bits)
    count, _, back, _ = scanned
    out: I64 = np.where((back > 1) & (back <= WINDOW), back, 0)
    return out, count


def dictionary(bits: I64, limit: int) -> tuple[I64, I64] | None:
    """The distinct values in ascending order and each row's index among them (as ``np.unique`` with
    ``return_inverse``), or None when there are more than ``limit``: the kernel numbers values as they
    come and stops there (most columns have thousands, a dictionary is only wanted for a few), then
    only the few are sorted."""
    bits = np.ascontiguousarray(bits, dtype=np.int64)
    scanned = _scan(bits, limit)
    if scanned is None:
        table, index = np.unique(bits, return_inverse=True)
        return None if table.shape[0] > limit else (table, index.astype(np.int64).ravel())
    count, ids, _, first = scanned
    if count > limit:
        return None
    values = bits[first[:count]]
    order = np.argsort(values, kind="stable")
    rank = np.empty(count, dtype=np.int64)
    rank[order] = np.arange(count, dtype=np.int64)
    return values[order], rank[ids]


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


@numba_kernels
def _load_kernel() -> Any:
    """The window scan compiled with numba, or None: then the numpy version runs."""
    import numba

    @numba.njit(cache=True, nogil=True)
    def scan(
        bits: Any, table: Any, ids: Any, back: Any, first: Any, last: Any, limit: int
    ) -> int:  # pragma: no cover - compiled
        mask = table.shape[0] - 1
        count = 0
        for i in range(bits.shape[0]):
            b = bits[i]
            slot = np.int64((np.uint64(b) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)) & mask
            while True:
                j = table[slot]
                if j < 0:  # a new value: the next id
                    table[slot] = i
                    ids[i] = count
                    first[count] = i
                    last[count] = i
                    back[i] = 0
                    count += 1
                    if count > limit:
                        return count
                    break
                if bits[j] == b:
                    k = ids[j]
                    ids[i] = k
                    back[i] = i - last[k]
                    last[k] = i
                    break
                slot = (slot + 1) & mask
        return count

    probe = np.array([1, 2, 1, 1, 3, 2], dtype=np.int64)  # compile now, and check
    n = probe.shape[0]
    ids, back, first, last = (np.empty(n, dtype=np.int64) for _ in range(4))
    return scan if scan(probe, np.full(16, -1, dtype=np.int64), ids, back, first, last, n) == 3 else None
