"""FLDELTA2 in the cloud: whole-image matching, each output chunk by its smallest encoding.

Why: FLDELTA1 diffed each chunk of the new image against a window of the old one "around the same
relative position", which holds when a release changes a little in place and fails when code moves (a
library rebuilt with another toolchain, sections reordered, an image that grows or shrinks). Bounded
memory on the device never required a bounded *search*: the device reads its old slot at any offset
(:mod:`fleetloop_shared.update.fldelta2_apply`, which also documents the container).

How: one suffix array over the whole old image (:class:`~fleetloop_shared.update.suffix_diff.OldIndex`,
libdivsufsort; ~5 bytes per old byte, the largest part of the cloud's memory) and bsdiff's search (the
numba kernel) give, per output chunk of the new image, bsdiff's tuples against *all* of the old image.
The chunk is then written as the smallest of:

- ``streams``: those tuples as separately compressed streams (seeks, copy lengths, add lengths as
  varints — far smaller than bsdiff's 8-byte words —, the diff, plain or as runs of zeros and the bytes
  between them, and the extra bytes), each stored, bzip2 or LZMA2 (:func:`_pack_stream`);
- ``zstd-patch``: zstd level 19 with a raw dictionary of old regions — the whole old image when it fits
  :data:`MAX_DICT`, else the 64 KiB blocks the tuples copy from most —: small enough for the device to
  hold (zstd's decoder needs its whole dictionary in memory), and on the benchmark pairs as small as
  zstd-19 with the whole old file as dictionary;
- ``zstd``: the chunk alone at level 19.

The expensive encodings (zstd-19, LZMA2 on a large extra stream) are paid for only where they are
likely to win: each candidate is first made cheaply (bzip2 / small LZMA2 streams; zstd level 1 / 3), and
the expensive form is made only when the cheap size times its typical gain (measured on the benchmark
pairs, constants below) beats the best so far by :data:`_WORTH`. Without numba or pydivsufsort the
tuples come from ``bsdiff4.core.diff`` against a window of the old image around the chunk's relative
position (FLDELTA1's search, FLDELTA2's container).
"""

from __future__ import annotations

import bz2
import io
import lzma
from collections.abc import Callable
from typing import BinaryIO, Protocol

import bsdiff4
import numpy as np
import numpy.typing as npt
import zstandard

from fleetloop_shared.errors import IntegrityError, UserError
from fleetloop_shared.update.delta_format import FLDELTA2, HEADER, DeltaStats
from fleetloop_shared.update.fldelta2_apply import (
    CHUNK,
    MAGIC,
    MAX_CHUNK,
    MAX_DICT,
    METHOD_NAMES,
    METHOD_STREAMS,
    METHOD_ZSTD,
    METHOD_ZSTD_PATCH,
    REGION,
    REGION_COUNT,
    STREAM,
    STREAMS,
    max_body,
)
from fleetloop_shared.update.inflate import CODEC_BZIP2, CODEC_LZMA2, CODEC_STORED, lzma_filters

I64 = npt.NDArray[np.int64]
DEFAULT_CHUNK = MAX_CHUNK
#: zstd level of the whole-chunk candidates.
ZSTD_LEVEL = 19
#: Old regions are chosen for a patch-from dictionary in blocks of this size.
_BLOCK = 1 << 16
#: Typical size of the expensive form over the cheap one, measured on the benchmark pairs
#: (benchmarks/delta.py): zstd-19 patch-from over level 1 with a large hash table 0.60-1.05, median 0.78;
#: zstd-19 over level 3 on a lone chunk 0.74-0.89; LZMA2 over bzip2 on the extra stream (new code)
#: 0.69-0.89, median 0.8.
_PATCH_GAIN = 0.78
_PLAIN_GAIN = 0.82
_REFINE_GAIN = 0.8
#: An expensive form is made only if its expected size is below this fraction of the best so far.
_WORTH = 0.97
#: An extra stream longer than this gets LZMA2 only when the chunk is refined.
_DEEP_EXTRA = 1 << 20
_LZMA_PRESET = 9 | lzma.PRESET_EXTREME
#: Without the kernel: the old window around a chunk's relative position (FLDELTA1's search).
_FALLBACK_MARGIN = 512 << 10


class _Matcher(Protocol):
    def tuples(self, start: int, data: bytes) -> tuple[I64, bytes, bytes]:
        """``(seek, copy, add)`` tuples for the new bytes ``data`` found at ``start`` of the new image,
        with their diff and extra bytes."""
        ...


def _seek_first(xyz: I64, base: int = 0) -> I64:
    """bsdiff's ``(x, y, z)`` (seek after) as FLDELTA2's ``(seek, x, y)`` (seek before), starting from
    old position ``base``; tuples that build nothing are folded into the next one's seek."""
    if not len(xyz):
        return np.zeros((0, 3), dtype=np.int64)
    x, y = xyz[:, 0], xyz[:, 1]
    seeks = np.concatenate([np.array([base], dtype=np.int64), xyz[:-1, 2]])
    keep = (x + y) > 0
    if not keep.all():
        total = np.cumsum(seeks)
        kept = np.flatnonzero(keep)
        before = np.concatenate([np.zeros(1, dtype=np.int64), total[kept[:-1]]])
        seeks = total[kept] - before
        x, y = x[kept], y[kept]
    return np.stack([seeks, x, y], axis=1)


class _IndexMatcher:
    """bsdiff's search against the whole old image (suffix array built once)."""

    def __init__(self, old: bytes) -> None:
        from fleetloop_shared.update import suffix_diff

        self._diff = suffix_diff.diff_tuples
        self._index = suffix_diff.OldIndex(old)

    def tuples(self, start: int, data: bytes) -> tuple[I64, bytes, bytes]:
        xyz, diff, extra = self._diff(self._index, data)
        return _seek_first(xyz), diff, extra


class _WindowMatcher:
    """``bsdiff4.core.diff`` against the old window around the chunk's relative position."""

    def __init__(self, old: bytes, new_size: int) -> None:
        self._old = old
        self._new_size = new_size

    def tuples(self, start: int, data: bytes) -> tuple[I64, bytes, bytes]:
        from fleetloop_shared.update.suffix_diff import control_tuples

        center = start * len(self._old) // self._new_size if self._new_size else 0
        lo = max(0, center - _FALLBACK_MARGIN)
        hi = min(len(self._old), center + len(data) + _FALLBACK_MARGIN)
        control, diff, extra = bsdiff4.core.diff(self._old[lo:hi], data)
        return _seek_first(control_tuples(control), lo), diff, extra


def varints(values: npt.NDArray[np.uint64]) -> bytes:
    """LEB128 of each value (7 bits a byte, high bit = more follows), vectorised."""
    if not len(values):
        return b""
    v = values.astype(np.uint64)
    sizes = np.ones(len(v), dtype=np.int64)
    rest = v >> np.uint64(7)
    while rest.any():
        sizes += rest != 0
        rest >>= np.uint64(7)
    width = int(sizes.max())
    table = np.empty((len(v), width), dtype=np.uint8)
    for k in range(width):
        low = ((v >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
        table[:, k] = low | ((k < sizes - 1).astype(np.uint8) << 7)
    used = np.arange(width)[None, :] < sizes[:, None]
    return table[used].tobytes()


def _zigzag(values: I64) -> npt.NDArray[np.uint64]:
    return ((values << 1) ^ (values >> 63)).astype(np.uint64)


def _pack_stream(raw: bytes, deep: bool) -> tuple[int, bytes]:
    """The smaller of stored and LZMA2 (``deep``) or bzip2 with 100 kB blocks.

    Measured on the benchmark pairs: LZMA2 wins every number stream, every sparse diff and every extra
    stream over bzip2, but costs seconds on millions of zeros, where bzip2's small blocks are as small
    (the plain diff; FLDELTA1's finding too) and larger blocks are no smaller.
    """
    if len(raw) <= 64:
        return CODEC_STORED, raw
    if deep:
        filters = [dict(lzma_filters(len(raw))[0], preset=_LZMA_PRESET)]
        packed = (CODEC_LZMA2, lzma.compress(raw, format=lzma.FORMAT_RAW, filters=filters))
    else:
        packed = (CODEC_BZIP2, bz2.compress(raw, 1))
    return packed if len(packed[1]) < len(raw) else (CODEC_STORED, raw)


def sparse(diff: bytes) -> tuple[bytes, bytes]:
    """A diff as runs alternately of zeros and of other bytes (varints, zeros first) and those bytes."""
    if not diff:
        return b"", b""
    a = np.frombuffer(diff, dtype=np.uint8)
    nonzero = a != 0
    edges = np.flatnonzero(nonzero[1:] != nonzero[:-1]) + 1
    runs = np.diff(np.concatenate([[0], edges, [len(a)]]))
    if nonzero[0]:
        runs = np.concatenate([[0], runs])
    return varints(runs.astype(np.uint64)), a[nonzero].tobytes()


def _packed(raw: bytes, deep: bool) -> tuple[int, bytes, int]:
    """``(codec, packed bytes, raw length)`` of one stream."""
    codec, data = _pack_stream(raw, deep)
    return codec, data, len(raw)


class _Streams:
    """One chunk's tuples and bytes as the six streams of a streams body, each packed its best way.

    Numbers (small) and the sparse form of the diff go through LZMA2 at once; the diff as it is only
    through bzip2 (LZMA2 on millions of zeros costs seconds and gains nothing over the sparse form);
    the extra stream through LZMA2 when it is under :data:`_DEEP_EXTRA`, else only when refined (it is
    new code: when it is large, a zstd candidate usually wins the chunk anyway).
    """

    def __init__(self, tuples: I64, diff: bytes, extra: bytes) -> None:
        self.count = len(tuples)
        numbers = (_zigzag(tuples[:, 0]), tuples[:, 1].astype(np.uint64), tuples[:, 2].astype(np.uint64))
        self.numbers = [_packed(varints(v), True) for v in numbers]
        plain = _packed(diff, False)
        runs, literal = sparse(diff)
        packed_runs, packed_literal = _packed(runs, True), _packed(literal, True)
        if len(plain[1]) <= len(packed_runs[1]) + len(packed_literal[1]):
            self.diff = [(CODEC_STORED, b"", 0), plain]
        else:
            self.diff = [packed_runs, packed_literal]
        self.extra_raw = extra
        self.extra = _packed(extra, len(extra) <= _DEEP_EXTRA)

    def body(self) -> bytes:
        parts = [*self.numbers, *self.diff, self.extra]
        head = STREAMS.pack(self.count) + b"".join(STREAM.pack(c, raw, len(d)) for c, d, raw in parts)
        return head + b"".join(d for _, d, _ in parts)

    def refinable(self) -> bool:
        return self.extra[0] != CODEC_LZMA2 and len(self.extra_raw) > _DEEP_EXTRA

    def refined(self) -> bytes:
        self.extra = _packed(self.extra_raw, True)
        return self.body()


def dictionary_regions(tuples: I64, old_size: int, budget: int = MAX_DICT) -> list[tuple[int, int]]:
    """The old regions a chunk's copies read most, as a patch-from dictionary of at most ``budget``.

    An old image within the budget is the dictionary whole. Otherwise old 64 KiB blocks are ranked by how
    many bytes the tuples copy from them; the best blocks up to the budget are kept and merged into
    regions in old-image order.
    """
    if not len(tuples) or old_size == 0:
        return []
    if old_size <= budget:  # the whole old image fits: zstd finds what the tuples did not
        return [(0, old_size)]
    seeks, x = tuples[:, 0], tuples[:, 1]
    starts = np.cumsum(seeks) + np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(x)[:-1]])
    copied = x > 0
    starts, x = starts[copied], x[copied]
    blocks = (old_size + _BLOCK - 1) // _BLOCK
    score = np.zeros(blocks, dtype=np.int64)
    first = starts // _BLOCK
    head = np.minimum(x, (first + 1) * _BLOCK - starts)
    np.add.at(score, first, head)
    for s, n in zip(starts[x > head].tolist(), x[x > head].tolist(), strict=True):  # copies across blocks
        end = s + n
        for b in range(s // _BLOCK + 1, (end - 1) // _BLOCK + 1):
            score[b] += min(end, (b + 1) * _BLOCK) - b * _BLOCK
    ranked = np.argsort(-score, kind="stable")[: budget // _BLOCK]
    chosen = np.sort(ranked[score[ranked] > 0])
    regions: list[tuple[int, int]] = []
    for b in chosen.tolist():
        lo, hi = b * _BLOCK, min(old_size, (b + 1) * _BLOCK)
        if regions and regions[-1][0] + regions[-1][1] == lo:
            regions[-1] = (regions[-1][0], regions[-1][1] + hi - lo)
        else:
            regions.append((lo, hi - lo))
    return regions


def _zstd(data: bytes, dictionary: bytes = b"", level: int = ZSTD_LEVEL, **overrides: int) -> bytes:
    """One zstd frame (content size declared) whose window covers the dictionary and the data.

    Made through zstd's streaming entry point: with a large raw dictionary it loads the dictionary into
    the match finder as the one-shot call does not, and the patches are smaller (on the benchmark
    pairs 0.01-4.4 % smaller, in the same time).
    """
    overrides.setdefault("window_log", max(10, (len(dictionary) + len(data) - 1).bit_length()))
    params = zstandard.ZstdCompressionParameters.from_level(
        level, source_size=len(data), dict_size=len(dictionary), **overrides
    )
    d = (
        zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        if dictionary
        else None
    )
    out = io.BytesIO()
    with zstandard.ZstdCompressor(dict_data=d, compression_params=params).stream_writer(
        out, size=len(data), closefd=False
    ) as writer:
        writer.write(data)
    return out.getvalue()


def _patch_from_estimate(data: bytes, dictionary: bytes) -> int:
    """A cheap stand-in for zstd-19 patch-from: level 1 with a hash table large enough to keep a
    multi-MB dictionary (level 1's default table misses nearly every match)."""
    hash_log = max(20, min(24, len(dictionary).bit_length() - 3))
    return len(_zstd(data, dictionary, 1, hash_log=hash_log))


def _encode_chunk(old: bytes, start: int, data: bytes, matcher: _Matcher | None) -> tuple[int, bytes]:
    """The smallest encoding of ``data`` (the new image from ``start``), paying only for likely winners."""
    made: list[tuple[int, bytes]] = []
    pending: list[tuple[float, int, Callable[[], bytes]]] = []  # (expected size, method, make)
    if matcher is not None:
        tuples, diff, extra = matcher.tuples(start, data)
        streams = _Streams(tuples, diff, extra)
        made.append((METHOD_STREAMS, streams.body()))
        if streams.refinable():
            gain = len(streams.extra[1]) * (1 - _REFINE_GAIN)
            pending.append((len(made[0][1]) - gain, METHOD_STREAMS, streams.refined))
        regions = dictionary_regions(tuples, len(old))
        if regions:
            dictionary = b"".join(old[a : a + n] for a, n in regions)
            table = REGION_COUNT.pack(len(regions)) + b"".join(REGION.pack(a, n) for a, n in regions)
            pending.append(
                (
                    _patch_from_estimate(data, dictionary) * _PATCH_GAIN + len(table),
                    METHOD_ZSTD_PATCH,
                    lambda: table + _zstd(data, dictionary),
                )
            )
    cheap = _zstd(data, level=3)
    made.append((METHOD_ZSTD, cheap))
    pending.append((len(cheap) * _PLAIN_GAIN, METHOD_ZSTD, lambda: _zstd(data)))
    for expected, method, make in sorted(pending, key=lambda p: p[0]):
        best = min(len(body) for _, body in made)
        if expected < _WORTH * best or matcher is None:
            made.append((method, make()))
    fits = [(m, b) for m, b in made if len(b) <= max_body(len(data))]
    return min(fits, key=lambda mb: len(mb[1]))  # ties: the earlier (streams, then zstd)


def encode(
    old: bytes,
    new: BinaryIO,
    new_size: int,
    out: BinaryIO,
    *,
    chunk: int = DEFAULT_CHUNK,
    accelerate: bool = True,
) -> DeltaStats:
    """Write the FLDELTA2 delta from ``old`` (in memory: it is indexed whole) to ``new`` into ``out``.

    Memory: the old image, its suffix array (4 bytes per old byte) and one chunk's work — under 10× the
    old image. ``accelerate=False`` searches with ``bsdiff4.core.diff`` in windows even where the
    suffix_diff kernel could run (tests compare both; the patches apply the same way).
    """
    if not 0 < chunk <= MAX_CHUNK:
        raise UserError(f"delta chunk {chunk}: need 0 < chunk ≤ {MAX_CHUNK}")
    if len(old) >= 1 << 31:
        raise UserError(f"old image of {len(old)} bytes: deltas are made from images under 2 GiB")
    matcher: _Matcher | None = None
    if old:
        from fleetloop_shared.update import suffix_diff

        if accelerate and suffix_diff.available():
            matcher = _IndexMatcher(old)
        else:
            matcher = _WindowMatcher(old, new_size)
    count = (new_size + chunk - 1) // chunk
    out.write(HEADER.pack(MAGIC, new_size, len(old), chunk, count))
    stats = DeltaStats(format=FLDELTA2, bytes=HEADER.size, new_bytes=new_size, chunks=count)
    for i in range(count):
        want = min(chunk, new_size - i * chunk)
        data = new.read(want)
        if len(data) != want:
            raise IntegrityError("the new image changed size while the delta was being made")
        method, body = _encode_chunk(old, i * chunk, data, matcher)
        out.write(CHUNK.pack(method, len(data), len(body)))
        out.write(body)
        stats.bytes += CHUNK.size + len(body)
        stats.count(METHOD_NAMES[method])
    if new.read(1):
        raise IntegrityError("the new image changed size while the delta was being made")
    return stats
