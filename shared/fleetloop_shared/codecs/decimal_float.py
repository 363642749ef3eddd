"""Floats as integers: decimal (ALP-style) or binary scaling, with an exact bit-level residual.

Most float signals are not arbitrary doubles: a CSV holds ``90.6454`` (a decimal with few digits), a DBC
signal is ``raw * 0.01 - 67.67`` (a decimal computed in binary, off by an ulp or two), a phone IMU gives
float32 values (binary fractions with 24 significant bits). Each becomes a small integer ``n`` with

* decimal mode: ``approx = n / 10**e`` (``10**e`` is exact for ``e <= 22``; division is correctly
  rounded, so every platform computes the same ``approx``), or
* binary mode: ``approx = n * 2**-k`` (exact),

and a residual ``r = bits(value) - bits(approx)`` (int64, wrapping), which is zero where the scaling is
exact and a small number of ulps where the value was computed in binary. Both ``n`` and ``r`` go through
:mod:`fleetloop_shared.codecs.intstream`. The round trip is exact for every double by construction — NaN
payloads, -0.0, infinities and values the scaling cannot express just carry a large residual (they are
exceptions of the residual stream), so there is no separate exception list to get wrong.

The encoder picks the scaling on a sample (at most :data:`SAMPLE` values) by estimated size, then codes
the whole column. Layout: docs/segment-format.md, "Scaled float".
"""

from __future__ import annotations

import struct

import numpy as np
import numpy.typing as npt

from fleetloop_shared.codecs import intstream

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

MODE_DECIMAL = 0
MODE_BINARY = 1
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


def _split(v: F64, mode: int, exponent: int) -> tuple[I64, I64]:
    """``n`` and the residual for every value (forward-filling ``n`` where the scaling overflows)."""
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = v * np.float64(10.0**exponent) if mode == MODE_DECIMAL else np.ldexp(v, exponent)
        ok = np.isfinite(scaled) & (np.abs(scaled) < _LIMIT)
    n = np.zeros(v.shape[0], dtype=np.int64)
    n[ok] = np.round(scaled[ok]).astype(np.int64)
    if not ok.all():
        idx = np.where(ok, np.arange(v.shape[0]), 0)
        np.maximum.accumulate(idx, out=idx)
        n = n[idx]
    with np.errstate(over="ignore", invalid="ignore"):
        approx = _approx(n, mode, exponent)
    r = v.view(np.int64) - approx.view(np.int64)
    return n, r


def _estimate(sample: F64, mode: int, exponent: int) -> int:
    n, r = _split(sample, mode, exponent)
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
    n = int(v.shape[0])
    sample = v if n <= SAMPLE else v[(np.arange(SAMPLE, dtype=np.int64) * (n - 1)) // (SAMPLE - 1)]
    sample = np.ascontiguousarray(sample)
    best: tuple[int, int, int] | None = None
    decimals, all_exact = _decimal_candidates(sample)
    if all_exact:
        return MODE_DECIMAL, decimals[0]
    candidates = [(MODE_DECIMAL, e) for e in decimals]
    candidates += [(MODE_BINARY, k) for k in _binary_exponent_candidates(sample)]
    for mode, exponent in candidates:
        size = _estimate(sample, mode, exponent)
        if best is None or size < best[0]:
            best = (size, mode, exponent)
    assert best is not None
    return best[1], best[2]


def encode(v: F64) -> bytes:
    """The scaled-float payload of ``v`` (any float64 values)."""
    return encode_variants(v)[0]


def encode_variants(v: F64) -> tuple[bytes, bytes | None, bool]:
    """Two payloads of ``v``: with the integers bit-packed (for zstd on top), and with them as
    compressed byte planes when that was worth trying; the framing caller keeps the smaller. The flag
    says the scaling was exact for every value (the column is decimals or scaled integers, so no
    encoding of the raw doubles can be smaller and the caller need not try one)."""
    v = np.ascontiguousarray(v, dtype=np.float64)
    mode, exponent = choose(v)
    n, r = _split(v, mode, exponent)
    head = _HEAD.pack(mode, exponent)
    r_stream = intstream.encode(r, (0, 1))
    n_stream, n_planes = intstream.encode_variants(n)
    exact = not r.any()
    return (
        head + n_stream + r_stream,
        None if n_planes is None else head + n_planes + r_stream,
        exact,
    )


def decode(data: bytes, count: int) -> F64:
    """Inverse of :func:`encode`; raises :class:`intstream.StreamError` on malformed bytes."""
    if len(data) < _HEAD.size:
        raise intstream.StreamError("scaled float header truncated")
    mode, exponent = _HEAD.unpack_from(data, 0)
    if mode == MODE_DECIMAL and exponent > MAX_DECIMAL_EXPONENT:
        raise intstream.StreamError(f"decimal exponent {exponent} > {MAX_DECIMAL_EXPONENT}")
    if mode == MODE_BINARY and exponent > MAX_BINARY_EXPONENT:
        raise intstream.StreamError(f"binary exponent {exponent} > {MAX_BINARY_EXPONENT}")
    if mode not in (MODE_DECIMAL, MODE_BINARY):
        raise intstream.StreamError(f"unknown scaling mode {mode}")
    n, pos = intstream.decode(data, _HEAD.size, count)
    r, pos = intstream.decode(data, pos, count)
    if pos != len(data):
        raise intstream.StreamError(f"{len(data) - pos} bytes after the scaled float streams")
    with np.errstate(over="ignore", invalid="ignore"):
        approx = _approx(n, mode, exponent)
    return (approx.view(np.int64) + r).view(np.float64)
