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


_kernel: Any = None
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

    try:
        probe = np.array([1, 2, 1, 1, 3, 2], dtype=np.int64)
        got = np.zeros(6, dtype=np.int64)
        distinct = refs(probe, np.full(16, -1, dtype=np.int64), got)
        if (got.tolist(), distinct) != (lambda r: (r[0].tolist(), r[1]))(_references_numpy(probe)):
            return None
    except Exception:  # any failure of the optional accelerator falls back to the numpy path
        return None
    _kernel = refs
    return refs
