"""FLDELTA1: the first delta container, chunk by chunk against a window of the old image.

Devices whose agent reads only this format still get it (the cloud builds it for them; FLDELTA2,
:mod:`fleetloop_shared.update.fldelta2`, is what current agents read). What follows is its design.

A new firmware image mostly repeats the old one, so a delta is a few percent of the image — what makes
fleet updates affordable on metered links. Whole-file bsdiff4 makes the smallest patches but needs ~17×
the old image in RAM to diff and holds old + new in memory to apply; zstd "patch-from" is fast but needs
the whole old image as its window. So the image is cut into chunks: each chunk of the new image is encoded
against a *window* of the old image around the same relative position, by whichever of three methods is
smallest for that chunk:

- ``zstd``: the chunk compressed on its own (the "full zstd" candidate, never worse than the raw chunk);
- ``zstd-patch``: zstd at level ≥ 12 with the old window as a raw-content dictionary (patch-from);
- ``bsdiff4``: bsdiff's control/diff/extra streams, each compressed with the smaller of bzip2-9 and zstd
  (bzip2's BWT wins on the mostly-zero diff stream of a patch release, zstd on new code in the extra
  stream). The streams come from :mod:`fleetloop_shared.update.suffix_diff` (libdivsufsort + a numba kernel,
  ~10× faster than bsdiff4's qsufsort) when numba and pydivsufsort are installed (the ``cloud`` extra),
  else from ``bsdiff4.core.diff``; both are bsdiff's format, applied by ``bsdiff4.core.patch``.

Making a delta is the cloud's cost per release and base version, so candidates that cannot win are not
paid for in full: each zstd candidate is first estimated at a cheap level and made at its real level only
if the estimate could beat the best so far (:func:`_encode_chunk`).

Container ``FLDELTA1`` (all integers little-endian)::

    magic "FLDELTA1" | new_size u64 | old_size u64 | chunk_size u32 | chunk_count u32
    per chunk: method u8 | window_start u64 | window_len u32 | out_len u32 | body_len u32 | body
    bsdiff4 body: 3 × codec u8 | control_len u32 | diff_len u32 | extra_len u32 | control diff extra
                  (codec 0 = zstd, 1 = bzip2; each stream compressed on its own)

Applying needs one old window, one output chunk and its decoded streams at a time: bounded by
``chunk_size`` (default 4 MiB) and ``margin`` (512 KiB), not by the image. Patches arrive from the network:
every length is checked against those bounds and every decompression is bounded before bsdiff4 or zstd
sees anything, so garbage raises :class:`IntegrityError` ("delta is malformed: ..."), never another
exception. bsdiff4 is imported only here and by suffix_diff (to check its own output); zstandard errors
are mapped here too.
"""

from __future__ import annotations

import bz2
import struct
from collections.abc import Callable
from typing import BinaryIO

import bsdiff4  # bsdiff4.core: the raw control/diff/extra streams, no bzip2
import zstandard

from fleetloop_shared.errors import IntegrityError, UserError
from fleetloop_shared.update.delta_format import (
    FLDELTA1,
    HEADER,
    ChunkedContainer,
    DeltaStats,
    read_exact,
)
from fleetloop_shared.update.inflate import unbzip2, unzstd

DEFAULT_CHUNK = 4 << 20
DEFAULT_MARGIN = 512 << 10
#: Hard bounds a patch may ask for (hostile-input limits; the window is chunk + 2 margins at most).
MAX_CHUNK = 16 << 20
MAX_WINDOW = 3 * MAX_CHUNK
#: zstd level of the whole-chunk candidates (plain and patch-from). Patch-from needs ≥ 12 or zstd ignores
#: a large raw dictionary; on real binaries 12 is as small as 19 with the window as dictionary and 10-15×
#: faster (benchmarks/delta.py), and bsdiff usually wins those chunks anyway.
ZSTD_LEVEL = 12
#: zstd levels for bsdiff's control and extra streams, each against bzip2-9 (the smaller is kept; the
#: diff stream: :func:`_diff_stream`). Measured on the numpy pairs (benchmarks/delta.py): control
#: compresses best with bzip2, zstd ≥ 12 adds nothing; the extra stream (new code) gains 15 % from zstd
#: level 12 to 16 and nothing past 16.
_CONTROL_STREAM_LEVEL = 12
_EXTRA_STREAM_LEVEL = 16
#: The most a candidate's expensive level is assumed to gain over its cheap estimate (a ratio < 1): the
#: expensive level runs only when ``estimate × gain`` would beat the best so far.
_PLAIN_GAIN = 0.75
_PATCH_FROM_GAIN = 0.75
_PATCH_FROM_9_GAIN = 0.92

METHOD_ZSTD = 0
METHOD_ZSTD_PATCH = 1
METHOD_BSDIFF = 2
METHOD_NAMES = {METHOD_ZSTD: "zstd", METHOD_ZSTD_PATCH: "zstd-patch", METHOD_BSDIFF: "bsdiff4"}

MAGIC = b"FLDELTA1"
_CHUNK = struct.Struct("<BQIII")
_BSDIFF = struct.Struct("<BBBIII")
_CODEC_ZSTD = 0
_CODEC_BZIP2 = 1
_CONTROL_TUPLE = 24
#: Largest zstd window an FLDELTA1 frame may declare (a window of 3 × 16 MiB plus its chunk).
_V1_WINDOW = 1 << 27


def _window(index: int, chunk: int, margin: int, old_size: int, new_size: int) -> tuple[int, int]:
    """The old range a new chunk is diffed against: same relative position, widened by ``margin``."""
    start = index * chunk
    center = start * old_size // new_size if new_size else 0
    lo = max(0, center - margin)
    hi = min(old_size, center + chunk + margin)
    return lo, max(0, hi - lo)


def _zstd(data: bytes, dictionary: bytes | None = None, level: int = ZSTD_LEVEL) -> bytes:
    if dictionary:
        d = zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        params = zstandard.ZstdCompressionParameters.from_level(
            level, window_log=max(20, (len(dictionary) + len(data)).bit_length())
        )
        return zstandard.ZstdCompressor(dict_data=d, compression_params=params).compress(data)
    return zstandard.ZstdCompressor(level=level).compress(data)


def _patch_from_estimate(chunk: bytes, window: bytes) -> int:
    """A cheap stand-in for the size of ``chunk`` as zstd patch-from against ``window``.

    Level 1 (one hash probe per position) with a hash table of ~1/8 entry per window byte: ~3× cheaper
    than level 9 and, on the numpy pairs, 0.97-1.17× the level-12 size (level 1's default table is too
    small to keep a multi-MB window: it misses nearly every match).
    """
    d = zstandard.ZstdCompressionDict(window, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    params = zstandard.ZstdCompressionParameters.from_level(
        1,
        window_log=max(20, (len(window) + len(chunk)).bit_length()),
        hash_log=max(20, min(24, len(window).bit_length() - 3)),
    )
    return len(zstandard.ZstdCompressor(dict_data=d, compression_params=params).compress(chunk))


def _smallest_stream(data: bytes, zstd_level: int) -> tuple[int, bytes]:
    """``data`` as the smaller of bzip2-9 and zstd at ``zstd_level`` (the codec byte tells the device)."""
    z = _zstd(data, level=zstd_level)
    b = bz2.compress(data, 9)
    return (_CODEC_BZIP2, b) if len(b) < len(z) else (_CODEC_ZSTD, z)


def _diff_stream(data: bytes) -> tuple[int, bytes]:
    """bsdiff's diff stream (chunk-sized, mostly zeros): bzip2 with 100 kB blocks, nothing else.

    Measured on the numpy pairs (benchmarks/delta.py): bzip2-1 is within 0.5 % of the per-chunk smallest
    of {bzip2-1, bzip2-9, zstd-12} on both, and 4 % larger than zstd-19 on the minor release, but zstd-19
    costs ~0.3 s per 4 MiB, as much as the suffix-sorted diff itself. Small blocks also keep the device's
    bzip2 decoder small.
    """
    return _CODEC_BZIP2, bz2.compress(data, 1)


def _bsdiff_streams(window: bytes, chunk: bytes, accelerate: bool) -> tuple[bytes, bytes, bytes]:
    """bsdiff's raw control/diff/extra streams: the suffix_diff kernel when it can run, else bsdiff4's.

    Both produce the format ``bsdiff4.core.patch`` applies; the kernel is ~10× faster (libdivsufsort
    instead of qsufsort), the fallback needs nothing beyond the base dependencies.
    """
    if accelerate:
        from fleetloop_shared.update import suffix_diff

        if suffix_diff.available():
            return suffix_diff.diff(window, chunk)
    control, diff, extra = bsdiff4.core.diff(window, chunk)
    return control, diff, extra


def _encode_chunk(window: bytes, chunk: bytes, accelerate: bool = True) -> tuple[int, bytes]:
    """The smallest of the three encodings of ``chunk`` against ``window``, without paying for losers.

    bsdiff is computed first (it wins almost every chunk of a real firmware pair). Each zstd candidate
    is then first estimated cheaply (plain: level 3; patch-from: :func:`_patch_from_estimate`, then
    level 9 if that was close); its level-12 encoding is made only if the estimate, scaled by how much
    level 12 can plausibly gain over it, could beat the best so far. On the numpy pairs of
    benchmarks/delta.py level 12 is 0.91-0.93× the plain estimate and 0.86-1.03× / 0.96-1.0× the two
    patch-from ones; the factors leave room.
    """
    candidates: list[tuple[int, bytes]] = []
    if window:
        control, diff, extra = _bsdiff_streams(window, chunk, accelerate)
        coded = [
            _smallest_stream(control, _CONTROL_STREAM_LEVEL),
            _diff_stream(diff),
            _smallest_stream(extra, _EXTRA_STREAM_LEVEL),
        ]
        streams = [data for _, data in coded]
        body = _BSDIFF.pack(*(c for c, _ in coded), *(len(x) for x in streams)) + b"".join(streams)
        candidates.append((METHOD_BSDIFF, body))

    def best() -> int:
        return min((len(data) for _, data in candidates), default=1 << 62)

    cheap = _zstd(chunk, level=3)
    candidates.append((METHOD_ZSTD, cheap))
    if len(cheap) * _PLAIN_GAIN < best() or not window:
        candidates.append((METHOD_ZSTD, _zstd(chunk)))
    if window and _patch_from_estimate(chunk, window) * _PATCH_FROM_GAIN < best():
        closer = _zstd(chunk, window, level=9)  # a third of level 12's time, within 4 % of its size
        candidates.append((METHOD_ZSTD_PATCH, closer))
        if len(closer) * _PATCH_FROM_9_GAIN < best():
            candidates.append((METHOD_ZSTD_PATCH, _zstd(chunk, window)))
    # ties go to the earlier candidate: bsdiff, then plain, then patch-from
    return min(candidates, key=lambda c: len(c[1]))


def encode(
    old: BinaryIO,
    old_size: int,
    new: BinaryIO,
    new_size: int,
    out: BinaryIO,
    *,
    chunk: int = DEFAULT_CHUNK,
    margin: int = DEFAULT_MARGIN,
    accelerate: bool = True,
) -> DeltaStats:
    """Write a delta from ``old`` to ``new`` into ``out``; memory grows with chunk + 2·margin, not the image.

    (Peak ~200 MB at the defaults with the kernel, of which ~130 MB is loading numpy and numba; the same
    for a 10 MB and a 36 MB image: benchmarks/delta.py.)

    ``accelerate=False`` makes bsdiff's streams with ``bsdiff4.core.diff`` even where the suffix_diff
    kernel could run (tests compare both; the patches apply the same way).
    """
    if not 0 < chunk <= MAX_CHUNK or not 0 <= margin <= chunk:
        raise UserError(
            f"delta chunk {chunk} / margin {margin}: need 0 < chunk ≤ {MAX_CHUNK}, margin ≤ chunk"
        )
    count = (new_size + chunk - 1) // chunk
    out.write(HEADER.pack(MAGIC, new_size, old_size, chunk, count))
    stats = DeltaStats(format=FLDELTA1, bytes=HEADER.size, new_bytes=new_size, chunks=count)
    for i in range(count):
        data = new.read(min(chunk, new_size - i * chunk))
        lo, length = _window(i, chunk, margin, old_size, new_size)
        old.seek(lo)
        window = old.read(length)
        if len(window) != length or len(data) != min(chunk, new_size - i * chunk):
            raise IntegrityError("an input file changed size while the delta was being made")
        method, body = _encode_chunk(window, data, accelerate)
        out.write(_CHUNK.pack(method, lo, length, len(data), len(body)))
        out.write(body)
        stats.bytes += _CHUNK.size + len(body)
        stats.count(METHOD_NAMES[method])
    return stats


# ----------------------------------------------------------------------------------------- applying


def _unstream(codec: int, body: bytes, limit: int, what: str) -> bytes:
    if codec == _CODEC_ZSTD:
        return unzstd(body, limit, what, window=_V1_WINDOW)
    if codec == _CODEC_BZIP2:
        return unbzip2(body, limit, what)
    raise IntegrityError(f"delta is malformed: {what} has unknown codec {codec}")


def _offtin(raw: bytes) -> int:
    value = int.from_bytes(raw, "little") & ~(1 << 63)
    return -value if raw[7] & 0x80 else value


def _check_control(control: bytes, window_len: int, out_len: int, diff_len: int, extra_len: int) -> None:
    """Walk bsdiff's control tuples and prove they stay inside the buffers before C code runs them."""
    if len(control) % _CONTROL_TUPLE:
        raise IntegrityError("delta is malformed: bsdiff control is not a whole number of tuples")
    new_pos = old_pos = diff_pos = extra_pos = 0
    for off in range(0, len(control), _CONTROL_TUPLE):
        x = _offtin(control[off : off + 8])
        y = _offtin(control[off + 8 : off + 16])
        z = _offtin(control[off + 16 : off + 24])
        if x < 0 or y < 0 or new_pos + x + y > out_len:
            raise IntegrityError("delta is malformed: bsdiff control writes past the chunk")
        if old_pos < 0 or old_pos + x > window_len:
            raise IntegrityError("delta is malformed: bsdiff control reads outside the old window")
        diff_pos += x
        extra_pos += y
        if diff_pos > diff_len or extra_pos > extra_len:
            raise IntegrityError("delta is malformed: bsdiff control reads past its streams")
        new_pos += x + y
        old_pos += x + z
    if new_pos != out_len:
        raise IntegrityError(f"delta is malformed: bsdiff control builds {new_pos} of {out_len} bytes")


def _decode_chunk(method: int, body: bytes, window: bytes, out_len: int) -> bytes:
    if method == METHOD_ZSTD:
        data = unzstd(body, out_len, "zstd chunk", window=_V1_WINDOW)
    elif method == METHOD_ZSTD_PATCH:
        if not window:
            raise IntegrityError("delta is malformed: zstd-patch chunk without an old window")
        data = unzstd(body, out_len, "zstd-patch chunk", window, window=_V1_WINDOW)
    elif method == METHOD_BSDIFF:
        if len(body) < _BSDIFF.size:
            raise IntegrityError("delta is malformed: bsdiff chunk shorter than its header")
        *codecs, len_c, len_d, len_e = _BSDIFF.unpack_from(body)
        if _BSDIFF.size + len_c + len_d + len_e != len(body):
            raise IntegrityError("delta is malformed: bsdiff stream lengths do not add up")
        a = _BSDIFF.size
        b = a + len_c
        c = b + len_d
        control = _unstream(codecs[0], body[a:b], _CONTROL_TUPLE * (out_len + 1), "bsdiff control")
        diff = _unstream(codecs[1], body[b:c], out_len, "bsdiff diff")
        extra = _unstream(codecs[2], body[c:], out_len, "bsdiff extra")
        _check_control(control, len(window), out_len, len(diff), len(extra))
        try:
            data = bytes(bsdiff4.core.patch(window, out_len, control, diff, extra))
        except (ValueError, OverflowError, MemoryError, TypeError) as exc:
            raise IntegrityError(f"delta is malformed: {exc}") from None
    else:
        raise IntegrityError(f"delta is malformed: unknown chunk method {method}")
    if len(data) != out_len:
        raise IntegrityError(f"delta is malformed: chunk decodes to {len(data)} bytes, header says {out_len}")
    return data


def _apply_chunk(
    old: BinaryIO, old_size: int, patch: BinaryIO, write: Callable[[bytes], object], expected: int
) -> None:
    """One chunk: its old window and its streams, decoded into ``expected`` new bytes.

    Memory is one old window plus one chunk and its streams, whatever the image size.
    """
    method, lo, length, out_len, body_len = _CHUNK.unpack(read_exact(patch, _CHUNK.size, "chunk header"))
    if out_len != expected or length > MAX_WINDOW or lo + length > old_size:
        raise IntegrityError("delta is malformed: chunk header out of bounds")
    if body_len > out_len + (out_len >> 7) + (1 << 16):  # zstd alone is always a candidate
        raise IntegrityError(f"delta is malformed: chunk body of {body_len} bytes is impossible")
    body = read_exact(patch, body_len, "chunk body")
    old.seek(lo)
    window = old.read(length)
    if len(window) != length:
        raise IntegrityError("the installed image is shorter than the delta's window")
    write(_decode_chunk(method, body, window, out_len))


#: How a device reads an FLDELTA1 patch (``READER.decode``).
READER = ChunkedContainer(MAGIC, MAX_CHUNK, _apply_chunk)
