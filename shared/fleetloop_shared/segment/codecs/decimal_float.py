"""Floats as integers: decimal (ALP-style) or binary scaling, with an exact bit-level residual.

Most float signals are not arbitrary doubles: a CSV holds ``90.6454`` (a decimal with few digits), a DBC
signal is ``raw * 0.01 - 67.67`` (a decimal computed in binary, off by an ulp or two), a phone IMU gives
float32 values (binary fractions with 24 significant bits). Each becomes a small integer ``n`` with

* decimal mode: ``approx = n / 10**e`` (``10**e`` is exact for ``e <= 22``; division is correctly
  rounded, so every platform computes the same ``approx``), or
* binary mode: ``approx = n * 2**-k`` (exact),

and a residual ``r = bits(value) - bits(approx)`` (int64, wrapping), which is zero where the scaling is
exact and a small number of ulps where the value was computed in binary. Both ``n`` and ``r`` go through
:mod:`.intstream`. The round trip is exact for every double by construction — NaN
payloads, -0.0, infinities and values the scaling cannot express just carry a large residual (they are
exceptions of the residual stream), so there is no separate exception list to get wrong.

The encoder picks the scaling on a sample (at most :data:`SAMPLE` values) by estimated size, then codes
the whole column. Layout: docs/segment-format.md, "Scaled float".

The choice and the split run as one numba kernel each when numba is there (the numpy versions are a few
dozen array operations on 256 values each, whose call overhead dominated the encoder's time); both
implementations make the same choice and the same integers, so the bytes are identical
(``tests/shared/test_codecs.py`` compares them).
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import numpy.typing as npt

from fleetloop_shared.segment.codecs import StreamError, intstream
from fleetloop_shared.segment.codecs.compiled import numba_kernels

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

MODE_DECIMAL = 0
MODE_BINARY = 1
#: Kernel-only mode (never stored in a scaled float): ``n = rint(v / step)``, ``approx = n * step`` — the
#: split and the size estimate of :mod:`grid_float`, computed by the same compiled loops.
_MODE_GRID = 2
MAX_DECIMAL_EXPONENT = 22  # 10**22 is the largest power of ten a double holds exactly
MAX_BINARY_EXPONENT = 1074
SAMPLE = 256
_HEAD = struct.Struct("<BH")  # mode, exponent
_LIMIT = float(2**53)


def max_encoded_size(count: int) -> int:
    return _HEAD.size + 2 * intstream.max_encoded_size(count)


def _approx(n: I64, mode: int, exponent: int) -> F64:
    if mode == MODE_DECIMAL:
        return n.astype(np.float64) / np.float64(10.0**exponent)
    return n.astype(np.float64) * np.float64(2.0**-exponent)


def _split(v: F64, mode: int, exponent: int, step: float = 0.0) -> tuple[I64, I64]:
    """``n`` and the residual for every value (forward-filling ``n`` where the scaling overflows);
    ``step`` is the grid's (mode :data:`_MODE_GRID` only)."""
    kernels = _load_kernels()
    if kernels is not None:
        v = np.ascontiguousarray(v, dtype=np.float64)  # the kernel reads the bits through a view
        n = np.empty(v.shape[0], dtype=np.int64)
        r = np.empty(v.shape[0], dtype=np.int64)
        # the same factors _approx uses: 10**e (exact for e <= 22) to divide by, 2**-k to multiply by,
        # the grid's step to multiply by (passed in place of 10**e)
        p10 = 10.0**exponent if mode == MODE_DECIMAL else step if mode == _MODE_GRID else 1.0
        p2neg = 2.0**-exponent if mode == MODE_BINARY else 1.0
        kernels[0](v, mode, exponent, p10, p2neg, n, r)
        return n, r
    return _split_numpy(v, mode, exponent, step)


def split_grid(v: F64, step: float) -> tuple[I64, I64]:
    """:mod:`grid_float`'s split: ``n = rint(v / step)`` (forward-filled where that is no integer a double
    holds) and the residual ``bits(v) - bits(n * step)``."""
    return _split(v, _MODE_GRID, 0, step)


def grid_size(sample: F64, step: float) -> int:
    """Exact stream bytes of ``sample`` on a grid of ``step`` (as the chooser's sizes: n at order 1,
    the residual at order 0)."""
    sample = np.ascontiguousarray(sample, dtype=np.float64)
    kernels = _load_kernels()
    if kernels is not None:
        return int(kernels[1](sample, *_choose_args(step))[2])
    return _estimate(sample, _MODE_GRID, 0, step)


def _split_numpy(v: F64, mode: int, exponent: int, step: float = 0.0) -> tuple[I64, I64]:
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if mode == _MODE_GRID:
            scaled = v / np.float64(step)
        elif mode == MODE_DECIMAL:
            scaled = v * np.float64(10.0**exponent)
        else:
            scaled = np.ldexp(v, exponent)
        ok = np.isfinite(scaled) & (np.abs(scaled) < _LIMIT)
    n = np.zeros(v.shape[0], dtype=np.int64)
    n[ok] = np.round(scaled[ok]).astype(np.int64)
    if not ok.all():
        idx = np.where(ok, np.arange(v.shape[0]), 0)
        np.maximum.accumulate(idx, out=idx)
        n = n[idx]
    with np.errstate(over="ignore", invalid="ignore"):
        approx = n.astype(np.float64) * np.float64(step) if mode == _MODE_GRID else _approx(n, mode, exponent)
    r = v.view(np.int64) - approx.view(np.int64)
    return n, r


def _estimate(sample: F64, mode: int, exponent: int, step: float = 0.0) -> int:
    n, r = _split(sample, mode, exponent, step)
    return _size(n, (1,)) + _size(r, (0,))


def _size(x: I64, orders: tuple[int, ...]) -> int:
    return min(intstream.plan_size(x, order) for order in orders)


def _binary_exponent_candidates(sample: F64) -> list[int]:
    finite = sample[np.isfinite(sample) & (sample != 0)]
    if finite.size == 0:
        return [0]
    mant, exp = np.frexp(finite)
    m = np.abs(np.ldexp(mant, 53)).astype(np.uint64)  # 53-bit integer significand
    tz = np.zeros(m.shape, dtype=np.int64)
    rest = m.copy()
    for shift in (32, 16, 8, 4, 2, 1):
        zero = (rest & np.uint64((1 << shift) - 1)) == 0
        tz[zero] += shift
        rest[zero] >>= np.uint64(shift)
    need = np.clip(53 - exp.astype(np.int64) - tz, 0, MAX_BINARY_EXPONENT)
    # the 90th percentile ("higher" rank) and the maximum: enough for most values / for all of them
    ranked = np.sort(need)
    q90 = int(ranked[-(-9 * (ranked.shape[0] - 1) // 10)])
    return sorted({q90, int(ranked[-1])})


_DECIMALS = np.arange(0, 19)
_POW10 = 10.0**_DECIMALS
#: Residuals up to this many ulps count as "near" when ranking decimal exponents (DBC arithmetic).
_NEAR_ULPS = 64


def _decimal_candidates(sample: F64) -> tuple[list[int], bool]:
    """The exponents worth estimating: the smallest with the most exact values, and the smallest with
    the most values within a few ulps (values computed as ``raw * scale + offset``). One matrix pass.
    Also whether the first makes every sampled value exact (then nothing else can do better by much
    and the estimates are skipped: the common case of decimals from a CSV or a PLC)."""
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = sample[None, :] * _POW10[:, None]
        ok = np.isfinite(scaled) & (np.abs(scaled) < _LIMIT)
        n = np.where(ok, np.round(scaled), 0.0)
        approx = n / _POW10[:, None]
    r = sample.view(np.int64)[None, :] - approx.view(np.int64)
    exact = ((r == 0) & ok).sum(axis=1)
    near = ((np.abs(r) <= _NEAR_ULPS) & ok).sum(axis=1)
    best_exact = int(np.argmax(exact))
    if int(exact[best_exact]) == sample.shape[0]:
        return [best_exact], True
    return sorted({best_exact, int(np.argmax(near))}), False


def choose(v: F64) -> tuple[int, int]:
    """(mode, exponent) with the smallest estimated size on a sample of ``v``."""
    mode, exponent, _ = choose_estimated(v)
    return mode, exponent


def choose_estimated(v: F64) -> tuple[int, int, float]:
    """:func:`choose`, and the estimated bytes a value at that scaling (0.0 when every sampled value is
    exact: then no estimate was needed). Both implementations compute the same exact sizes."""
    sample = sample_of(v)
    kernels = _load_kernels()
    if kernels is not None:
        mode, exponent, size = kernels[1](sample, *_choose_args())
    else:
        mode, exponent, size = _choose_numpy(sample)
    return int(mode), int(exponent), max(0, int(size)) / max(1, int(sample.shape[0]))


def sample_of(v: F64) -> F64:
    """The values the scaling is chosen on: all of them, or :data:`SAMPLE` spread evenly over them."""
    n = int(v.shape[0])
    sample = v if n <= SAMPLE else v[(np.arange(SAMPLE, dtype=np.int64) * (n - 1)) // (SAMPLE - 1)]
    return np.ascontiguousarray(sample, dtype=np.float64)


def _choose_numpy(sample: F64) -> tuple[int, int, int]:
    best: tuple[int, int, int] | None = None
    decimals, all_exact = _decimal_candidates(sample)
    if all_exact:
        return MODE_DECIMAL, decimals[0], -1
    candidates = [(MODE_DECIMAL, e) for e in decimals]
    candidates += [(MODE_BINARY, k) for k in _binary_exponent_candidates(sample)]
    for mode, exponent in candidates:
        size = _estimate(sample, mode, exponent)
        if best is None or size < best[0]:
            best = (size, mode, exponent)
    assert best is not None
    return best[1], best[2], best[0]


def _choose_args(step: float = 0.0) -> tuple[Any, ...]:
    """The compiled chooser's arguments after the sample; ``step`` > 0 sizes that grid instead."""
    return (
        _POW10,
        _LIMIT,
        _NEAR_ULPS,
        np.zeros(65, dtype=np.int64),
        intstream.PLAN_FIXED_BYTES,
        intstream.PLAN_HEAD_BYTES,
        intstream.EXCEPTION_BYTES,
        step,
    )


@numba_kernels
def _load_kernels() -> tuple[Any, Any, Any] | None:
    """(split, choose, grid_step) compiled with numba (cached on disk), or None: then the numpy versions
    run. The split and the chooser are :mod:`.compiled_loops`' (the chooser sizes its candidates with
    intstream's own loop)."""
    import numba

    from fleetloop_shared.segment.codecs.compiled_loops import choose, split

    @numba.njit(cache=True, nogil=True)
    def grid_step(  # pragma: no cover - compiled
        sample: Any,
        min_distinct: int,
        noise: float,
        tolerance: float,
        share: float,
        screen: int,
        parts: int,
        limit: float,
    ) -> Any:
        # grid_float._find_step_numpy in one compiled pass (the same arithmetic, the same decisions);
        # 0.0: no grid
        finite = np.sort(sample[np.isfinite(sample)])
        distinct = np.empty(finite.shape[0], dtype=np.float64)
        nd = 0
        for i in range(finite.shape[0]):
            if nd == 0 or finite[i] != distinct[nd - 1]:
                distinct[nd] = finite[i]
                nd += 1
        if nd < min_distinct:
            return 0.0
        gaps = np.empty(nd - 1, dtype=np.float64)
        ng = 0
        for i in range(nd - 1):
            gap = distinct[i + 1] - distinct[i]
            if gap > max(abs(distinct[i + 1]), abs(distinct[i])) * noise:
                gaps[ng] = gap
                ng += 1
        if ng < min_distinct - 1:
            return 0.0
        smallest = gaps[0]
        for i in range(ng):
            smallest = min(smallest, gaps[i])
        multiples = np.empty(ng, dtype=np.float64)
        for i in range(ng):
            multiples[i] = gaps[i] / smallest
        stride = max(1, ng // screen)
        nfew = min(screen, (ng + stride - 1) // stride)
        found = 0
        for k in range(1, parts + 1):
            kk = np.float64(k)
            if k > 1:  # screened on a few gaps first
                close = 0
                for j in range(nfew):
                    m = multiples[j * stride] * kk
                    if abs(m - np.rint(m)) <= tolerance * max(m, 1.0):
                        close += 1
                if close < share * nfew - 1:
                    continue
            whole = 0
            for i in range(ng):
                m = multiples[i] * kk if k > 1 else multiples[i]
                if abs(m - np.rint(m)) <= tolerance * max(m, 1.0):
                    whole += 1
            if whole / max(1, ng) >= share:
                found = k
                break
        if found == 0:
            return 0.0
        smallest /= np.float64(found)
        largest = distinct[0]
        for i in range(nd):
            if abs(distinct[i]) > abs(largest):
                largest = distinct[i]
        ratio = largest / smallest
        if not (np.isfinite(ratio) and abs(ratio) < limit) or np.rint(ratio) == 0.0:
            return 0.0
        step = largest / np.rint(ratio)
        bits = sample.view(np.int64)
        approx = np.empty(sample.shape[0], dtype=np.float64)
        ab = approx.view(np.int64)
        best = step
        best_exact = -1
        for c in range(3):
            s = step if c == 0 else np.nextafter(step, np.inf) if c == 1 else np.nextafter(step, -np.inf)
            exact = -1
            if np.isfinite(s) and s > 0:
                exact = 0
                last = np.int64(0)
                for i in range(sample.shape[0]):
                    q = sample[i] / s
                    if np.isfinite(q) and abs(q) < limit:
                        last = np.int64(np.rint(q))
                    approx[i] = np.float64(last) * s
                for i in range(sample.shape[0]):
                    if bits[i] == ab[i]:
                        exact += 1
            if c == 0 and exact * 2 >= sample.shape[0]:
                return step  # most values exact: no neighbour can do much better
            if exact > best_exact:
                best_exact = exact
                best = s
        return best if np.isfinite(best) and best > 0 else 0.0

    probe = np.array([1.5, 0.25, 3.0], dtype=np.float64)  # compile now
    split(probe, 0, 2, 100.0, 1.0, np.empty(3, np.int64), np.empty(3, np.int64))
    choose(probe, *_choose_args())
    choose(probe, *_choose_args(0.5))
    grid_step(np.arange(20, dtype=np.float64) * 0.3, 8, 2.0**-40, 1e-6, 0.9, 8, 64, _LIMIT)
    return (split, choose, grid_step)


def encode(v: F64) -> bytes:
    """The scaled-float payload of ``v`` (any float64 values)."""
    packed, planes, _ = encode_variants(v)
    payload = packed if packed is not None else planes
    assert payload is not None  # one of the two always exists
    return payload


def encode_variants(v: F64, choice: tuple[int, int] | None = None) -> tuple[bytes | None, bytes | None, bool]:
    """Two payloads of ``v``: with the integers bit-packed (for zstd on top), and with them as
    compressed byte planes when that was worth trying; the framing caller keeps the smaller (the first
    is ``None`` when the planes are sure to be, see ``intstream.encode_variants``). The flag says the
    scaling was exact for every value (the column is decimals or scaled integers, so no encoding of
    the raw doubles can be smaller and the caller need not try one)."""
    v = np.ascontiguousarray(v, dtype=np.float64)
    mode, exponent = choose(v) if choice is None else choice
    n, r = _split(v, mode, exponent)
    head = _HEAD.pack(mode, exponent)
    r_stream = intstream.encode(r, (0, 1))
    n_stream, n_planes = intstream.encode_variants(n)
    exact = not r.any()
    return (
        None if n_stream is None else head + n_stream + r_stream,
        None if n_planes is None else head + n_planes + r_stream,
        exact,
    )


def decode(data: bytes, count: int) -> F64:
    """Inverse of :func:`encode`; raises :class:`StreamError` on malformed bytes."""
    if len(data) < _HEAD.size:
        raise StreamError("scaled float header truncated")
    mode, exponent = _HEAD.unpack_from(data, 0)
    if mode == MODE_DECIMAL and exponent > MAX_DECIMAL_EXPONENT:
        raise StreamError(f"decimal exponent {exponent} > {MAX_DECIMAL_EXPONENT}")
    if mode == MODE_BINARY and exponent > MAX_BINARY_EXPONENT:
        raise StreamError(f"binary exponent {exponent} > {MAX_BINARY_EXPONENT}")
    if mode not in (MODE_DECIMAL, MODE_BINARY):
        raise StreamError(f"unknown scaling mode {mode}")
    n, r = decode_streams(data, _HEAD.size, count, "scaled float")
    with np.errstate(over="ignore", invalid="ignore"):
        approx = _approx(n, mode, exponent)
    return (approx.view(np.int64) + r).view(np.float64)


def decode_streams(data: bytes, start: int, count: int, what: str) -> tuple[I64, I64]:
    """The two integer streams (``n``, then the residual) from ``start`` to the very end of ``data``:
    the scaled float's and the grid float's payload after their headers."""
    n, pos = intstream.decode(data, start, count)
    r, pos = intstream.decode(data, pos, count)
    if pos != len(data):
        raise StreamError(f"{len(data) - pos} bytes after the {what} streams")
    return n, r
