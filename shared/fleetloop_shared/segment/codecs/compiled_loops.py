"""The compiled inner loops that several codecs share: integer-stream sizing and the float split.

Importing this module imports numba, so only the codecs' kernel loaders (``compiled.numba_kernels``)
import it; without numba the codecs run their numpy paths, which write the same bytes.

Why module level: numba's disk cache keeps a kernel that calls another kernel only when both are
module-level functions (a kernel built inside a loader that calls another is compiled again in every
process). So the difference of order k is written once (:func:`residual`) for every integer-stream
loop, and the float chooser sizes its candidate integer streams with the very loop that
:mod:`.intstream` chooses its own layout with, and splits each candidate with the loop the encoder
splits with, instead of keeping copies of both.
"""

from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np

# numba's count-leading-zeros intrinsic: the bit length in one instruction (ImportError in a numba
# without it: the loaders' numpy path)
from numba.cpython.unsafe.numbers import leading_zeros

#: Floats at or beyond this magnitude have no exact int64 scaling (2**53): they keep the previous value.
_EXACT_LIMIT = 9007199254740992.0


@numba.njit(cache=True, nogil=True)
def residual(x: Any, order: int, i: int) -> Any:  # pragma: no cover - compiled
    """The ``i``-th difference of ``order`` (0, 1 or 2) of ``x``, without materializing the differences."""
    if order == 0:
        return x[i]
    if order == 1:
        return x[i + 1] - x[i]
    return (x[i + 2] - x[i + 1]) - (x[i + 1] - x[i])


@numba.njit(cache=True, nogil=True)
def stream_stats(
    x: Any, order: int, counts: Any, exception_bytes: int
) -> tuple[Any, Any, Any, Any]:  # pragma: no cover - compiled
    """(base, gcd, payload bytes, width) of ``x``'s residuals at ``order``: one pass per statistic.

    ``counts`` (65 int64) is scratch space: the bit-length histogram, zeroed here. The width minimizes
    packed bytes plus exceptions, with the same arithmetic as ``intstream._width``.
    """
    n = x.shape[0] - order
    base = np.int64(0)
    for i in range(n):
        y = residual(x, order, i)
        if i == 0 or y < base:
            base = y
    g = np.uint64(0)
    for i in range(n):
        a = np.uint64(residual(x, order, i) - base)
        b = g
        while b != 0:
            a, b = b, a % b
        g = a
        if g == 1:
            break
    if g == 0:
        g = np.uint64(1)
    counts[:] = 0
    for i in range(n):
        u = np.uint64(residual(x, order, i) - base)
        if g != 1:  # (a 64-bit division per value costs more than the rest of the loop)
            u //= g
        counts[64 - leading_zeros(u)] += 1  # type: ignore[call-arg]  # (bit length: one instruction)
    above = n
    best_size = -1
    best_w = 0
    for w in range(65):
        above -= counts[w]
        size = (n * w + 7) // 8 + above * exception_bytes
        if best_size < 0 or size < best_size:
            best_size = size
            best_w = w
    return base, g, best_size, best_w


@numba.njit(cache=True, nogil=True)
def residuals(x: Any, order: int, base: Any, g: Any, w: int, u: Any) -> int:  # pragma: no cover - compiled
    """Fill ``u`` with ``x``'s residuals at ``order`` less ``base``, divided by ``g``; returns how many
    are wider than ``w`` bits (the exceptions)."""
    b = np.int64(base)
    gg = np.uint64(g)
    limit = np.uint64(0xFFFFFFFFFFFFFFFF) if w >= 64 else np.uint64((1 << w) - 1)
    wide = 0
    for i in range(u.shape[0]):
        y = residual(x, order, i)
        v = np.uint64(y - b)
        if gg > 1:
            v = v // gg
        u[i] = v
        if v > limit:
            wide += 1
    return wide


@numba.njit(cache=True, nogil=True)
def outlier_frame(
    x: Any, order: int, base: Any, w: int, counts: Any
) -> tuple[Any, Any]:  # pragma: no cover - compiled
    """intstream's ``_above_low_outliers`` numpy path in exact 64-bit arithmetic (uint64 where a Python
    int could exceed int64): the same sample, the same frame, the same histogram into ``counts``."""
    m = x.shape[0] - order
    step = m // 64
    sample = np.empty(64, dtype=np.int64)
    for k in range(64):
        i = k * step
        sample[k] = residual(x, order, i)
    sample.sort()
    span = np.uint64(sample[61]) - np.uint64(sample[2])
    room = np.uint64(sample[2]) - np.uint64(base)
    quarter = span // np.uint64(4)
    low = base if quarter >= room else sample[2] - np.int64(quarter)
    if np.uint64(low) - np.uint64(base) < (np.uint64(1) << np.uint64(w - 1)):
        return low, -1
    below = 0
    for i in range(m):
        y = residual(x, order, i)
        if y < low:
            below += 1
            continue
        u = np.uint64(y - low)
        counts[64 - leading_zeros(u)] += 1  # type: ignore[call-arg]  # (bit length: one instruction)
    return low, below


@numba.njit(cache=True, nogil=True)
def split(
    v: Any, mode: int, exponent: int, p10: float, p2neg: float, n: Any, r: Any
) -> None:  # pragma: no cover - compiled
    """Scale floats ``v`` to integers ``n`` and keep the bit residuals ``r`` against their approximation.

    ``mode`` 0: ``v * p10`` (decimal); 1: ``ldexp(v, exponent)`` (binary, ``p2neg`` = 2**-exponent);
    2: ``v / p10`` (a grid of step ``p10``). A value that does not scale exactly repeats the previous
    integer, so its residual carries it.
    """
    approx = np.empty(v.shape[0], dtype=np.float64)
    last = np.int64(0)
    for i in range(v.shape[0]):
        if mode == 0:
            s = v[i] * p10
        elif mode == 1:
            s = np.ldexp(v[i], exponent)
        else:
            s = v[i] / p10
        if np.isfinite(s) and abs(s) < _EXACT_LIMIT:
            last = np.int64(np.rint(s))
        n[i] = last
        if mode == 0:
            approx[i] = np.float64(last) / p10
        elif mode == 1:
            approx[i] = np.float64(last) * p2neg
        else:
            approx[i] = np.float64(last) * p10
    vb = v.view(np.int64)
    ab = approx.view(np.int64)
    for i in range(v.shape[0]):
        r[i] = vb[i] - ab[i]


@numba.njit(cache=True, nogil=True)
def choose(  # pragma: no cover - compiled
    sample: Any,
    pow10: Any,
    limit: float,
    near_ulps: int,
    counts: Any,
    fixed: int,
    order_bytes: int,
    exc_entry: int,
    step: float,
) -> tuple[int, int, int]:
    """decimal_float's scaling choice on a sample: (mode, exponent, estimated bytes; -1: all exact).

    The decimal exponents that make most values exact or nearly so, then the binary exponents the
    values need, each sized exactly as the encoder would write it. ``step`` > 0: only the size of the
    sample on that grid (mode 2), no search.
    """
    m = sample.shape[0]
    bits = sample.view(np.int64)
    approx = np.empty(m, dtype=np.float64)
    ok = np.empty(m, dtype=np.bool_)
    modes = np.zeros(4, dtype=np.int64)
    exps = np.zeros(4, dtype=np.int64)
    k = 0
    best_exact = -1
    best_exact_e = 0
    best_near = -1
    best_near_e = 0
    for e in range(0 if step > 0 else pow10.shape[0]):
        p = pow10[e]
        for i in range(m):
            s = sample[i] * p
            ok[i] = np.isfinite(s) and abs(s) < limit
            approx[i] = (np.rint(s) if ok[i] else 0.0) / p
        ab = approx.view(np.int64)
        exact = 0
        near = 0
        for i in range(m):
            if ok[i]:
                d = bits[i] - ab[i]
                if d == 0:
                    exact += 1
                if abs(d) <= near_ulps:
                    near += 1
        if exact == m:
            # every value exact: no exponent can do better (the common case of decimals from a
            # CSV or a PLC), so the smaller exponents' counts are all that was needed
            return 0, e, -1
        if exact > best_exact:
            best_exact = exact
            best_exact_e = e
        if near > best_near:
            best_near = near
            best_near_e = e
    if best_exact == m and step <= 0:
        return 0, best_exact_e, -1
    if step > 0:
        modes[k] = 2
        k += 1
    else:
        exps[k] = min(best_exact_e, best_near_e)
        k += 1
        if best_near_e != best_exact_e:
            exps[k] = max(best_exact_e, best_near_e)
            k += 1
    need = np.empty(m, dtype=np.int64)
    count = 0
    for i in range(m if step <= 0 else 0):
        x = sample[i]
        if np.isfinite(x) and x != 0.0:
            mant, ex = math.frexp(x)
            mm = np.uint64(abs(mant) * 9007199254740992.0)
            tz = 0
            while mm & np.uint64(1) == np.uint64(0):
                mm >>= np.uint64(1)
                tz += 1
            need[count] = min(max(53 - ex - tz, 0), 1074)
            count += 1
    if step > 0:
        pass
    elif count == 0:
        modes[k] = 1
        exps[k] = 0
        k += 1
    else:
        ranked = np.sort(need[:count])
        q90 = ranked[(9 * (count - 1) + 9) // 10]
        top = ranked[count - 1]
        modes[k] = 1
        exps[k] = q90
        k += 1
        if top != q90:
            modes[k] = 1
            exps[k] = top
            k += 1
    n = np.empty(m, dtype=np.int64)
    r = np.empty(m, dtype=np.int64)
    best = -1
    best_mode = 0
    best_exp = 0
    for c in range(k):
        mode = modes[c]
        e = exps[c]
        p10 = pow10[e] if mode == 0 else step if mode == 2 else 1.0
        p2neg = np.ldexp(1.0, -e) if mode == 1 else 1.0
        split(sample, mode, e, p10, p2neg, n, r)
        # plan_size(n, 1) + plan_size(r, 0): the exact stream sizes, by intstream's own loop
        size = 2 * fixed + order_bytes
        if m > 1:
            size += stream_stats(n, 1, counts, exc_entry)[2]
        if m > 0:
            size += stream_stats(r, 0, counts, exc_entry)[2]
        if best < 0 or size < best:
            best = size
            best_mode = mode
            best_exp = e
    return best_mode, best_exp, best
