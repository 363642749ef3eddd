"""bsdiff-format differences made fast: a libdivsufsort suffix array plus a numba match kernel.

Why this exists: ``bsdiff4.core.diff`` spends nearly all of its time sorting suffixes with qsufsort
(O(n log n), ~3 MB/s here); libdivsufsort (``pydivsufsort``) sorts the same suffixes 6-7× faster. The
search that follows is bsdiff's algorithm (Colin Percival, "Naive differences of executable code"),
written here from its description as one numba kernel:

1. For each position of the new data, find the longest *exact* match anywhere in the old data: in the
   old data's suffix array, go straight to the suffixes sharing the first two bytes (a 64 K-entry table),
   then binary-search them, never re-comparing the prefix already known to match at both ends.
2. Keep following the current alignment (old position − new position) while the bytes it predicts still
   match as well as the best exact match would: a relocated pointer every few bytes does not break it.
   Only a match that beats the current alignment by more than 8 bytes starts a new one. A byte the
   current alignment predicts is not searched for at all: a better alignment through it is found at the
   next byte it mispredicts (the backward extension of step 3 recovers the bytes before). In relocated
   data — mostly predicted, a changed pointer every few bytes — this skips most binary searches: the
   delta costs 15-25 % less CPU on the benchmark's mixed library pairs, sizes within ±0.25 %
   (benchmarks/delta.py).
3. When the alignment changes, extend the previous alignment forward and the new one backward as long
   as more than half of the bytes agree (the score ``2·matches − length`` is maximal), split any overlap
   where the combined score is best, and emit one control tuple ``(x, y, z)``: ``x`` bytes of the
   byte-wise difference new − old (mostly zeros: compresses to almost nothing), ``y`` bytes copied
   verbatim from the new data, then a seek of ``z`` in the old data.

The output is exactly what ``bsdiff4.core.patch`` applies — control as 8-byte sign-magnitude
little-endian integers, diff and extra as raw bytes — so the apply side, the FLDELTA1 container and
every patch made before this module existed are unchanged. Without numba or pydivsufsort (or with
``FLEETLOOP_NO_NUMBA=1``), :func:`available` is false and callers use ``bsdiff4.core.diff``.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from typing import Any

import bsdiff4
import numpy as np
import numpy.typing as npt

U8 = npt.NDArray[np.uint8]
I32 = npt.NDArray[np.int32]

_kernel: Callable[..., Any] | None = None
_buckets: Callable[..., Any] | None = None
_anchoring: Callable[..., Any] | None = None
_sorter: Callable[[bytes], I32] | None = None
_tried = False
#: Search the suffix array only where the current alignment mispredicts (module docstring).
SKIP_PREDICTED = True
#: An :class:`AnchorIndex` finds matches of at least this many bytes (bsdiff's search starts a new
#: alignment only on a match 9 bytes better than the current one, so shorter ones seldom count).
ANCHOR = 8
#: Fibonacci hashing's multiplier (2**64 / golden ratio): spreads the 8 bytes over the top bits.
_ANCHOR_MULT = np.uint64(0x9E3779B97F4A7C15)


def _bucket_kernel(old: Any) -> Any:  # pragma: no cover - compiled
    """Where each two-byte prefix starts in the suffix array of ``old`` (one pass over ``old``).

    ``start[b*257 + c + 1]``: first suffix-array index of the suffixes beginning with bytes b, c;
    ``start[b*257]``: the one-byte suffix "b" (the last byte of old), which sorts first among b's.
    Counted from old itself (sequential reads), then summed into starts. Computed once per old image
    (:class:`OldIndex`): a whole-image delta diffs every chunk of the new image against the same table.
    """
    n_old = old.shape[0]
    start = np.zeros(256 * 257 + 1, dtype=np.int64)
    for i in range(n_old - 1):
        start[np.int64(old[i]) * 257 + np.int64(old[i + 1]) + 2] += 1
    start[np.int64(old[n_old - 1]) * 257 + 1] += 1
    for k in range(256 * 257):
        start[k + 1] += start[k]
    return start


def _anchor_kernel(old: Any, bits: int) -> Any:  # pragma: no cover - compiled
    """Where each :data:`ANCHOR`-byte string of ``old`` first occurs, by a multiplicative hash of it into
    ``2**bits`` slots (-1: none; a collision keeps the earlier string): one sequential pass, no sort."""
    n_old = old.shape[0]
    table = np.full(1 << bits, -1, dtype=np.int32)
    if n_old < ANCHOR:
        return table
    shift = np.uint64(64 - bits)
    v = np.uint64(0)
    for k in range(ANCHOR - 1):
        v = (v << np.uint64(8)) | np.uint64(old[k])
    for i in range(n_old - ANCHOR + 1):
        v = (v << np.uint64(8)) | np.uint64(old[i + ANCHOR - 1])  # the ANCHOR bytes from i, first on top
        h = np.int64((v * _ANCHOR_MULT) >> shift)
        if table[h] < 0:
            table[h] = i
    return table


def _diff_kernel(  # pragma: no cover
    old: Any,
    new: Any,
    sa: Any,
    start: Any,
    anchors: Any,
    anchor_shift: Any,
    dif: Any,
    ext: Any,
    skip_predicted: bool,
) -> Any:
    """bsdiff's control/diff/extra for ``new`` against ``old`` (``sa``: suffix array of ``old``,
    ``start``: its two-byte buckets from :func:`_bucket_kernel`; or, when ``anchors`` is not empty,
    :func:`_anchor_kernel`'s table, indexed by a hash's top bits (``64 - anchor_shift`` of them),
    instead of both: a match found through it is *a* match, not the longest — :class:`AnchorIndex`).

    Writes the diff and extra streams into ``dif`` / ``ext`` (each ``len(new)`` long) and returns
    ``(control, control_words, diff_len, extra_len)``; ``control`` is a uint64 array of sign-magnitude
    words, three per tuple. Compiled by numba: plain loops, no Python objects.
    """
    n_old = old.shape[0]
    n_new = new.shape[0]
    top = np.uint64(1) << np.uint64(63)
    anchored = anchors.shape[0] > 0
    shift = np.uint64(anchor_shift)
    control = np.empty(3 * 64, dtype=np.uint64)
    words = 0
    n_dif = 0
    n_ext = 0

    scan = 0
    length = 0
    pos = 0
    last_scan = 0
    last_pos = 0
    last_offset = 0
    while scan < n_new:
        old_score = 0
        scan += length
        counted = scan  # bytes of new before this one are already scored against last_offset
        while scan < n_new:
            # --- a byte the current alignment predicts needs no search (see the module docstring) ---
            j = scan + last_offset
            if skip_predicted and 0 <= j < n_old and old[j] == new[scan]:
                if counted > scan:
                    old_score -= 1  # the byte was scored: it leaves the window
                else:
                    counted = scan + 1
                scan += 1
                continue
            # --- longest exact match of new[scan:] in old: binary search of the suffix array ---
            rest = n_new - scan
            b0 = np.int64(new[scan]) * 257
            if anchored:  # --- or a match through the anchor table (AnchorIndex) ---
                length = 0
                pos = 0
                if rest >= ANCHOR:
                    v = np.uint64(0)
                    for k in range(ANCHOR):
                        v = (v << np.uint64(8)) | np.uint64(new[scan + k])
                    p = anchors[np.int64((v * _ANCHOR_MULT) >> shift)]
                    if p >= 0:
                        k = 0
                        while p + k < n_old and k < rest and old[p + k] == new[scan + k]:
                            k += 1
                        length = k
                        pos = p
            elif rest >= 2 and start[b0 + new[scan + 1] + 1] < start[b0 + new[scan + 1] + 2]:
                lo = start[b0 + new[scan + 1] + 1]  # the suffixes starting with these two bytes
                hi = start[b0 + new[scan + 1] + 2] - 1
                lcp_lo = 2
                p = sa[lo]
                while p + lcp_lo < n_old and lcp_lo < rest and old[p + lcp_lo] == new[scan + lcp_lo]:
                    lcp_lo += 1
                lcp_hi = 2
                p = sa[hi]
                while p + lcp_hi < n_old and lcp_hi < rest and old[p + lcp_hi] == new[scan + lcp_hi]:
                    lcp_hi += 1
                while hi - lo > 1 and lcp_lo < rest and lcp_hi < rest:
                    mid = (lo + hi) >> 1
                    p = sa[mid]
                    k = min(lcp_lo, lcp_hi)  # every suffix between lo and hi shares this prefix
                    while p + k < n_old and k < rest and old[p + k] == new[scan + k]:
                        k += 1
                    if k == rest:  # the whole rest of new matches here: nothing can be longer
                        lo = mid
                        lcp_lo = k
                        break
                    if p + k == n_old or old[p + k] < new[scan + k]:
                        lo = mid
                        lcp_lo = k
                    else:
                        hi = mid
                        lcp_hi = k
                if lcp_lo > lcp_hi:  # ties: the later suffix (as bsdiff does; measurably smaller)
                    length = lcp_lo
                    pos = sa[lo]
                else:
                    length = lcp_hi
                    pos = sa[hi]
            elif start[b0] < start[b0 + 257]:  # no two-byte match: any suffix with the first byte
                length = 1
                pos = sa[start[b0]]
            else:
                length = 0
                pos = 0

            # --- how well would the current alignment have done over the same bytes? ---
            while counted < scan + length:
                j = counted + last_offset
                if 0 <= j < n_old and old[j] == new[counted]:
                    old_score += 1
                counted += 1
            if (length == old_score and length != 0) or length > old_score + 8:
                break
            j = scan + last_offset
            if 0 <= j < n_old and old[j] == new[scan]:
                old_score -= 1
            scan += 1

        if length == old_score and scan != n_new:
            continue  # the match only continues the current alignment: keep going

        # --- extend the previous alignment forward from last_scan ---
        score = 0
        best = 0
        len_f = 0
        i = 0
        while last_scan + i < scan and last_pos + i < n_old:
            if old[last_pos + i] == new[last_scan + i]:
                score += 1
            i += 1
            if 2 * score - i > 2 * best - len_f:
                best = score
                len_f = i

        # --- extend the new alignment backward from scan ---
        len_b = 0
        if scan < n_new:
            score = 0
            best = 0
            i = 1
            while scan >= last_scan + i and pos >= i:
                if old[pos - i] == new[scan - i]:
                    score += 1
                if 2 * score - i > 2 * best - len_b:
                    best = score
                    len_b = i
                i += 1

        # --- both claim the same bytes: split where the two alignments together score best ---
        if last_scan + len_f > scan - len_b:
            overlap = (last_scan + len_f) - (scan - len_b)
            score = 0
            best = 0
            split = 0
            for i in range(overlap):
                if new[last_scan + len_f - overlap + i] == old[last_pos + len_f - overlap + i]:
                    score += 1
                if new[scan - len_b + i] == old[pos - len_b + i]:
                    score -= 1
                if score > best:
                    best = score
                    split = i + 1
            len_f += split - overlap
            len_b -= split

        # --- emit (len_f, extra, seek) ---
        for i in range(len_f):
            dif[n_dif + i] = np.uint8((np.int64(new[last_scan + i]) - np.int64(old[last_pos + i])) & 0xFF)
        n_dif += len_f
        extra = (scan - len_b) - (last_scan + len_f)
        for i in range(extra):
            ext[n_ext + i] = new[last_scan + len_f + i]
        n_ext += extra
        seek = (pos - len_b) - (last_pos + len_f)
        if words + 3 > control.shape[0]:
            grown = np.empty(2 * control.shape[0], dtype=np.uint64)
            grown[:words] = control[:words]
            control = grown
        for value in (len_f, extra, seek):
            control[words] = np.uint64(value) if value >= 0 else np.uint64(-value) | top
            words += 1

        last_scan = scan - len_b
        last_pos = pos - len_b
        last_offset = pos - scan
    return control, words, n_dif, n_ext


def _load() -> bool:
    """Import pydivsufsort and compile (or load from numba's on-disk cache) the kernel, once.

    Any failure of these optional accelerators — not installed, ``FLEETLOOP_NO_NUMBA`` set, an LLVM or
    cache problem, a probe that does not round-trip — means "use bsdiff4.core.diff", never a failed
    or wrong delta. The cyclic garbage collector is paused meanwhile: importing numba allocates enough
    objects to trigger several full collections, ~10 % of a fresh process's delta time here.
    """
    global _tried
    if _tried:
        return _kernel is not None
    _tried = True
    if os.environ.get("FLEETLOOP_NO_NUMBA"):
        return False
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _compile()
    finally:
        if collecting:
            gc.enable()


def _compile() -> bool:
    global _kernel, _buckets, _anchoring, _sorter
    try:
        import numba
        from pydivsufsort import divsufsort  # type: ignore[import-untyped]
    except ImportError:
        return False
    try:
        kernel = numba.njit(cache=True, nogil=True)(_diff_kernel)
        buckets = numba.njit(cache=True, nogil=True)(_bucket_kernel)
        anchoring = numba.njit(cache=True, nogil=True)(_anchor_kernel)

        def sort(data: bytes) -> I32:
            sa: I32 = divsufsort(data)
            return sa

        _kernel, _buckets, _anchoring, _sorter = kernel, buckets, anchoring, sort
        old, new = b"abcdefgh" * 4, b"abcdXfgh" * 3 + b"tail"  # compiles now; fails here if broken
        if bytes(bsdiff4.core.patch(old, len(new), *diff(old, new))) != new:
            raise RuntimeError("suffix diff probe does not round-trip")
        tuples, dif, ext = diff_tuples(AnchorIndex(old), new)  # and the anchored search
        if len(dif) + len(ext) != len(new) or int(tuples[:, :2].sum()) != len(new):
            raise RuntimeError("anchored suffix diff probe does not cover its input")
    except Exception:  # the optional accelerator is broken: fall back, the delta stays correct
        _kernel = _buckets = _anchoring = _sorter = None
        return False
    return True


def available() -> bool:
    """Whether the fast path (numba + pydivsufsort) is usable on this machine."""
    return _load()


def _need() -> None:
    if not _load() or _kernel is None or _buckets is None or _anchoring is None or _sorter is None:
        raise RuntimeError("suffix_diff needs numba and pydivsufsort (check available() first)")


def suffix_array(old: bytes) -> I32:
    """The suffix array of ``old`` (int32 start offsets in lexicographic order), for :func:`diff`."""
    _need()
    assert _sorter is not None
    return _sorter(old)


def _old_array(old: bytes, offsets: str) -> U8:
    """``old`` as the kernel reads it, refused when empty or too large for int32 ``offsets``."""
    if not old:
        raise ValueError("suffix_diff needs a non-empty old buffer")
    if len(old) >= 1 << 31:
        raise ValueError(f"old buffer of {len(old)} bytes: int32 {offsets} stop at 2 GiB")
    return np.frombuffer(old, dtype=np.uint8)


class OldIndex:
    """One old image made searchable once: its suffix array and two-byte buckets.

    A whole-image delta diffs every chunk of the new image against all of the old one, so the sort
    (~5 bytes of memory per old byte: the data and an int32 array) is paid once per old image, not per
    chunk. int32 offsets bound the old image to 2 GiB.
    """

    def __init__(self, old: bytes, sa: I32 | None = None) -> None:
        _need()
        assert _buckets is not None
        array = _old_array(old, "suffix arrays")
        if sa is None:
            sa = suffix_array(old)
        elif sa.dtype != np.int32 or sa.shape != (len(old),):  # the kernel trusts it: no bounds checks
            raise ValueError(f"suffix array of {sa.shape} {sa.dtype} for {len(old)} bytes of old")
        self.data = old
        self.array = array
        self.sa = sa
        self.starts = _buckets(self.array)

    def __len__(self) -> int:
        return len(self.data)

    def search(self) -> tuple[I32, npt.NDArray[np.int64], I32, int]:
        """The kernel's search arguments: suffix array and buckets, no anchors."""
        return self.sa, self.starts, _NO_ANCHORS, 0


_NO_ANCHORS = np.empty(0, dtype=np.int32)
_NO_SA = np.empty(0, dtype=np.int32)
_NO_BUCKETS = np.zeros(1, dtype=np.int64)
#: Anchor tables have 2**bits slots, about one per old byte within these bounds (64 MiB at the most).
_ANCHOR_BITS = (12, 24)


class AnchorIndex:
    """An old image made searchable cheaply: where each 8-byte string of it first occurs (a hash table of
    int32 offsets, one slot per half to one old byte — 4 to 8 bytes per old byte, at most 64 MiB), built
    in one pass without sorting.

    bsdiff's search through it finds *a* match of at least :data:`ANCHOR` bytes where the suffix array
    finds the longest: tuples good enough to estimate what a chunk's streams would cost and which old
    blocks it copies from, at a few per cent of a suffix sort's CPU — so a delta sorts the old image
    only when some chunk is written as streams.
    """

    def __init__(self, old: bytes) -> None:
        _need()
        assert _anchoring is not None
        self.array = _old_array(old, "anchors")
        low, high = _ANCHOR_BITS
        self.bits = min(high, max(low, len(old).bit_length()))
        self.data = old
        self.anchors = _anchoring(self.array, self.bits)

    def __len__(self) -> int:
        return len(self.data)

    def search(self) -> tuple[I32, npt.NDArray[np.int64], I32, int]:
        """The kernel's search arguments: the anchor table and its hash shift, no suffix array."""
        return _NO_SA, _NO_BUCKETS, self.anchors, 64 - self.bits


def _run(index: OldIndex | AnchorIndex, new: bytes) -> tuple[npt.NDArray[np.uint64], int, U8, U8]:
    assert _kernel is not None
    n = np.frombuffer(new, dtype=np.uint8)
    dif = np.empty(len(new), dtype=np.uint8)
    ext = np.empty(len(new), dtype=np.uint8)
    sa, starts, anchors, shift = index.search()
    control, words, n_dif, n_ext = _kernel(
        index.array, n, sa, starts, anchors, shift, dif, ext, SKIP_PREDICTED
    )
    return control[:words], words, dif[:n_dif], ext[:n_ext]


def diff(old: bytes, new: bytes, sa: I32 | None = None) -> tuple[bytes, bytes, bytes]:
    """bsdiff's ``(control, diff, extra)`` streams turning ``old`` into ``new``.

    Same format as ``bsdiff4.core.diff`` (so ``bsdiff4.core.patch`` applies it). ``sa`` is
    :func:`suffix_array` of ``old`` when the caller already has it. ``old`` must not be empty.
    """
    _need()
    if not old:
        raise ValueError("suffix_diff.diff needs a non-empty old buffer")
    control, _, dif, ext = _run(OldIndex(old, sa), new)
    return control.astype("<u8", copy=False).tobytes(), dif.tobytes(), ext.tobytes()


def diff_tuples(index: OldIndex | AnchorIndex, new: bytes) -> tuple[npt.NDArray[np.int64], bytes, bytes]:
    """bsdiff's tuples for ``new`` against the indexed old image, as signed integers.

    Returns ``(tuples, diff, extra)``: ``tuples`` is an ``(n, 3)`` int64 array of ``(x, y, z)`` — add
    ``x`` bytes of ``diff`` to the old image at the current position, append ``y`` bytes of ``extra``,
    move the old position by ``x + z`` — starting at old position 0. Offsets reach the whole old image.
    """
    _need()
    control, _, dif, ext = _run(index, new)
    return _signed(control), dif.tobytes(), ext.tobytes()


def _signed(words: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
    sign = (words >> np.uint64(63)).astype(bool)
    magnitude = (words & np.uint64((1 << 63) - 1)).astype(np.int64)
    signed: npt.NDArray[np.int64] = np.where(sign, -magnitude, magnitude).reshape(-1, 3)
    return signed


def control_tuples(control: bytes) -> npt.NDArray[np.int64]:
    """bsdiff's control stream (8-byte sign-magnitude words, as ``bsdiff4.core.diff`` makes it) as an
    ``(n, 3)`` int64 array of ``(x, y, z)``."""
    if len(control) % 24:
        raise ValueError("bsdiff control is not a whole number of tuples")
    return _signed(np.frombuffer(control, dtype="<u8").astype(np.uint64))
