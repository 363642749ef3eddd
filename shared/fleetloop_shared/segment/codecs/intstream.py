"""Integer streams: the one integer codec behind timestamps, integer signals and decimal floats.

An int64 column becomes: an order (0 = the values, 1 = first differences, 2 = second differences) whose
leading values are stored whole, then the residuals as *patched frame of reference*: subtract their
minimum, divide by their greatest common divisor, bit-pack at the width that minimizes the size, and keep
the few values too wide for it as exceptions. The encoder computes the exact size of every order from
bit-length histograms (cheap) and packs only the winner.

Why these transforms: a steady or jittery clock becomes small second (or first) differences; bus loggers
tick in µs, so a GCD of 1000 saves ten bits per timestamp; CAN signals change rarely, so their first
differences are mostly zero; one outlier (a gap, a glitch) costs an exception, not a wider column.

All arithmetic wraps modulo 2**64 in both directions, so int64 extremes round-trip exactly.
Layout: docs/segment-format.md, "Integer stream".
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import numpy.typing as npt

from fleetloop_shared.segment.codecs import StreamError as StreamError  # (raised by every codec)
from fleetloop_shared.segment.codecs import bitpack, zstd_frames
from fleetloop_shared.segment.codecs.compiled import numba_kernels

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]

_HEAD = struct.Struct("<BI")  # order, count
_I64 = struct.Struct("<q")
_FOR = struct.Struct("<qQBI")  # base, gcd, width, exception count
_EXC_ENTRY = 12  # u32 position + u64 value
MAX_ORDER = 2
#: ``width`` value that selects the byte-plane layout (then the exception count field holds the planes).
PLANES = 255
_PLANE = struct.Struct("<BI")  # compressed?, stored length
#: Byte planes are tried from this many residuals on (below, framing outweighs any gain).
_PLANES_MIN_COUNT = 64
#: Bit widths at which the byte planes are taken without compressing the bit-packed stream to compare:
#: on the real corpus they were smaller for 78 of 83 such streams, and the other five cost 1.5 kB more
#: (of 1.36 MB).
PLANES_SURE = range(9, 20)


def max_encoded_size(count: int) -> int:
    """Upper bound of :func:`encode`'s output for ``count`` values (a decoder's allocation cap)."""
    return _HEAD.size + MAX_ORDER * _I64.size + _FOR.size + count * 8 + count * _EXC_ENTRY + 8 * 64


def _diff(x: I64, order: int) -> I64:
    y = x
    for _ in range(order):
        y = y[1:] - y[:-1]
    return y


_EXACT_FLOAT = np.uint64(1 << 53)


def _bit_lengths(u: U64) -> npt.NDArray[np.int64]:
    """Exact bit length of each value (0 for 0).

    ``frexp`` of the float conversion is exact below 2**53; the few larger values (rare: exceptions)
    are measured by shifting, so rounding to the next power of two never miscounts.
    """
    out = np.frexp(u.astype(np.float64))[1].astype(np.int64)
    big = u >= _EXACT_FLOAT
    if big.any():
        v = u[big]
        lengths = np.zeros(v.shape, dtype=np.int64)
        for shift in (32, 16, 8, 4, 2, 1):
            wide = v >= np.uint64(1 << shift)
            lengths[wide] += shift
            v[wide] >>= np.uint64(shift)
        out[big] = lengths + (v > 0)
    return out


def _stats_numpy(x: I64, order: int) -> tuple[int, int, npt.NDArray[np.int64]]:
    y = _diff(x, order)
    base = int(y.min())
    u = (y - np.int64(base)).view(np.uint64)
    g = int(np.gcd.reduce(u)) if u.shape[0] > 1 else 0
    if g > 1:
        u = u // np.uint64(g)
    return base, max(g, 1), np.bincount(_bit_lengths(u), minlength=65)


@numba_kernels
def _load_stats_kernel() -> Any:
    """One pass per statistic over ``x``'s differences without materializing them (numba), or None."""
    from fleetloop_shared.segment.codecs.compiled_loops import stream_stats

    probe = np.array([5, 7, 9], dtype=np.int64)
    stream_stats(probe, 1, np.zeros(65, dtype=np.int64), _EXC_ENTRY)  # compile now
    return stream_stats


def _stats(x: I64, order: int) -> tuple[int, int, int, int]:
    """(base, gcd, payload bytes, width) of the residuals of ``x`` at difference ``order`` (n > order)."""
    kernel = _load_stats_kernel()
    if kernel is None:
        base, g, counts = _stats_numpy(x, order)
        return (base, g, *_width(counts))
    base, g, size, w = kernel(x, order, np.zeros(65, dtype=np.int64), _EXC_ENTRY)
    return int(base), int(g), int(size), int(w)


def _width(counts: npt.NDArray[np.int64]) -> tuple[int, int]:
    """(payload bytes, width) minimizing packed bits + exceptions, from a bit-length histogram."""
    n = int(counts.sum())
    above = n - np.cumsum(counts)  # above[w] = how many need more than w bits
    sizes = (n * np.arange(65) + 7) // 8 + above * _EXC_ENTRY
    w = int(np.argmin(sizes))
    return int(sizes[w]), w


#: What :func:`plan_size` adds to the residuals' payload (header and frame of reference; per order), and
#: what one exception costs: the compiled float-scaling chooser computes the same sizes.
PLAN_FIXED_BYTES = _HEAD.size + _FOR.size
PLAN_HEAD_BYTES = _I64.size
EXCEPTION_BYTES = _EXC_ENTRY


def plan_size(x: I64, order: int) -> int:
    """Exact encoded size of ``x`` at one difference order (for callers choosing between transforms)."""
    if x.shape[0] <= order:
        return _HEAD.size + order * _I64.size + _FOR.size
    return _HEAD.size + order * _I64.size + _FOR.size + _stats(x, order)[2]


def encode(x: I64, orders: tuple[int, ...] = (0, 1, 2)) -> bytes:
    """The smallest stream of ``x`` over the given difference orders."""
    return encode_with_zstd(x, orders)[0]


def encode_with_zstd(x: I64, orders: tuple[int, ...] = (0, 1, 2)) -> tuple[bytes, bytes | None]:
    """:func:`encode`, plus the zstd frame of the result when choosing the layout already computed it
    (the segment encoder then need not compress the same bytes twice)."""
    stream, planes = encode_variants(x, orders)
    if stream is None:
        assert planes is not None
        return planes, None
    if planes is None:
        return stream, None
    compressed = zstd_frames.compress(stream)
    if len(planes) < len(compressed):
        return planes, None
    return stream, compressed


def encode_variants(x: I64, orders: tuple[int, ...] = (0, 1, 2)) -> tuple[bytes | None, bytes | None]:
    """The bit-packed stream of ``x`` and, where worth trying, the same residuals as byte planes.

    The caller picks: the bit-packed stream is usually zstd'd by whoever frames it (so only that caller
    knows its final size), while the planes are already compressed. At widths where the planes were
    smaller on nearly every real stream (:data:`PLANES_SURE`), only the planes are made and the stream
    is ``None``: compressing a bit-packed stream only to throw it away was ~5 % of the encoder's time.
    """
    x = np.ascontiguousarray(x, dtype=np.int64)
    n = int(x.shape[0])
    if n and x[0] == x[-1] and (x == x[0]).all():
        # A constant (an exact decimal's zero residuals, an idle signal): the stream the general path
        # would choose (order 0, width 0), without computing three plans.
        return _HEAD.pack(0, n) + _FOR.pack(int(x[0]), 1, 0, 0), None
    best: tuple[int, int, int, int, int] | None = None  # size, order, base, gcd, width
    for order in orders:
        if order > n:
            continue
        if order == 2 and best is not None and best[1] == 0 and 1 in orders:
            continue  # values beat their first differences: second differences would be wider still
        if order == n:
            size, base, g, w = 0, 0, 1, 0
        else:
            base, g, size, w = _stats(x, order)
            if g == 1 and w >= LOW_OUTLIER_MIN_WIDTH and n - order > 256:
                base, w, size = _above_low_outliers(x, order, base, w, size)
        size += order * _I64.size
        if best is None or size < best[0]:
            best = (size, order, base, g, w)
    assert best is not None  # order 0 always applies
    _, order, base, g, w = best
    heads = [int(x[0])] if order else []
    if order == 2:
        heads.append(int((x[1:2] - x[:1])[0]))  # (array arithmetic: wraps without a warning)
    u, exc = _residuals(x, order, base, g, w)
    parts = [_HEAD.pack(order, n)] + [_I64.pack(h) for h in heads]
    head = b"".join(parts)
    planes = head + _byte_planes(u, base, g) if u.shape[0] >= _PLANES_MIN_COUNT and w >= 6 else None
    if planes is not None and w in PLANES_SURE:
        return None, planes
    packed_vals = u
    if exc.size:
        packed_vals = u.copy()
        packed_vals[exc] = 0
    packed = [_FOR.pack(base, g, w, int(exc.size)), bitpack.pack(packed_vals, w)]
    if exc.size:
        packed.append(exc.astype("<u4").tobytes())
        packed.append(u[exc].astype("<u8").tobytes())
    return head + b"".join(packed), planes


#: Streams at least this wide are checked for a few values far *below* the rest (see below).
LOW_OUTLIER_MIN_WIDTH = 16
#: ... and the frame is moved above them when that makes the packed payload this much smaller.
_LOW_OUTLIER_GAIN = 0.75


def _above_low_outliers(x: I64, order: int, base: int, w: int, size: int) -> tuple[int, int, int]:
    """(base, width, payload size) with a few values far below the rest stored as exceptions instead
    of widening every value: the frame of reference starts at the minimum, so one glitch downward (a NaN's
    residual in a scaled float, the jump back between two series of a keyed column) made a stream
    of small residuals as wide as the glitch. The decoder needs nothing new: an exception holds the
    residual minus the base modulo 2**64, which adds back to the value (with gcd 1, which is why this
    is tried only then). Decided on the exact payload size, and only for a clear gain: measured on
    the corpus, moving the frame for small gains made the zstd'd streams larger, not smaller."""
    m = int(x.shape[0]) - order
    counts = np.zeros(65, dtype=np.int64)
    kernel = _load_residuals_kernel()
    if kernel is not None:
        low, nbelow = (int(v) for v in kernel[2](x, order, np.int64(base), w, counts))
        if nbelow < 0:
            return base, w, size
    else:
        # A cheap look first: a low one of 64 evenly spread residuals. If it is as far above the
        # minimum as the width spans, the minimum is an outlier; otherwise nothing is to be gained.
        step = m // 64
        if order == 0:
            sample = x[::step]
        elif order == 1:
            sample = x[1::step] - x[:m:step]
        else:
            sample = (x[2::step] - x[1 : m + 1 : step]) - (x[1 : m + 1 : step] - x[:m:step])
        ranked = np.sort(sample[:64])
        # a little below the third lowest (a second or third glitch may be among the 64; the rest of
        # the column reaches a little lower than 64 values do)
        low = max(base, int(ranked[2]) - (int(ranked[61]) - int(ranked[2])) // 4)
        if low - base < (1 << (w - 1)):
            return base, w, size
        d = x
        for _ in range(order):
            d = d[1:] - d[:-1]
        below = d < low
        nbelow = int(np.count_nonzero(below))
        counts += np.bincount(_bit_lengths((d[~below] - np.int64(low)).view(np.uint64)), minlength=65)
    above = (m - nbelow) - np.cumsum(counts)
    sizes = (m * np.arange(65) + 7) // 8 + (above + nbelow) * _EXC_ENTRY
    best_w = int(np.argmin(sizes))
    if int(sizes[best_w]) < _LOW_OUTLIER_GAIN * size:
        return low, best_w, int(sizes[best_w])
    return base, w, size


def _residuals(x: I64, order: int, base: int, g: int, w: int) -> tuple[U64, npt.NDArray[np.int64]]:
    """The residuals at ``order`` as stored (minus ``base``, divided by ``g``) and the positions of
    those wider than ``w`` bits (the exceptions). One compiled pass when numba is there; the numpy
    version computes the same integers (wrapping arithmetic either way)."""
    kernel = _load_residuals_kernel()
    if kernel is not None:
        u = np.empty(x.shape[0] - order, dtype=np.uint64)
        wide = kernel[0](x, order, np.int64(base), np.uint64(g), w, u)
        if wide == 0:
            return u, np.zeros(0, dtype=np.int64)
        return u, np.flatnonzero(u > np.uint64((1 << w) - 1))
    d = x
    for _ in range(order):
        d = d[1:] - d[:-1]
    u = (d - np.int64(base)).view(np.uint64)
    if g > 1:
        u = u // np.uint64(g)
    if w < 64 and u.size:
        return u, np.flatnonzero(u > np.uint64((1 << w) - 1))
    return u, np.zeros(0, dtype=np.int64)


@numba_kernels
def _load_residuals_kernel() -> Any:
    from fleetloop_shared.segment.codecs.compiled_loops import outlier_frame, residuals

    probe = np.array([5, 7, 9], dtype=np.int64)  # compile now
    residuals(probe, 1, np.int64(2), np.uint64(1), 2, np.empty(2, dtype=np.uint64))
    outlier_frame(np.arange(300, dtype=np.int64), 1, np.int64(-5), 20, np.zeros(65, dtype=np.int64))
    return (residuals, None, outlier_frame)


def _byte_planes(u: U64, base: int, g: int) -> bytes:
    """Residuals as byte planes (all low bytes, then all next bytes, ...), each zstd'd when smaller.

    Why: zstd's entropy stage sees each byte position's own distribution — the high planes of skewed or
    rarely changing data shrink to almost nothing — which the bit-packed layout hides from it.
    """
    top = int(u.max()) if u.size else 0
    nplanes = max(1, (top.bit_length() + 7) // 8)
    # all planes in one transposing copy (then each plane is contiguous)
    planes = np.ascontiguousarray(u.astype("<u8", copy=False).view(np.uint8).reshape(-1, 8)[:, :nplanes].T)
    parts = [_FOR.pack(base, g, PLANES, nplanes)]
    for j in range(nplanes):
        raw = planes[j].tobytes()
        packed = zstd_frames.compress(raw, level=zstd_frames.PLANE_LEVEL)
        if len(packed) < len(raw):
            parts += [_PLANE.pack(1, len(packed)), packed]
        else:
            parts += [_PLANE.pack(0, len(raw)), raw]
    return b"".join(parts)


def _read_planes(take: Any, m: int, nplanes: int) -> U64:
    if not 1 <= nplanes <= 8:
        raise StreamError(f"{nplanes} byte planes (1..8 allowed)")
    u = np.zeros(m, dtype=np.uint64)
    for j in range(nplanes):
        compressed, stored = _PLANE.unpack(take(_PLANE.size, f"byte plane {j} header"))
        payload = bytes(take(stored, f"byte plane {j}"))
        if compressed == 0:
            raw = payload
        elif compressed == 1:
            try:
                declared = zstd_frames.content_size(payload)
                if declared != m:
                    raise StreamError(f"zstd frame declares {declared} bytes, expected {m}")
                raw = zstd_frames.decompress_at_most(payload, m, allow_extra_data=True)
            except StreamError as exc:
                raise StreamError(f"byte plane {j}: {exc}") from None
        else:
            raise StreamError(f"byte plane {j}: unknown plane coding {compressed}")
        if len(raw) != m:
            raise StreamError(f"byte plane {j} holds {len(raw)} bytes, expected {m}")
        u |= np.frombuffer(raw, dtype=np.uint8).astype(np.uint64) << np.uint64(8 * j)
    return u


def decode(data: bytes | memoryview, pos: int, expected_count: int) -> tuple[I64, int]:
    """Decode one stream starting at ``pos``; returns the values and the position after the stream.

    Every field is checked against ``expected_count`` and the bytes present before anything is sized.
    """
    buf = memoryview(data)
    end = len(buf)

    def take(k: int, what: str) -> memoryview:
        nonlocal pos
        if pos + k > end:
            raise StreamError(f"integer stream truncated in {what}")
        chunk = buf[pos : pos + k]
        pos += k
        return chunk

    order, count = _HEAD.unpack(take(_HEAD.size, "header"))
    if count != expected_count:
        raise StreamError(f"integer stream holds {count} values, expected {expected_count}")
    if order > MAX_ORDER or order > count:
        raise StreamError(f"integer stream order {order} impossible for {count} values")
    heads = [_I64.unpack(take(_I64.size, "leading values"))[0] for _ in range(order)]
    base, g, w, nexc = _FOR.unpack(take(_FOR.size, "frame of reference"))
    m = count - order
    if g == 0:
        raise StreamError("divisor 0")
    if w == PLANES:
        u = _read_planes(take, m, nexc)
        return _finish(u, g, base, heads), pos
    if w > 64:
        raise StreamError(f"bit width {w} > 64")
    if g == 0:
        raise StreamError("divisor 0")
    if nexc > m or (w == 64 and nexc):
        raise StreamError(f"{nexc} exceptions for {m} residuals at width {w}")
    packed = take(bitpack.packed_size(m, w), "packed residuals")
    u = bitpack.unpack(bytes(packed), m, w)
    if nexc:
        positions = np.frombuffer(take(4 * nexc, "exception positions"), dtype="<u4").astype(np.int64)
        values = np.frombuffer(take(8 * nexc, "exception values"), dtype="<u8").astype(np.uint64)
        if (positions >= m).any() or (nexc > 1 and (np.diff(positions) <= 0).any()):
            raise StreamError("exception positions out of range or not increasing")
        u = u.copy() if not u.flags.writeable else u
        u[positions] = values
    return _finish(u, g, base, heads), pos


def _finish(u: U64, g: int, base: int, heads: list[int]) -> I64:
    """Residuals back to values: times the divisor, plus the base, then undo each difference."""
    with np.errstate(over="ignore"):
        y = (u * np.uint64(g) + np.uint64(base & 0xFFFFFFFFFFFFFFFF)).view(np.int64)
    for h in reversed(heads):
        out = np.empty(y.shape[0] + 1, dtype=np.int64)
        out[0] = h
        out[1:] = y
        y = np.cumsum(out, dtype=np.int64)
    return y
