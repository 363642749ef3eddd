"""Hostile deltas: every offset and length is checked before the read or allocation it would cause, and
garbage of any kind is IntegrityError, never another exception (FLDELTA2 and FLDELTA1 alike)."""

from __future__ import annotations

import bz2
import lzma
import random
import struct
from collections.abc import Sequence
from unittest import mock

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetloop_fwsim.code_image import image_pair
from fleetloop_shared.errors import IntegrityError
from fleetloop_shared.update import fldelta2_apply as v2
from fleetloop_shared.update import lzma_preset
from fleetloop_shared.update.delta import FLDELTA1, apply_delta, make_delta
from fleetloop_shared.update.delta_format import HEADER
from fleetloop_shared.update.fldelta2 import varints
from fleetloop_shared.update.inflate import CODEC_BZIP2, CODEC_STORED, CODEC_ZSTD

OLD = bytes(range(256)) * 16  # 4 KiB


def container(new_size: int, chunks: Sequence[tuple[int, int, bytes]], *, old_size: int = len(OLD)) -> bytes:
    chunk = max([out for _, out, _ in chunks] + [1])
    head = HEADER.pack(v2.MAGIC, new_size, old_size, chunk, len(chunks))
    return head + b"".join(v2.CHUNK.pack(m, out, len(body)) + body for m, out, body in chunks)


def uleb(*values: int) -> bytes:
    import numpy as np

    return varints(np.array(values, dtype=np.uint64))


def streams(
    tuples: Sequence[tuple[int, int, int]],
    diff: bytes = b"",
    extra: bytes = b"",
    runs: bytes = b"",
    *,
    codecs: Sequence[int] = (CODEC_STORED,) * 6,
    raw_lens: Sequence[int] | None = None,
    against: Sequence[tuple[int, int]] = (),
) -> bytes:
    """A streams body; ``against``: old regions the codec-4 stream is coded against."""
    zig = [(s << 1) ^ (s >> 63) for s, _, _ in tuples]
    raws = [uleb(*zig), uleb(*(x for _, x, _ in tuples)), uleb(*(y for _, _, y in tuples)), runs, diff, extra]
    packed = []
    for codec, raw in zip(codecs, raws, strict=True):
        if codec == CODEC_ZSTD:
            packed.append(zstandard.ZstdCompressor().compress(raw))
        elif codec == CODEC_BZIP2:
            packed.append(bz2.compress(raw))
        elif codec == v2.CODEC_LZMA2_OLD:
            dictionary = b"".join(OLD[a : a + n] for a, n in against)
            table = v2.REGION_COUNT.pack(len(against)) + b"".join(v2.REGION.pack(a, n) for a, n in against)
            size = v2.lzma_dict_size(sum(n for _, n in against), len(raw))
            packed.append(table + lzma_preset.compress(dictionary, raw, size))
        else:
            packed.append(raw)
    lens = raw_lens or [len(r) for r in raws]
    head = v2.STREAMS.pack(len(tuples)) + b"".join(
        v2.STREAM.pack(c, n, len(p)) for c, n, p in zip(codecs, lens, packed, strict=True)
    )
    return head + b"".join(packed)


def test_a_crafted_streams_chunk_applies() -> None:
    """The helpers above make valid patches: the refusals below are for the one thing each breaks."""
    body = streams([(10, 20, 3)], diff=bytes(20), extra=b"new")
    assert apply_delta(OLD, container(23, [(v2.METHOD_STREAMS, 23, body)])) == OLD[10:30] + b"new"


@pytest.mark.parametrize(
    ("body", "out", "message"),
    [
        (streams([(len(OLD) - 5, 10, 0)], diff=bytes(10)), 10, "outside the old image"),
        (streams([(-1, 10, 0)], diff=bytes(10)), 10, "outside the old image"),
        (streams([(0, 0, 0), (0, 5, 0)], diff=bytes(5)), 5, "builds nothing"),
        (streams([(0, 8, 8)], diff=bytes(8), extra=bytes(8)), 12, "past the chunk"),
        (streams([(0, 4, 0)], diff=bytes(4)), 6, "build 4 of 6 bytes"),
        (streams([(0, 4, 0)], diff=bytes(6)), 6, "nobody read|do not add up|build 4 of 6"),
        (streams([(0, 4, 0)], diff=bytes(2)), 4, "read past its 2 bytes"),
        (streams([(0, 4, 0)], diff=bytes(4), raw_lens=[1, 1, 1, 0, 9, 0]), 4, "diff of 9 bytes exceeds 4"),
        (streams([(0, 4, 0)], diff=bytes(4), raw_lens=[1, 1, 1, 0, 3, 0]), 4, "not 3 bytes"),
        (streams([(0, 2, 0)] * 3, diff=bytes(6)), 2, "cannot build"),
        (streams([(0, 4, 0)], diff=b"\x01\x02", runs=uleb(1, 2, 1)), 4, None),  # valid: the sparse form
        (streams([(0, 4, 0)], diff=b"\x01\x02", runs=uleb(1, 2, 5)), 4, "longer than the copies"),
        (streams([(0, 4, 0)], diff=b"\x01\x02", runs=uleb(1, 2)), 4, "ends inside a number"),
        (streams([(0, 4, 0)], diff=bytes(4))[:-1], 4, "do not add up"),
        (streams([(0, 4, 0)], diff=bytes(4)) + b"x", 4, "do not add up"),
        (b"\x00" * 10, 4, "shorter than its header"),
    ],
)
def test_streams_chunks_that_lie_are_refused(body: bytes, out: int, message: str | None) -> None:
    patch = container(out, [(v2.METHOD_STREAMS, out, body)])
    if message is None:
        assert apply_delta(OLD, patch) == bytes(x + y for x, y in zip(OLD, b"\x00\x01\x02\x00", strict=False))
        return
    with pytest.raises(IntegrityError, match=message):
        apply_delta(OLD, patch)


EXTRA_AGAINST_OLD = (0, 0, 0, 0, 0, v2.CODEC_LZMA2_OLD)


def test_extra_bytes_coded_against_old_regions_apply_and_lies_about_them_are_refused() -> None:
    extra = OLD[100:300] + b"new" + OLD[2000:2100]
    body = streams([(10, 20, len(extra))], diff=bytes(20), extra=extra, codecs=EXTRA_AGAINST_OLD,
                   against=[(0, 1024), (1536, 1024)])  # fmt: skip
    coded = v2.STREAM.unpack_from(body, v2.STREAMS.size + 5 * v2.STREAM.size)[2]
    assert coded < 80 < len(lzma.compress(extra, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}]))
    out = len(extra) + 20
    assert apply_delta(OLD, container(out, [(v2.METHOD_STREAMS, out, body)])) == OLD[10:30] + extra
    lies = [
        (streams([(10, 20, 3)], diff=bytes(20), extra=b"new", codecs=(0, 0, 0, 0, 4, 0), against=[(0, 64)]),
         "diff coded against old regions"),
        (streams([(10, 20, 3)], diff=bytes(20), extra=b"new", codecs=EXTRA_AGAINST_OLD,
                 against=[(len(OLD) - 10, 64)]), "outside the old image"),
        (streams([(10, 20, 3)], diff=bytes(20), extra=b"new", codecs=EXTRA_AGAINST_OLD, against=[]),
         "0 dictionary regions"),
    ]  # fmt: skip
    for bad, message in lies:
        with pytest.raises(IntegrityError, match=message):
            apply_delta(OLD, container(23, [(v2.METHOD_STREAMS, 23, bad)]))
    # more old bytes than a device holds for an extra stream: refused before any is read
    table = v2.REGION_COUNT.pack(2) + v2.REGION.pack(0, 2 << 20) + v2.REGION.pack(2 << 20, 1)
    head = v2.STREAMS.pack(1) + b"".join(v2.STREAM.pack(0, 1, 1) for _ in range(3))
    head += v2.STREAM.pack(0, 0, 0) + v2.STREAM.pack(0, 0, 0) + v2.STREAM.pack(4, 3, len(table) + 5)
    big = head + b"\x00\x03\x00" + table + bytes(5)
    with pytest.raises(IntegrityError, match="over 2097152 bytes"):
        apply_delta(bytes(3 << 20), container(3, [(v2.METHOD_STREAMS, 3, big)], old_size=3 << 20))


def test_a_number_over_64_bits_is_refused() -> None:
    raw = b"\xff" * 11 + b"\x01"
    body = v2.STREAMS.pack(1) + v2.STREAM.pack(CODEC_STORED, len(raw), len(raw))
    body += b"".join(v2.STREAM.pack(CODEC_STORED, 0, 0) for _ in range(5)) + raw
    with pytest.raises(IntegrityError, match=r"over 64 bits|exceeds"):
        apply_delta(OLD, container(4, [(v2.METHOD_STREAMS, 4, body)]))


def test_a_bomb_in_a_stream_is_refused_before_it_expands() -> None:
    bomb = streams([(0, 4, 0)], diff=bytes(4 << 20), codecs=(0, 0, 0, 0, CODEC_BZIP2, 0), raw_lens=None)
    with pytest.raises(IntegrityError, match="exceeds"):
        apply_delta(OLD, container(4, [(v2.METHOD_STREAMS, 4, bomb)]))
    lying = streams(
        [(0, 4, 0)], diff=bytes(4 << 20), codecs=(0, 0, 0, 0, CODEC_ZSTD, 0), raw_lens=[1, 1, 1, 0, 4, 0]
    )
    with pytest.raises(IntegrityError, match=r"expands past|nobody read|too much memory"):
        apply_delta(OLD, container(4, [(v2.METHOD_STREAMS, 4, lying)]))


def _patch_body(regions: Sequence[tuple[int, int]], frame: bytes) -> bytes:
    return v2.REGION_COUNT.pack(len(regions)) + b"".join(v2.REGION.pack(o, n) for o, n in regions) + frame


def _frame(data: bytes, dictionary: bytes = b"", *, size: bool = True) -> bytes:
    d = (
        zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        if dictionary
        else None
    )
    return zstandard.ZstdCompressor(dict_data=d, write_content_size=size).compress(data)


@pytest.mark.parametrize(
    ("method", "body", "out", "message"),
    [
        (
            v2.METHOD_ZSTD_PATCH,
            _patch_body([(len(OLD) - 10, 20)], _frame(b"abcd")),
            4,
            "outside the old image",
        ),
        (v2.METHOD_ZSTD_PATCH, _patch_body([(0, 0)], _frame(b"abcd")), 4, "outside the old image"),
        (v2.METHOD_ZSTD_PATCH, _patch_body([], _frame(b"abcd")), 4, "0 dictionary regions"),
        (v2.METHOD_ZSTD_PATCH, v2.REGION_COUNT.pack(5) + b"\x00" * 8, 4, "5 dictionary regions"),
        (v2.METHOD_ZSTD_PATCH, _patch_body([(0, 64)], _frame(OLD[:64] * 2, OLD[:64])), 4, "expands past"),
        (v2.METHOD_ZSTD, _frame(b"x" * (8 << 20)), 100, "expands past 100 bytes"),
        (v2.METHOD_ZSTD, _frame(b"abcd", size=False), 4, "does not declare its size"),
        (v2.METHOD_ZSTD, _frame(b"abc"), 4, "decodes to 3 of 4 bytes"),
        (v2.METHOD_ZSTD, b"\x28\xb5\x2f\xfd" + b"\x00" * 20, 4, "zstd"),
        (7, b"", 4, "unknown chunk method 7"),
    ],
)
def test_zstd_chunks_that_lie_are_refused(method: int, body: bytes, out: int, message: str) -> None:
    with pytest.raises(IntegrityError, match=message):
        apply_delta(OLD, container(out, [(method, out, body)]))


def _lzma(data: bytes) -> bytes:
    """A raw LZMA2 stream made by the standard library (it resets the dictionary: regions are unused)."""
    return lzma.compress(data, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "dict_size": 4096}])


@pytest.mark.parametrize(
    ("body", "out", "message"),
    [
        (_patch_body([(len(OLD) - 10, 20)], _lzma(b"abcd")), 4, "outside the old image"),
        (_patch_body([(0, 0)], _lzma(b"abcd")), 4, "outside the old image"),
        (v2.REGION_COUNT.pack(5) + b"\x00" * 8, 4, "5 dictionary regions"),
        (b"\x00", 4, "shorter than its header"),
        (_patch_body([], _lzma(b"x" * (4 << 20))), 100, "expands past 100 bytes"),
        (_patch_body([(0, 64)], _lzma(b"abc")), 4, "decodes to 3 of 4 bytes"),
        (_patch_body([], _lzma(b"abcd")[:-3]), 4, "truncated|corrupt"),
        (_patch_body([], _lzma(b"abcd") + b"!!"), 4, "trailing bytes"),
        (_patch_body([], b"\xff" * 40), 4, "corrupt"),
        (_patch_body([(0, 16)], b"\xc0\x00\x03\x00\x05\x5d" + b"\x00" * 12), 4, "corrupt|truncated"),
    ],
)
def test_lzma_patch_chunks_that_lie_are_refused(body: bytes, out: int, message: str) -> None:
    with pytest.raises(IntegrityError, match=message):
        apply_delta(OLD, container(out, [(v2.METHOD_LZMA_PATCH, out, body)]))


@pytest.mark.parametrize("method", [v2.METHOD_ZSTD_PATCH, v2.METHOD_LZMA_PATCH])
def test_dictionary_regions_over_the_budget_are_refused(method: int) -> None:
    """Nine 1 MiB regions, each inside a 9 MiB old image: together over the 8 MiB a device assembles."""
    old = bytes(9 << 20)
    body = _patch_body([(i << 20, 1 << 20) for i in range(9)], _lzma(b"abcd"))
    with pytest.raises(IntegrityError, match="dictionary regions over 8388608 bytes in all"):
        apply_delta(old, container(4, [(method, 4, body)], old_size=len(old)))
    within = _patch_body([(i << 20, 1 << 20) for i in range(8)], _lzma(b"abcd"))
    assert apply_delta(old, container(4, [(v2.METHOD_LZMA_PATCH, 4, within)], old_size=len(old))) == b"abcd"


@settings(max_examples=60, deadline=None)
@given(
    old=st.binary(max_size=3 << 16),
    new=st.binary(max_size=1 << 15),
    cut=st.integers(0, 3 << 16),
)
def test_a_preset_dictionary_is_what_uncompressed_chunks_leave(old: bytes, new: bytes, cut: int) -> None:
    """What the cloud codes with liblzma's preset dictionary, the device decodes with the standard
    library after feeding the regions as uncompressed chunks (any length: 0, under, at and over 64 KiB)."""
    region = old[: cut % (len(old) + 1)]
    new = new + region[len(region) // 3 :]  # something to find in the dictionary
    size = v2.lzma_dict_size(len(region), len(new))
    stream = lzma_preset.compress(region, new, size)
    decoder = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "dict_size": size}])
    prefix = b"".join(v2.dictionary_prefix([region[:1000], region[1000:]]))
    assert decoder.decompress(prefix + stream) == region + new
    assert decoder.eof and not decoder.unused_data


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (b"", "bad magic"),
        (b"garbage!", "bad magic"),
        (v2.MAGIC, "truncated in header"),
        (HEADER.pack(v2.MAGIC, 1 << 40, len(OLD), 1 << 20, 1 << 20), "exceeds the limit"),
        (HEADER.pack(v2.MAGIC, 10, len(OLD) + 1, 1 << 20, 1), "base of 4097 bytes"),
        (HEADER.pack(v2.MAGIC, 10, len(OLD), 16 << 20, 1), "impossible chunk size"),
        (HEADER.pack(v2.MAGIC, 10, len(OLD), 4, 1), "impossible chunk size or count"),
        (
            HEADER.pack(v2.MAGIC, 10, len(OLD), 16, 1) + v2.CHUNK.pack(0, 9, 0),
            "chunk length out of bounds",
        ),
        (HEADER.pack(v2.MAGIC, 10, len(OLD), 16, 1) + v2.CHUNK.pack(0, 10, 1 << 30), "is impossible"),
        (HEADER.pack(v2.MAGIC, 10, len(OLD), 16, 1) + v2.CHUNK.pack(0, 10, 50), "truncated in chunk body"),
        (container(4, [(v2.METHOD_ZSTD, 4, _frame(b"abcd"))]) + b"!", "trailing bytes"),
    ],
)
def test_containers_that_lie_are_refused(patch: bytes, message: str) -> None:
    with pytest.raises(IntegrityError, match=message):
        apply_delta(OLD, patch, max_size=1 << 30)


@pytest.fixture(scope="module")
def real_patches() -> list[tuple[bytes, bytes]]:
    """Real patches (old image, FLDELTA2 patch) whose chunks use every method, small enough to fuzz: the
    zstd methods are what an encoder without liblzma makes."""
    rng = random.Random(2)
    old, new = image_pair("grow", size=96 << 10, seed=4)
    mosaic = b"".join(old[p : p + 20] for p in (rng.randrange(len(old) - 20) for _ in range(900)))
    mixed = new[:20_000] + mosaic + b"abc" * 5000
    made = [(old, make_delta(old, new, chunk=1 << 14)), (old, make_delta(old, mixed, chunk=1 << 14))]
    with mock.patch.object(lzma_preset, "available", return_value=False):
        made.append((old, make_delta(old, mixed, chunk=1 << 14)))
    return made


def test_the_fuzzed_patches_use_every_method(real_patches: list[tuple[bytes, bytes]]) -> None:
    methods, extra_codecs = set(), set()
    for _, patch in real_patches:
        at = HEADER.size
        while at < len(patch):
            method, _, body_len = v2.CHUNK.unpack_from(patch, at)
            methods.add(method)
            if method == v2.METHOD_STREAMS:
                extra_head = at + v2.CHUNK.size + v2.STREAMS.size + 5 * v2.STREAM.size
                extra_codecs.add(v2.STREAM.unpack_from(patch, extra_head)[0])
            at += v2.CHUNK.size + body_len
    assert methods == {v2.METHOD_STREAMS, v2.METHOD_LZMA_PATCH, v2.METHOD_ZSTD_PATCH, v2.METHOD_ZSTD}
    assert v2.CODEC_LZMA2_OLD in extra_codecs  # extra bytes coded against old regions too


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_fldelta2_patches_raise_only_integrity_error(
    real_patches: list[tuple[bytes, bytes]], data: st.DataObject
) -> None:
    """Mutations of real patches: flipped bytes, runs overwritten, bytes inserted or cut, truncation."""
    old, patch = data.draw(st.sampled_from(real_patches))
    mutated = bytearray(patch)
    for _ in range(data.draw(st.integers(1, 6))):
        kind = data.draw(st.sampled_from(["flip", "byte", "run", "insert", "delete"]))
        pos = data.draw(st.integers(0, len(mutated) - 1))
        if kind == "flip":
            mutated[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "byte":
            mutated[pos] = data.draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]))
        elif kind == "run":
            mutated[pos : pos + 8] = data.draw(st.binary(min_size=8, max_size=8))
        elif kind == "insert":
            mutated[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
        else:
            del mutated[pos : pos + data.draw(st.integers(1, 64))]
    if data.draw(st.booleans()):
        mutated = mutated[: data.draw(st.integers(0, len(mutated)))]
    try:
        out = apply_delta(old, bytes(mutated), max_size=1 << 20)
    except IntegrityError:
        return
    assert isinstance(out, bytes)  # a mutation that still decodes: the signed hash catches it


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_fldelta1_patches_raise_only_integrity_error(data: st.DataObject) -> None:
    old = b"0123456789abcdef" * 64
    new = old[:300] + b"inserted" + old[300:900] + b"tail"
    good = bytearray(make_delta(old, new, format=FLDELTA1, chunk=512, margin=128))
    for _ in range(data.draw(st.integers(1, 8))):
        good[data.draw(st.integers(0, len(good) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(good)))
    patch = bytes(good[:cut]) if data.draw(st.booleans()) else bytes(good)
    try:
        apply_delta(old, patch, max_size=1 << 16)
    except IntegrityError:
        return


def test_fldelta1_bombs_and_windows_are_still_refused() -> None:
    header = struct.Struct("<8sQQII")
    chunk = struct.Struct("<BQIII")
    bomb = zstandard.ZstdCompressor(level=3).compress(b"\x00" * (8 << 20))
    patch = header.pack(b"FLDELTA1", 100, 3, 1 << 20, 1) + chunk.pack(0, 0, 3, 100, len(bomb)) + bomb
    with pytest.raises(IntegrityError, match="expands past 100 bytes"):
        apply_delta(b"old", patch)
    control = struct.pack("<qqq", 50, 0, 0)  # copy 50 bytes from a 3-byte window
    streams_ = [zstandard.ZstdCompressor().compress(x) for x in (control, b"\x00" * 50, b"")]
    body = struct.pack("<BBBIII", 0, 0, 0, *(len(s) for s in streams_)) + b"".join(streams_)
    patch = header.pack(b"FLDELTA1", 50, 3, 1 << 20, 1) + chunk.pack(2, 0, 3, 50, len(body)) + body
    with pytest.raises(IntegrityError, match="outside the old window"):
        apply_delta(b"old", patch)
