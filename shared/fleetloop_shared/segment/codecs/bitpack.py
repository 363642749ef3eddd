"""Fixed-width bit packing: the innermost loop of the integer codecs.

Layout (docs/segment-format.md, "Bit packing"): value ``i`` occupies bits ``i*w .. i*w+w-1`` of the
stream, least significant bit first, bytes little-endian; the last byte is zero-padded. ``w`` is 0..64.

Two implementations produce identical bytes: numba kernels (compiled on first use, cached on disk) for
speed, and pure numpy for machines without numba or where JIT is unwanted (``FLEETLOOP_NO_NUMBA=1``).
The tests compare them byte for byte.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from fleetloop_shared.segment.codecs.compiled import numba_kernels

U64 = npt.NDArray[np.uint64]


def packed_size(count: int, width: int) -> int:
    """Bytes that ``count`` values of ``width`` bits take."""
    return (count * width + 7) // 8


@numba_kernels
def _load_kernels() -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    """Compile (or load from cache) the numba kernels; ``None`` when numba is absent or disabled."""
    import numba

    @numba.njit(cache=True, nogil=True)
    def pack(values: Any, width: int, out: Any) -> None:  # pragma: no cover - compiled
        acc = np.uint64(0)
        nbits = 0
        pos = 0
        for i in range(values.shape[0]):
            v = values[i]
            if nbits == 0:
                acc = v
            else:
                acc |= v << np.uint64(nbits)
            total = nbits + width
            if total >= 64:
                for k in range(8):
                    out[pos + k] = np.uint8((acc >> np.uint64(8 * k)) & np.uint64(0xFF))
                pos += 8
                acc = np.uint64(0) if nbits == 0 else v >> np.uint64(64 - nbits)
                nbits = total - 64
            else:
                nbits = total
        k = 0
        while nbits > 0:
            out[pos + k] = np.uint8((acc >> np.uint64(8 * k)) & np.uint64(0xFF))
            k += 1
            nbits -= 8

    @numba.njit(cache=True, nogil=True)
    def unpack(data: Any, count: int, width: int, out: Any) -> None:  # pragma: no cover - compiled
        if width == 0:
            for i in range(count):
                out[i] = np.uint64(0)
            return
        mask = (
            np.uint64(0xFFFFFFFFFFFFFFFF)
            if width == 64
            else (np.uint64(1) << np.uint64(width)) - np.uint64(1)
        )
        nbytes = data.shape[0]
        bit = 0
        for i in range(count):
            byte = bit >> 3
            shift = bit & 7
            acc = np.uint64(0)
            # gather up to 9 bytes starting at byte
            need = (shift + width + 7) >> 3
            for k in range(min(need, 8)):
                if byte + k < nbytes:
                    acc |= np.uint64(data[byte + k]) << np.uint64(8 * k)
            v = acc >> np.uint64(shift)
            if need > 8 and byte + 8 < nbytes:
                v |= np.uint64(data[byte + 8]) << np.uint64(64 - shift)
            out[i] = v & mask
            bit += width

    # Compile (or load from the cache) now, on a tiny input, so that a numba or LLVM failure
    # (broken install, unwritable cache, unsupported CPU) means "use numpy", never a failed encode.
    probe = np.zeros(2, dtype=np.uint8)
    pack(np.array([1, 2], dtype=np.uint64), 3, probe)
    back = np.empty(2, dtype=np.uint64)
    unpack(probe, 2, 3, back)
    return (pack, unpack) if back.tolist() == [1, 2] else None


def pack(values: U64, width: int, *, use_numba: bool | None = None) -> bytes:
    """Pack ``values`` (each ``< 2**width``) at ``width`` bits each."""
    values = np.ascontiguousarray(values, dtype=np.uint64)
    n = int(values.shape[0])
    size = packed_size(n, width)
    if width == 0 or n == 0:
        return bytes(size)
    kernels = _load_kernels() if use_numba is not False else None
    if kernels is not None:
        out = np.zeros(size, dtype=np.uint8)
        kernels[0](values, width, out)
        return out.tobytes()
    # numpy: one bit per byte, then packbits (memory n*width bytes; segments are bounded).
    shifts = np.arange(width, dtype=np.uint64)
    bits = ((values[:, None] >> shifts[None, :]) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits.ravel(), bitorder="little").tobytes()


def unpack(data: bytes, count: int, width: int, *, use_numba: bool | None = None) -> U64:
    """Inverse of :func:`pack`; ``data`` must be exactly ``packed_size(count, width)`` bytes."""
    if len(data) != packed_size(count, width):
        raise ValueError(
            f"packed data is {len(data)} bytes, {count}×{width} bits need {packed_size(count, width)}"
        )
    if width == 0 or count == 0:
        return np.zeros(count, dtype=np.uint64)
    raw = np.frombuffer(data, dtype=np.uint8)
    kernels = _load_kernels() if use_numba is not False else None
    if kernels is not None:
        out = np.empty(count, dtype=np.uint64)
        kernels[1](raw, count, width, out)
        return out
    bits = np.unpackbits(raw, bitorder="little")[: count * width].reshape(count, width).astype(np.uint64)
    shifts = np.arange(width, dtype=np.uint64)
    result: U64 = np.bitwise_or.reduce(bits << shifts[None, :], axis=1).astype(np.uint64)
    return result


def have_numba() -> bool:
    """Whether the compiled kernels are in use (for benchmarks and diagnostics)."""
    return _load_kernels() is not None
