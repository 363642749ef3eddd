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
multiples of a part, then refined on the sample's largest value (a step read off one gap is only as
exact as that gap; ``n * step`` must hit the grid across the whole range) and nudged by an ulp either
way to the most exact. The search is one compiled kernel (``decimal_float``'s ``grid_step``, beside the
chooser it shares its sizing with) with a numpy twin that makes the same decisions; as numpy calls on
every candidate column it cost ~10 % of the encoder's time.

Layout: docs/segment-format.md, "Grid float (codec 24)".
"""

from __future__ import annotations

import math
import struct

import numpy as np
import numpy.typing as npt

from fleetloop_shared.segment.codecs import StreamError, decimal_float, intstream

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
#: ... screened on this many of the gaps.
_SCREEN_GAPS = 8
#: The grid is used only when its estimate is below this share of the scaled float's (a close call is
#: not worth encoding the column twice).
GAIN = 0.97
#: At least this many distinct sampled values (fewer: a dictionary or the plain codecs do as well).
_MIN_DISTINCT = 8


def max_encoded_size(count: int) -> int:
    return _STEP.size + 2 * intstream.max_encoded_size(count)


def _split(v: F64, step: float) -> tuple[I64, I64]:
    """``n`` (forward-filled where ``v / step`` is no integer a double holds) and the residual."""
    return decimal_float.split_grid(v, step)


def _estimate(sample: F64, step: float) -> int:
    return decimal_float.grid_size(sample, step)


def find_step(v: F64, estimate: float) -> tuple[float, float] | None:
    """The step of ``v``'s grid and its estimated bytes a value, when on the sample it codes clearly
    smaller (:data:`GAIN`) than ``estimate`` bytes a value (what the decimal or binary scaling was
    estimated at); else None. One compiled pass when numba is there (the same decisions)."""
    sample = decimal_float.sample_of(v)
    kernels = decimal_float._load_kernels()
    if kernels is not None:
        args = (
            _MIN_DISTINCT,
            _NOISE,
            _MULTIPLE_TOLERANCE,
            _MULTIPLE_SHARE,
            _SCREEN_GAPS,
            len(_PARTS),
            _LIMIT,
        )
        found = float(kernels[2](sample, *args))
        step = found if found > 0 else None
    else:
        step = _find_step_numpy(sample)
    if step is None:
        return None
    size = _estimate(sample, step) / sample.shape[0]
    return None if size >= GAIN * estimate else (step, size)


def _find_step_numpy(sample: F64) -> float | None:
    distinct = np.unique(sample[np.isfinite(sample)])
    if distinct.shape[0] < _MIN_DISTINCT:
        return None
    with np.errstate(over="ignore", invalid="ignore"):  # (infinite gaps and multiples fail the tests)
        gaps = np.diff(distinct)
        gaps = gaps[gaps > np.maximum(np.abs(distinct[1:]), np.abs(distinct[:-1])) * _NOISE]
        if gaps.shape[0] < _MIN_DISTINCT - 1:
            return None
        smallest = float(gaps.min())
        multiples = gaps / smallest
    parts = _parts(multiples)
    if parts == 0:
        return None
    smallest /= parts
    largest = float(distinct[np.argmax(np.abs(distinct))])
    ratio = largest / smallest
    if not (math.isfinite(ratio) and abs(ratio) < _LIMIT) or round(ratio) == 0:
        return None
    # ``largest / count`` is the step to within half an ulp of ``largest`` over ``count``; of it and
    # its neighbouring doubles, the one that makes the most values exact (tried only when it matters)
    step = largest / round(ratio)
    if np.count_nonzero(_split(sample, step)[1]) * 2 > sample.shape[0]:
        step = max(
            (step, math.nextafter(step, math.inf), math.nextafter(step, -math.inf)),
            key=lambda s: np.count_nonzero(_split(sample, s)[1] == 0) if math.isfinite(s) and s > 0 else -1,
        )
    if not (math.isfinite(step) and step > 0):
        return None
    return step


def _parts(multiples: F64) -> int:
    """Into how many parts (1 … 64) the smallest gap divides so that ~all gaps are whole multiples of a
    part (the smallest sampled gap may span several steps: a sample of a wide column rarely holds two
    neighbours); 0 when none does. Counts of parts are screened on a few gaps first (true doubles fail
    there at once)."""
    with np.errstate(over="ignore", invalid="ignore"):
        if _whole_share(multiples) >= _MULTIPLE_SHARE:
            return 1
        few = multiples[:: max(1, multiples.shape[0] // _SCREEN_GAPS)][:_SCREEN_GAPS]
        scaled = few[None, :] * _PARTS[1:, None]
        close = np.abs(scaled - np.rint(scaled)) <= _MULTIPLE_TOLERANCE * np.maximum(scaled, 1.0)
        for k in _PARTS[1:][np.count_nonzero(close, axis=1) >= _MULTIPLE_SHARE * few.shape[0] - 1]:
            if _whole_share(multiples * k) >= _MULTIPLE_SHARE:
                return int(k)
    return 0


def _whole_share(multiples: F64) -> float:
    whole = np.abs(multiples - np.rint(multiples)) <= _MULTIPLE_TOLERANCE * np.maximum(multiples, 1.0)
    return float(np.count_nonzero(whole)) / max(1, int(multiples.shape[0]))


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
    """Inverse of :func:`encode_variants`; raises :class:`StreamError` on malformed bytes."""
    if len(data) < _STEP.size:
        raise StreamError("grid float step truncated")
    (step,) = _STEP.unpack_from(data, 0)
    if not (math.isfinite(step) and step > 0):
        raise StreamError(f"grid step {step!r} is not a positive finite number")
    n, r = decimal_float.decode_streams(data, _STEP.size, count, "grid float")
    with np.errstate(over="ignore", invalid="ignore"):
        approx = n.astype(np.float64) * np.float64(step)
    return (approx.view(np.int64) + r).view(np.float64)
