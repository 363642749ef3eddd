"""Floats on a grid of any step: ``value = n * step`` with an exact bit-level residual.

Why: a CAN signal converted to other units, or an ADC count under a calibration, lies on a grid whose
step is neither a power of ten nor of two — comma2k19's wheel speeds are ``(raw * 0.01 - 67.67) / 3.6``
m/s, a step of 0.0027777… — so the decimal and binary scalings of :mod:`decimal_float` find no small
integers in them and the column costs ~16 bits a value where its raw counts cost ~5. Here the encoder
finds the step in the data and stores one double for it, then ``n`` and the residual
``r = bits(value) - bits(n * step)`` as two integer streams (:mod:`intstream`), like the scaled float
codec. The product is a single IEEE multiplication (correctly rounded, so every platform computes the
same), and the residual makes the round trip exact for every double whatever the step: values off the
grid, NaN payloads, -0.0 and infinities just carry a larger residual.

The step is found on a sample (the one :func:`decimal_float.choose_estimated` looks at): the smallest
gap between its distinct values divided into the fewest parts (1 … 64) that make the other gaps whole
multiples of a part, then refined on
the sample's largest value (a step read off one gap is only as exact as that gap; ``n * step`` must hit
the grid across the whole range) and nudged by an ulp either way to the most exact.

Layout: docs/segment-format.md, "Grid float (codec 24)".
"""

from __future__ import annotations

import math
import struct

import numpy as np
import numpy.typing as npt

from fleetloop_shared.codecs import decimal_float, intstream

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

_STEP = struct.Struct("<d")
_LIMIT = float(2**53)
#: The sample's gaps must be whole multiples of the smallest one to within this share of a step ...
_MULTIPLE_TOLERANCE = 1e-6
#: ... for at least this share of them (a few gaps between values off the grid are allowed).
_MULTIPLE_SHARE = 0.9
#: Gaps smaller than this share of the values are ulp noise around one grid point, not a step.
_NOISE = 2.0**-40
#: Into how many parts the smallest sampled gap may be divided to find the step.
_PARTS = np.arange(1, 65, dtype=np.float64)
#: At least this many distinct sampled values (fewer: a dictionary or the plain codecs do as well).
_MIN_DISTINCT = 8


def max_encoded_size(count: int) -> int:
    return _STEP.size + 2 * intstream.max_encoded_size(count)


def _split(v: F64, step: float) -> tuple[I64, I64]:
    """``n`` (forward-filled where ``v / step`` is no integer a double holds) and the residual."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        q = v / np.float64(step)
        ok = np.isfinite(q) & (np.abs(q) < _LIMIT)
    n = np.zeros(v.shape[0], dtype=np.int64)
    n[ok] = np.rint(q[ok]).astype(np.int64)
    if not ok.all():
        idx = np.where(ok, np.arange(v.shape[0]), 0)
        np.maximum.accumulate(idx, out=idx)
        n = n[idx]
    with np.errstate(over="ignore", invalid="ignore"):
        approx = n.astype(np.float64) * np.float64(step)
    return n, v.view(np.int64) - approx.view(np.int64)


def _estimate(sample: F64, step: float) -> int:
    n, r = _split(sample, step)
    return min(intstream.plan_size(n, 1), intstream.plan_size(n, 0)) + intstream.plan_size(r, 0)


def find_step(v: F64, estimate: float) -> float | None:
    """The step of ``v``'s grid when, on the sample, it codes smaller than ``estimate`` bytes a value
    (what the decimal or binary scaling was estimated at); else None."""
    sample = decimal_float.sample_of(v)
    finite = sample[np.isfinite(sample)]
    distinct = np.unique(finite)
    if distinct.shape[0] < _MIN_DISTINCT:
        return None
    gaps = np.diff(distinct)
    gaps = gaps[gaps > np.maximum(np.abs(distinct[1:]), np.abs(distinct[:-1])) * _NOISE]
    if gaps.shape[0] < _MIN_DISTINCT - 1:
        return None
    # the smallest gap may span several steps (a sample of a wide column rarely holds two neighbours):
    # the step is the smallest gap over the fewest parts that make the gaps whole multiples of it
    smallest = float(gaps.min())
    with np.errstate(over="ignore", invalid="ignore"):
        multiples = gaps[None, :] * _PARTS[:, None] / smallest
        whole = np.abs(multiples - np.rint(multiples)) <= _MULTIPLE_TOLERANCE * np.maximum(multiples, 1.0)
    fits = np.flatnonzero(np.count_nonzero(whole, axis=1) >= _MULTIPLE_SHARE * gaps.shape[0])
    if fits.shape[0] == 0:
        return None
    smallest /= float(_PARTS[fits[0]])
    largest = float(distinct[np.argmax(np.abs(distinct))])
    ratio = largest / smallest
    if not (math.isfinite(ratio) and abs(ratio) < _LIMIT):
        return None
    count = round(ratio)
    if count == 0:
        return None
    refined = largest / count
    best: tuple[int, float] | None = None
    for step in (refined, math.nextafter(refined, math.inf), math.nextafter(refined, -math.inf)):
        if not (math.isfinite(step) and step > 0):
            continue
        size = _estimate(sample, step)
        if best is None or size < best[0]:
            best = (size, step)
    if best is None or best[0] >= estimate * sample.shape[0]:
        return None
    return best[1]


def encode_variants(v: F64, step: float) -> tuple[bytes | None, bytes | None]:
    """The payload with ``n`` bit-packed (for zstd on top) and, where worth trying, as byte planes (as
    :func:`decimal_float.encode_variants`; the first is None when the planes are sure to be smaller)."""
    v = np.ascontiguousarray(v, dtype=np.float64)
    n, r = _split(v, step)
    head = _STEP.pack(step)
    r_stream = intstream.encode(r, (0, 1))
    n_stream, n_planes = intstream.encode_variants(n)
    return (
        None if n_stream is None else head + n_stream + r_stream,
        None if n_planes is None else head + n_planes + r_stream,
    )


def decode(data: bytes, count: int) -> F64:
    """Inverse of :func:`encode_variants`; raises :class:`intstream.StreamError` on malformed bytes."""
    if len(data) < _STEP.size:
        raise intstream.StreamError("grid float step truncated")
    (step,) = _STEP.unpack_from(data, 0)
    if not (math.isfinite(step) and step > 0):
        raise intstream.StreamError(f"grid step {step!r} is not a positive finite number")
    n, pos = intstream.decode(data, _STEP.size, count)
    r, pos = intstream.decode(data, pos, count)
    if pos != len(data):
        raise intstream.StreamError(f"{len(data) - pos} bytes after the grid float streams")
    with np.errstate(over="ignore", invalid="ignore"):
        approx = n.astype(np.float64) * np.float64(step)
    return (approx.view(np.int64) + r).view(np.float64)
