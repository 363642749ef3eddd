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
  between them, and the extra bytes), each stored, bzip2 or LZMA2 (:func:`_pack_stream`); copies too
  short to pay for their tuple become extra bytes (:func:`absorb_short_copies`), and the extra bytes are
  coded against the old blocks those copies came from (:func:`extra_regions`);
- ``lzma-patch``: LZMA2 whose dictionary starts out holding old regions — the whole old image when it
  fits :data:`MAX_DICT`, else the 64 KiB blocks the tuples copy from most —: small enough for the
  device to hold, and on the benchmark pairs 2-7 % smaller than zstd-19 with the whole old file as
  dictionary, at a third of its CPU (liblzma through :mod:`~fleetloop_shared.update.lzma_preset`;
  where it cannot be loaded, ``zstd-patch``: zstd-19 with the same dictionary);
- ``zstd``: the chunk alone at level 3, cheap, for chunks nothing old helps.

Making both streams and a patch for every chunk would cost about what bsdiff4 costs; both are made on
a sample of the chunk and only the smaller is made whole (:func:`_encode_chunk`). The sample is searched
through an anchor table (:class:`~fleetloop_shared.update.suffix_diff.AnchorIndex`: one pass, no sort),
so the suffix array is built only when some chunk is written as streams. Without numba or
pydivsufsort the tuples come from ``bsdiff4.core.diff`` against a window of the old image around the
chunk's relative position (FLDELTA1's search, FLDELTA2's container).
"""

from __future__ import annotations

import bz2
import io
import logging
import lzma
from typing import BinaryIO, Protocol

import bsdiff4
import numpy as np
import numpy.typing as npt
import zstandard

from fleetloop_shared.errors import IntegrityError, InternalError, UserError
from fleetloop_shared.update import lzma_preset
from fleetloop_shared.update.delta_format import FLDELTA2, HEADER, DeltaStats
from fleetloop_shared.update.fldelta2_apply import (
    CHUNK,
    CODEC_LZMA2_OLD,
    MAGIC,
    MAX_CHUNK,
    MAX_DICT,
    METHOD_LZMA_PATCH,
    METHOD_NAMES,
    METHOD_STREAMS,
    METHOD_ZSTD,
    METHOD_ZSTD_PATCH,
    REGION,
    REGION_COUNT,
    STREAM,
    STREAMS,
    lzma_dict_size,
    max_body,
)
from fleetloop_shared.update.inflate import CODEC_BZIP2, CODEC_LZMA2, CODEC_STORED, lzma_filters

log = logging.getLogger(__name__)
I64 = npt.NDArray[np.int64]
DEFAULT_CHUNK = MAX_CHUNK
#: zstd level of the whole-chunk candidates.
ZSTD_LEVEL = 19
#: Old regions are chosen for a patch-from dictionary in blocks of this size.
_BLOCK = 1 << 16
#: A chunk's method is chosen on _SAMPLES pieces, each 1/_SAMPLE_SHARE of it (an eighth in all).
_SAMPLES = 4
_SAMPLE_SHARE = 32
_SAMPLE_MIN = 4 << 10
#: LZMA2's match finder for the streams: hash chains, nice length 16, depth 4 — on the benchmark pairs a
#: third of the default's CPU (binary trees, nice 64) for streams within 0.5 % of its size.
_LZMA_SEARCH = {"preset": 6, "mf": lzma.MF_HC4, "mode": lzma.MODE_NORMAL, "nice_len": 16, "depth": 4}
#: Copies shorter than this go into the extra bytes, which are then coded against the old blocks those
#: copies came from (codec 4): a tuple's three numbers cost about what LZMA2 takes for such a match in
#: its dictionary, and the bytes around it code better in one stream. Measured against 16 and 64 on the
#: benchmark pairs: 32 smallest or within 0.1 % on each (decision 0023, addendum 4).
SHORT_COPY = 32
#: Old bytes an extra stream's dictionary holds (the format allows ``MAX_EXTRA_DICT``): the blocks the
#: absorbed copies read most. 2 MiB was no smaller on the benchmark pairs and costs more to load.
_EXTRA_DICT = 1 << 20
#: Without the kernel: the old window around a chunk's relative position (FLDELTA1's search).
_FALLBACK_MARGIN = 512 << 10


class _Matcher(Protocol):
    #: Whether :meth:`estimate` gives the same tuples as :meth:`tuples` (then a chunk sampled whole is
    #: not searched again).
    estimates_exact: bool

    def tuples(self, start: int, data: bytes) -> tuple[I64, bytes, bytes]:
        """``(seek, copy, add)`` tuples for the new bytes ``data`` found at ``start`` of the new image,
        with their diff and extra bytes."""
        ...

    def estimate(self, start: int, data: bytes) -> tuple[I64, bytes, bytes]:
        """Tuples like :meth:`tuples`, possibly from a cheaper search: for choosing a chunk's method and
        its dictionary, not for writing streams."""
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
    """bsdiff's search against the whole old image: estimates through an anchor table (one pass over the
    old image), streams through its suffix array — sorted on first need, so a delta whose chunks are all
    patches never sorts; the table is dropped then, and later estimates use the sort."""

    estimates_exact = False

    def __init__(self, old: bytes) -> None:
        from fleetloop_shared.update import suffix_diff

        self._old = old
        self._module = suffix_diff
        self._index: suffix_diff.OldIndex | None = None
        self._anchors: suffix_diff.AnchorIndex | None = None

    def tuples(self, start: int, data: bytes) -> tuple[I64, bytes, bytes]:
        if self._index is None:
            self._anchors = None  # never both in memory: once sorted, estimates come from the sort too
            self._index = self._module.OldIndex(self._old)
        xyz, diff, extra = self._module.diff_tuples(self._index, data)
        return _seek_first(xyz), diff, extra

    def estimate(self, start: int, data: bytes) -> tuple[I64, bytes, bytes]:
        index = self._index if self._index is not None else self._anchors
        if index is None:
            index = self._anchors = self._module.AnchorIndex(self._old)
        xyz, diff, extra = self._module.diff_tuples(index, data)
        return _seek_first(xyz), diff, extra


class _WindowMatcher:
    """``bsdiff4.core.diff`` against the old window around the chunk's relative position."""

    estimates_exact = True

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

    estimate = tuples


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
        filters = [dict(lzma_filters(len(raw))[0], **_LZMA_SEARCH)]
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


def absorb_short_copies(
    tuples: I64, diff: bytes, extra: bytes, data: bytes, shortest: int = SHORT_COPY
) -> tuple[I64, bytes, bytes, I64]:
    """``(tuples, diff, extra)`` for the new bytes ``data`` with every copy shorter than ``shortest``
    (but the first tuple's) turned into extra bytes; also the ``(old start, length)`` rows of the copies
    turned, whose blocks the extra stream is then coded against (:func:`extra_regions`)."""
    none = np.zeros((0, 2), dtype=np.int64)
    if len(tuples) < 2:
        return tuples, diff, extra, none
    seeks, x, y = tuples[:, 0], tuples[:, 1], tuples[:, 2]
    keep = x >= shortest
    keep[0] = True
    if keep.all():
        return tuples, diff, extra, none
    old_at = np.cumsum(seeks) + np.cumsum(x) - x  # where each copy reads the old image
    new_at = np.cumsum(x + y) - (x + y)  # where each tuple's bytes start in ``data``
    kept = np.flatnonzero(keep)
    start, length = old_at[kept], x[kept]
    seek = start - np.concatenate([np.zeros(1, dtype=np.int64), (start + length)[:-1]])
    upto = np.concatenate([new_at[kept[1:]], np.array([len(data)], dtype=np.int64)])
    out = np.stack([seek, length, upto - new_at[kept] - length], axis=1)
    kept_diff = np.frombuffer(diff, dtype=np.uint8)[np.repeat(keep, x)].tobytes()
    runs = np.stack([x, y], axis=1).ravel()
    copied = np.repeat(np.stack([keep, np.zeros_like(keep)], axis=1).ravel(), runs)
    new_extra = np.frombuffer(data, dtype=np.uint8)[~copied].tobytes()
    return out, kept_diff, new_extra, np.stack([old_at[~keep], x[~keep]], axis=1)


def extra_regions(sources: I64, old_size: int, budget: int = _EXTRA_DICT) -> list[tuple[int, int]]:
    """The old regions an extra stream is coded against: the whole old image within ``budget``, else
    the 64 KiB blocks the absorbed copies (``(old start, length)`` rows) read most; none without any."""
    if not len(sources) or old_size == 0:
        return []
    if old_size <= budget:
        return [(0, old_size)]
    score = _scores_at(sources[:, 0], sources[:, 1], (old_size + _BLOCK - 1) // _BLOCK)
    chosen = np.argsort(-score, kind="stable")[: budget // _BLOCK]
    return _block_regions(np.sort(chosen[score[chosen] > 0]), old_size)


def _packed_against(old: bytes, regions: list[tuple[int, int]], raw: bytes) -> tuple[int, bytes, int]:
    """The extra stream coded against old ``regions`` (codec 4), or packed plainly without any, without
    liblzma, or where stored is no larger."""
    if not regions or len(raw) <= 64 or not lzma_preset.available():
        return _packed(raw, True)
    dictionary = b"".join(old[a : a + n] for a, n in regions)
    table = REGION_COUNT.pack(len(regions)) + b"".join(REGION.pack(a, n) for a, n in regions)
    try:
        coded = table + lzma_preset.compress(dictionary, raw, lzma_dict_size(len(dictionary), len(raw)))
    except InternalError as exc:  # liblzma could not (memory): plain LZMA2 can
        log.warning("extra bytes against old regions failed (%s); coded alone", exc)
        return _packed(raw, True)
    return (CODEC_LZMA2_OLD, coded, len(raw)) if len(coded) < len(raw) else (CODEC_STORED, raw, len(raw))


class _Streams:
    """One chunk's tuples and bytes as the six streams of a streams body, each packed its best way.

    Numbers, the sparse form of the diff and the extra bytes go through LZMA2; the diff as it is through
    bzip2 (LZMA2 on millions of zeros costs seconds). ``sparse`` says which form of the diff to make;
    ``None`` makes both and keeps the smaller (the chunk's sample does, and the whole chunk then makes
    only the form its sample kept).
    """

    def __init__(
        self,
        tuples: I64,
        diff: bytes,
        extra: bytes,
        *,
        sparse_diff: bool | None = None,
        old: bytes = b"",
        regions: list[tuple[int, int]] | None = None,
    ) -> None:
        self.count = len(tuples)
        numbers = (_zigzag(tuples[:, 0]), tuples[:, 1].astype(np.uint64), tuples[:, 2].astype(np.uint64))
        self.numbers = [_packed(varints(v), True) for v in numbers]
        forms: list[list[tuple[int, bytes, int]]] = []
        if sparse_diff is not True:
            forms.append([(CODEC_STORED, b"", 0), _packed(diff, False)])
        if sparse_diff is not False:
            runs, literal = sparse(diff)
            forms.append([_packed(runs, True), _packed(literal, True)])
        self.diff = min(forms, key=lambda form: sum(len(d) for _, d, _ in form))  # ties: plain
        self.sparse_diff = self.diff[0][2] > 0 or (sparse_diff is True)
        self.extra = _packed_against(old, regions or [], extra)
        #: Bytes of the body a chunk pays once whatever its length: the stream headers and the extra
        #: stream's region table.
        self.fixed = STREAMS.size + 6 * STREAM.size
        if self.extra[0] == CODEC_LZMA2_OLD:
            self.fixed += REGION_COUNT.size + len(regions or []) * REGION.size

    def body(self) -> bytes:
        parts = [*self.numbers, *self.diff, self.extra]
        head = STREAMS.pack(self.count) + b"".join(STREAM.pack(c, raw, len(d)) for c, d, raw in parts)
        return head + b"".join(d for _, d, _ in parts)


def _block_scores(tuples: I64, blocks: int) -> npt.NDArray[np.int64]:
    """Bytes the ``(seek, copy, add)`` tuples (old position from 0) copy from each old 64 KiB block."""
    if not len(tuples):
        return np.zeros(blocks, dtype=np.int64)
    seeks, x = tuples[:, 0], tuples[:, 1]
    return _scores_at(np.cumsum(seeks) + np.cumsum(x) - x, x, blocks)


def _scores_at(starts: I64, x: I64, blocks: int) -> npt.NDArray[np.int64]:
    """Bytes the copies of ``x`` bytes from old ``starts`` read from each old 64 KiB block."""
    score = np.zeros(blocks, dtype=np.int64)
    copied = x > 0
    starts, x = starts[copied], x[copied]
    first = starts // _BLOCK
    head = np.minimum(x, (first + 1) * _BLOCK - starts)
    np.add.at(score, first, head)
    for s, n in zip(starts[x > head].tolist(), x[x > head].tolist(), strict=True):  # copies across blocks
        end = s + n
        for b in range(s // _BLOCK + 1, (end - 1) // _BLOCK + 1):
            score[b] += min(end, (b + 1) * _BLOCK) - b * _BLOCK
    return score


def dictionary_regions(
    tuples: I64 | list[I64], old_size: int, budget: int = MAX_DICT
) -> list[tuple[int, int]]:
    """The old regions a chunk's copies read most, as a patch-from dictionary of at most ``budget``.

    An old image within the budget is the dictionary whole. Otherwise old 64 KiB blocks are ranked by how
    many bytes the tuples (one array, or one per sampled piece of the chunk) copy from them, then by what
    they copy from the blocks either side; the best blocks fill the budget and are merged into regions in
    old-image order (the coder finds matches the tuples did not, and a sample's tuples see little).
    """
    parts = tuples if isinstance(tuples, list) else [tuples]
    if not any(len(t) for t in parts) or old_size == 0:
        return []
    if old_size <= budget:  # the whole old image fits: the coder finds what the tuples did not
        return [(0, old_size)]
    blocks = (old_size + _BLOCK - 1) // _BLOCK
    score = sum((_block_scores(t, blocks) for t in parts), np.zeros(blocks, dtype=np.int64))
    near = np.zeros(blocks, dtype=np.int64)  # tuples from a sample miss blocks next to the ones they use
    near[1:] += score[:-1]
    near[:-1] += score[1:]
    return _block_regions(np.sort(np.lexsort((-near, -score))[: budget // _BLOCK]), old_size)


def _block_regions(chosen: npt.NDArray[np.int64], old_size: int) -> list[tuple[int, int]]:
    """Old 64 KiB blocks (ascending) as regions, neighbours merged."""
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


def _sample(size: int) -> list[tuple[int, int]]:
    """The pieces of a chunk its method is chosen on: :data:`_SAMPLES` pieces spread evenly, each
    1/:data:`_SAMPLE_SHARE` of the chunk (at least :data:`_SAMPLE_MIN`), or the whole of a small chunk."""
    piece = max(size // _SAMPLE_SHARE, _SAMPLE_MIN)
    if piece * _SAMPLES * 2 >= size:
        return [(0, size)]
    step = size // _SAMPLES
    return [(i * step + (step - piece) // 2, piece) for i in range(_SAMPLES)]


def _patch(old: bytes, regions: list[tuple[int, int]], data: bytes) -> tuple[int, bytes]:
    """``data`` coded with the old ``regions`` as dictionary: LZMA2 (lzma-patch) where liblzma can be
    loaded, else zstd-19 patch-from (plain zstd-19 without regions)."""
    dictionary = b"".join(old[a : a + n] for a, n in regions)
    table = REGION_COUNT.pack(len(regions)) + b"".join(REGION.pack(a, n) for a, n in regions)
    if lzma_preset.available():
        size = lzma_dict_size(len(dictionary), len(data))
        try:
            return METHOD_LZMA_PATCH, table + lzma_preset.compress(dictionary, data, size)
        except InternalError as exc:  # liblzma could not (memory): zstd can, slower
            log.warning("lzma-patch failed (%s); this chunk is coded with zstd patch-from", exc)
    if not regions:
        return METHOD_ZSTD, _zstd(data)
    return METHOD_ZSTD_PATCH, table + _zstd(data, dictionary)


def _encode_chunk(old: bytes, start: int, data: bytes, matcher: _Matcher | None) -> tuple[int, bytes]:
    """The smaller of streams and patch for ``data`` (the new image from ``start``), chosen on a sample.

    Both encodings are made on a sample of the chunk (:func:`_sample`) and only the smaller is then
    made for the whole chunk: making both costs about what bsdiff4 costs, and on the benchmark pairs the
    sample picks the smaller one wherever they differ by more than a few per cent (docs/benchmarks.md).
    Without liblzma, plain zstd level 3 is made too (cheap), for chunks nothing old helps (with it, the
    patch is LZMA2 and as good there).
    """
    made: list[tuple[int, bytes]] = []
    if matcher is None:
        made.append(_patch(old, [], data))
    else:
        pieces = _sample(len(data))
        found = [matcher.estimate(start + a, data[a : a + n]) for a, n in pieces]
        regions = dictionary_regions([tuples for tuples, _, _ in found], len(old))
        # the sample as one chunk both ways, so that each coder sees the sample's pieces as one stream
        cut = [absorb_short_copies(*f, data[a : a + n]) for f, (a, n) in zip(found, pieces, strict=True)]
        streams = _Streams(
            np.concatenate([t for t, _, _, _ in cut]),
            b"".join(d for _, d, _, _ in cut),
            b"".join(e for _, _, e, _ in cut),
            old=old,
            regions=extra_regions(np.concatenate([s for _, _, _, s in cut]), len(old)),
        )
        patch = _patch(old, regions, b"".join(data[a : a + n] for a, n in pieces))
        whole = len(pieces) == 1 and pieces[0][1] == len(data)
        # a sample of part of the chunk is compared without what each pays once per chunk
        table = 0 if whole else REGION_COUNT.size + len(regions) * REGION.size
        if len(streams.body()) - (0 if whole else streams.fixed) <= len(patch[1]) - table:
            if not (whole and matcher.estimates_exact):  # written from the longest matches
                t, d, e, sources = absorb_short_copies(*matcher.tuples(start, data), data)
                streams = _Streams(t, d, e, sparse_diff=streams.sparse_diff, old=old,
                                   regions=extra_regions(sources, len(old)))  # fmt: skip
            made.append((METHOD_STREAMS, streams.body()))
        else:
            made.append(patch if whole else _patch(old, regions, data))
    if not lzma_preset.available():
        made.append((METHOD_ZSTD, _zstd(data, level=3)))
    fits = [(m, b) for m, b in made if len(b) <= max_body(len(data))]
    if not fits:  # nothing old helps and LZMA2 expanded the chunk: zstd's bound always fits
        fits = [(METHOD_ZSTD, _zstd(data, level=3))]
    return min(fits, key=lambda mb: len(mb[1]))  # ties: the earlier


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

    Memory: the old image; its anchor table (4-8 bytes per old byte, at most 64 MiB) or, once a chunk is
    written as streams, its suffix array (4 bytes per old byte); and one chunk's work, whose coder's match
    finder (~120 MiB for a full 16 MiB dictionary) dominates below some tens of MiB of old image; on large
    images under 10× the old image (docs/benchmarks.md). ``accelerate=False`` searches with
    ``bsdiff4.core.diff`` in windows even where the suffix_diff kernel could run (tests compare both; the
    patches apply the same way).
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
