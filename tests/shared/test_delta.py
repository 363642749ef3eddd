"""OTA deltas: no larger than bsdiff4 or zstd-19 patch-from on image pairs the test makes, whatever moved;
exact; FLDELTA1 still applies; the device's memory stays bounded whatever the image size.

Size comparisons use :mod:`fleetloop_fwsim.code_image` (bytes from a seed, the same on every machine),
never images built from the machine's own binaries.
"""

from __future__ import annotations

import hashlib
import io
import random
import tracemalloc
from pathlib import Path
from typing import BinaryIO

import bsdiff4
import numpy as np
import numpy.typing as npt
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetloop_fwsim.code_image import CHANGES, image_pair
from fleetloop_shared.errors import IntegrityError, UserError
from fleetloop_shared.update import fldelta2, fldelta2_apply, lzma_preset, suffix_diff
from fleetloop_shared.update.delta import (
    FLDELTA1,
    FLDELTA2,
    apply_delta,
    apply_delta_file,
    apply_delta_stream,
    delta_format,
    make_delta,
    make_delta_file,
)

SIZE = 1 << 20
#: The container's own bytes a delta may spend over the best reference (headers, region table).
CONTAINER_SLACK = 256


def zstd19_patch_from(old: bytes, new: bytes) -> int:
    """The reference: zstd level 19 with the whole old image as a raw dictionary, a window over both."""
    d = zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    params = zstandard.ZstdCompressionParameters.from_level(
        19, window_log=max(20, (len(old) + len(new)).bit_length())
    )
    return len(zstandard.ZstdCompressor(dict_data=d, compression_params=params).compress(new))


@pytest.fixture(scope="module", params=CHANGES)
def pair(request: pytest.FixtureRequest) -> tuple[str, bytes, bytes]:
    old, new = image_pair(request.param, size=SIZE)
    return request.param, old, new


def test_fldelta2_is_no_larger_than_bsdiff4_or_zstd_patch_from(pair: tuple[str, bytes, bytes]) -> None:
    change, old, new = pair
    if change == "grow":
        assert len(new) > 1.35 * len(old)
    if change == "shrink":
        assert len(new) < 0.65 * len(old)
    patch = make_delta(old, new)
    assert delta_format(patch) == FLDELTA2
    assert apply_delta(old, patch) == new
    bsdiff = len(bsdiff4.diff(old, new))
    zstd = zstd19_patch_from(old, new)
    assert len(patch) <= bsdiff, (change, len(patch), bsdiff)
    assert len(patch) <= zstd + CONTAINER_SLACK, (change, len(patch), zstd)


def test_whole_image_matching_finds_what_a_window_misses() -> None:
    """Sections reordered across a 1 MiB image, chunks of 128 KiB: FLDELTA1 looks for each chunk's
    bytes only near the same relative position and misses; FLDELTA2 searches all of the old image."""
    old, new = image_pair("reorder", size=SIZE, seed=5)
    windowed = make_delta(old, new, format=FLDELTA1, chunk=128 << 10, margin=32 << 10)
    whole = make_delta(old, new, chunk=128 << 10)
    assert apply_delta(old, windowed) == new and apply_delta(old, whole) == new
    assert len(whole) < 0.5 * len(windowed), (len(whole), len(windowed))
    assert len(whole) < 1.25 * len(make_delta(old, new)), "small chunks cost a little: the search is whole"


def chunk_methods(patch: bytes) -> list[str]:
    """The method of each chunk of an FLDELTA2 patch, in order."""
    from fleetloop_shared.update.delta_format import HEADER

    methods, at = [], HEADER.size
    while at < len(patch):
        method, _, body_len = fldelta2_apply.CHUNK.unpack_from(patch, at)
        methods.append(fldelta2_apply.METHOD_NAMES[method])
        at += fldelta2_apply.CHUNK.size + body_len
    return methods


@pytest.mark.parametrize("liblzma", [True, False], ids=["liblzma", "no-liblzma"])
def test_each_chunk_takes_the_method_its_sample_shows_smaller(
    liblzma: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relocated code goes to streams (the diff sees a shifted byte), a mosaic of short old pieces to a
    patch (bsdiff pays a tuple per piece), new bytes to a coder with no use for the old image; without
    liblzma the patch is zstd-19's."""
    from fleetloop_shared.update import fldelta2, lzma_preset

    if not liblzma:
        monkeypatch.setattr(lzma_preset, "available", lambda: False)
    rng = random.Random(7)
    old = rng.randbytes(300_000)
    # relocated: one byte in 24 moved by one (a pointer's low byte), the diff sees it
    similar = bytes((b + 1) & 0xFF if i % 24 == 5 else b for i, b in enumerate(old))
    mosaic = b"".join(old[p : p + 24] for p in (rng.randrange(len(old) - 24) for _ in range(12_000)))
    fresh = rng.randbytes(1 << 12) * 64  # new, compressible: nothing old helps
    chunk = 1 << 18
    new = similar[:chunk] + mosaic[:chunk] + fresh
    out = io.BytesIO()
    stats = fldelta2.encode(old, io.BytesIO(new), len(new), out, chunk=chunk)
    patch = out.getvalue()
    assert stats.bytes == len(patch) and stats.new_bytes == len(new)
    methods = chunk_methods(patch)
    assert sum(stats.methods.values()) == len(methods) == 3
    patch_method = "lzma-patch" if liblzma else "zstd-patch"
    assert methods[:2] == ["streams", patch_method], methods
    assert methods[2] in ({"lzma-patch"} if liblzma else {"zstd", "zstd-patch"}), methods
    assert len(patch) < 0.1 * len(fresh) + 0.5 * len(mosaic[:chunk]) + 0.05 * chunk
    assert stats.algorithm.startswith("fldelta2:")
    assert apply_delta(old, patch) == new


def test_the_old_image_is_sorted_only_for_streams_and_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Methods are chosen on estimates from the anchor table; the suffix array is built when a chunk is
    written as streams, once for all of them, and never for a delta of patches only."""
    from fleetloop_shared.update import fldelta2, suffix_diff

    if not suffix_diff.available():
        pytest.fail("the kernel is installed by `make setup` (numba, pydivsufsort)")
    sorts: list[int] = []
    real = suffix_diff.OldIndex

    def counted(old: bytes, sa: object = None) -> suffix_diff.OldIndex:
        sorts.append(len(old))
        return real(old)

    monkeypatch.setattr(suffix_diff, "OldIndex", counted)
    rng = random.Random(11)
    old = rng.randbytes(200_000)
    mosaic = b"".join(old[p : p + 24] for p in (rng.randrange(len(old) - 24) for _ in range(8_000)))
    similar = bytes((b + 1) & 0xFF if i % 24 == 5 else b for i, b in enumerate(old))
    for new, want_sorts in ((mosaic, []), (similar + similar, [len(old)])):
        sorts.clear()
        out = io.BytesIO()
        stats = fldelta2.encode(old, io.BytesIO(new), len(new), out, chunk=1 << 17)
        assert ("streams" in stats.methods) == bool(want_sorts), stats.methods
        assert sorts == want_sorts
        assert apply_delta(old, out.getvalue()) == new


def test_fldelta1_patches_still_apply_and_a_device_can_refuse_fldelta2() -> None:
    old, new = image_pair("patch", size=SIZE // 4)
    v1 = make_delta(old, new, format=FLDELTA1)
    v2 = make_delta(old, new)
    assert delta_format(v1) == FLDELTA1 and delta_format(v2) == FLDELTA2
    assert apply_delta(old, v1) == new
    assert apply_delta(old, v1, formats=(FLDELTA1,)) == new
    with pytest.raises(IntegrityError, match="format fldelta2; this device reads fldelta1"):
        apply_delta(old, v2, formats=(FLDELTA1,))
    with pytest.raises(UserError, match="takes no margin"):
        make_delta(old, new, margin=1 << 10)
    with pytest.raises(UserError, match="unknown delta format"):
        make_delta(old, new, format="xdelta3")


def test_without_the_kernel_fldelta2_searches_windows_and_still_applies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old, new = image_pair("patch", size=SIZE // 4)
    slow = make_delta(old, new, accelerate=False)
    assert apply_delta(old, slow) == new
    monkeypatch.setenv("FLEETLOOP_NO_NUMBA", "1")
    monkeypatch.setattr(suffix_diff, "_tried", False)
    monkeypatch.setattr(suffix_diff, "_kernel", None)
    monkeypatch.setattr(suffix_diff, "_buckets", None)
    monkeypatch.setattr(suffix_diff, "_sorter", None)
    assert not suffix_diff.available()
    assert make_delta(old, new) == slow
    with pytest.raises(RuntimeError, match="needs numba"):
        suffix_diff.OldIndex(old)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"", b"abc"),
        (b"abc", b""),
        (b"", b""),
        (b"hello world", b"hello brave new world"),
        (b"x", b"x" * 5000),
    ],
)
def test_small_inputs_round_trip(old: bytes, new: bytes) -> None:
    for fmt in (FLDELTA2, FLDELTA1):
        assert apply_delta(old, make_delta(old, new, format=fmt)) == new


def test_files_round_trip_and_output_appears_only_complete(tmp_path: Path) -> None:
    old, new = image_pair("insert", size=SIZE // 4)
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(new)
    stats = make_delta_file(tmp_path / "old", tmp_path / "new", tmp_path / "patch")
    assert stats.bytes == (tmp_path / "patch").stat().st_size and stats.format == FLDELTA2
    assert apply_delta_file(tmp_path / "old", tmp_path / "patch", tmp_path / "out") == len(new)
    assert (tmp_path / "out").read_bytes() == new
    (tmp_path / "bad").write_bytes(b"junk")
    with pytest.raises(IntegrityError):
        apply_delta_file(tmp_path / "old", tmp_path / "bad", tmp_path / "out2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "new", "old", "out", "patch"]


class _Recorder:
    """An old image as a file object that records every read (the device's positioned reads)."""

    def __init__(self, data: bytes) -> None:
        self.f: BinaryIO = io.BytesIO(data)
        self.largest = 0

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.f.seek(pos, whence)

    def read(self, n: int = -1) -> bytes:
        assert n >= 0, "the whole old image is never read at once"
        self.largest = max(self.largest, n)
        return self.f.read(n)


@pytest.fixture(scope="module")
def big_pair() -> tuple[bytes, bytes, bytes]:
    """A 40 MiB image (five chunks) and a release with blocks moved across the whole image, blocks
    rewritten, and new code; bytes cheap to make."""
    rng = random.Random(3)
    unit, _ = image_pair("patch", size=SIZE // 2, seed=9)
    blocks = [bytes(b ^ k for b in unit[:4096]) + unit[4096:] for k in range(56)]
    old = b"".join(blocks)
    order = list(range(len(blocks)))
    rng.shuffle(order)
    parts = [blocks[i] for i in order]
    parts[5] = rng.randbytes(len(parts[5]))  # new, incompressible
    parts[9] = (
        parts[9][:100_000] + bytes((b + 3) & 0xFF for b in parts[9][100_000:200_000]) + parts[9][200_000:]
    )
    new = b"".join(parts)
    return old, new, make_delta(old, new)


def _apply_traced(old: bytes, new: bytes, patch: bytes) -> tuple[int, int, int]:
    """Apply ``patch`` as the device does, checking the result is ``new``: (largest write, largest read
    of the old image, peak of tracemalloc's traced allocations)."""
    recorder = _Recorder(old)
    pieces: list[int] = []
    digest = hashlib.sha256()

    def write(data: bytes) -> None:
        pieces.append(len(data))
        digest.update(data)

    tracemalloc.start()
    try:
        size = apply_delta_stream(recorder, len(old), io.BytesIO(patch), write)  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size == len(new) and digest.digest() == hashlib.sha256(new).digest()
    return max(pieces), recorder.largest, peak


def test_streaming_apply_holds_bounded_buffers_not_the_image(big_pair: tuple[bytes, bytes, bytes]) -> None:
    """Whatever the image size the device holds at most one chunk's work: writes of at most FLUSH
    bytes, positioned reads of the old slot of at most FLUSH bytes, and allocations far below the
    image (traced by tracemalloc: Python objects, numpy, bzip2 and LZMA buffers)."""
    old, new, patch = big_pair
    assert len(new) > 5 * fldelta2_apply.MAX_CHUNK - (2 << 20)
    largest_write, largest_read, peak = _apply_traced(old, new, patch)
    assert largest_write <= fldelta2_apply.MAX_CHUNK and largest_read <= fldelta2_apply.FLUSH
    bound = 2 * fldelta2_apply.MAX_CHUNK + 2 * fldelta2_apply.MAX_DICT
    assert peak < bound < len(new), (peak, bound)


def test_an_lzma_patch_chunk_holds_its_dictionary_body_and_one_piece() -> None:
    """The largest honest lzma-patch chunk: 8 MiB of old regions, 8 MiB of output the old image does not
    help (random, so LZMA2 stores it: the body is as large as a chunk's can be). The device holds the
    decoder's dictionary (regions + chunk), the body and one output piece — not a second copy of the
    body (the stream is fed in slices) — and its writes are at most FLUSH bytes."""
    rng = random.Random(11)
    old = rng.randbytes(fldelta2_apply.MAX_DICT)
    new = rng.randbytes(fldelta2_apply.MAX_CHUNK)
    stream = lzma_preset.compress(old, new, fldelta2_apply.lzma_dict_size(len(old), len(new)))
    body = fldelta2_apply.REGION_COUNT.pack(1) + fldelta2_apply.REGION.pack(0, len(old)) + stream
    from fleetloop_shared.update.delta_format import HEADER

    patch = (
        HEADER.pack(fldelta2_apply.MAGIC, len(new), len(old), len(new), 1)
        + fldelta2_apply.CHUNK.pack(fldelta2_apply.METHOD_LZMA_PATCH, len(new), len(body))
        + body
    )
    largest_write, largest_read, peak = _apply_traced(old, new, patch)
    assert largest_write <= fldelta2_apply.FLUSH and largest_read <= fldelta2_apply.FLUSH
    bound = fldelta2_apply.lzma_dict_size(len(old), len(new)) + len(body) + 2 * fldelta2_apply.FLUSH
    assert len(body) > len(new) and peak < bound, (peak, bound)


def test_an_extra_stream_against_old_regions_holds_its_dictionary_body_and_one_piece() -> None:
    """The largest honest extra stream coded against old regions: 2 MiB of regions, a chunk of 8 MiB
    that is all extra bytes the old image does not help (random: stored by LZMA2, the body as large as a
    chunk's can be). The device holds that decoder's dictionary (regions + stream), the body and one
    piece — not a copy of the stream inside the decoder (it is fed in slices)."""
    rng = random.Random(12)
    v2 = fldelta2_apply
    old = rng.randbytes(v2.MAX_EXTRA_DICT)
    new = rng.randbytes(v2.MAX_CHUNK)
    size = v2.lzma_dict_size(len(old), len(new))
    coded = v2.REGION_COUNT.pack(1) + v2.REGION.pack(0, len(old)) + lzma_preset.compress(old, new, size)
    numbers = (b"\x00", b"\x00", fldelta2.varints(np.array([len(new)], dtype=np.uint64)))
    body = v2.STREAMS.pack(1) + b"".join(v2.STREAM.pack(0, len(n), len(n)) for n in numbers)
    body += v2.STREAM.pack(0, 0, 0) * 2 + v2.STREAM.pack(v2.CODEC_LZMA2_OLD, len(new), len(coded))
    body += b"".join(numbers) + coded
    from fleetloop_shared.update.delta_format import HEADER

    patch = (
        HEADER.pack(v2.MAGIC, len(new), len(old), len(new), 1)
        + v2.CHUNK.pack(v2.METHOD_STREAMS, len(new), len(body))
        + body
    )
    largest_write, largest_read, peak = _apply_traced(old, new, patch)
    assert largest_write <= v2.FLUSH and largest_read <= v2.FLUSH
    # ... and the streams' pieces: the output buffer and the copy handed on, a decoded piece and its slice
    bound = size + len(body) + 4 * v2.FLUSH
    assert len(body) > len(new) and peak < bound < 26 << 20, (peak, bound)


@settings(max_examples=200, deadline=None)
@given(
    old=st.binary(min_size=64, max_size=512),
    steps=st.lists(st.tuples(st.integers(0, 511), st.integers(0, 80), st.binary(max_size=40)), max_size=30),
    shortest=st.integers(1, 48),
)
def test_absorbing_short_copies_rebuilds_the_same_bytes(
    old: bytes, steps: list[tuple[int, int, bytes]], shortest: int
) -> None:
    """Tuples as bsdiff makes them (a copy from anywhere in the old image plus a diff, then extra bytes)
    rebuild the same new bytes once the short copies are extra bytes; each absorbed copy is named by
    where it read the old image."""
    rng = random.Random(len(steps))
    rows, new, diff, extra, pos = [], bytearray(), bytearray(), bytearray(), 0
    for at, x, added in steps:
        at, x = min(at, len(old) - 1), min(x, len(old) - min(at, len(old) - 1))
        if x + len(added) == 0:
            continue
        d = bytes(rng.choice((0, 0, 0, 1)) for _ in range(x))
        rows.append((at - pos, x, len(added)))
        new += bytes((o + k) & 0xFF for o, k in zip(old[at : at + x], d, strict=True)) + added
        diff += d
        extra += added
        pos = at + x
    tuples = np.array(rows, dtype=np.int64).reshape(-1, 3)
    t, d, e, sources = fldelta2.absorb_short_copies(tuples, bytes(diff), bytes(extra), bytes(new), shortest)
    assert rebuilt(old, t, d, e) == new
    assert (t[1:, 1] >= shortest).all() and len(t) + len(sources) <= max(len(tuples), 1)
    for start, length in sources.tolist():
        assert start >= 0 and start + length <= len(old)


def rebuilt(old: bytes, tuples: npt.NDArray[np.int64], diff: bytes, extra: bytes) -> bytes:
    """bsdiff's apply, the plainest way (the container's reading of streams tuples)."""
    out, pos, at_diff, at_extra = bytearray(), 0, 0, 0
    for seek, x, y in tuples.tolist():
        pos += seek
        copied = zip(old[pos : pos + x], diff[at_diff : at_diff + x], strict=True)
        out += bytes((o + k) & 0xFF for o, k in copied)
        out += extra[at_extra : at_extra + y]
        pos, at_diff, at_extra = pos + x, at_diff + x, at_extra + y
    assert at_diff == len(diff) and at_extra == len(extra)
    return bytes(out)
