"""FLDELTA2 on the device: rebuild the new image from the running slot, streaming, in bounded memory.

FLDELTA2 copies may address *any* offset of the old image (the cloud searches all of it:
:mod:`fleetloop_shared.update.fldelta2`). The device never holds the old image: the old slot is on its
own disk and is read with positioned reads through a small buffer, the new image is handed to ``write``
in pieces of at most :data:`FLUSH` bytes (the driver hashes and writes them into the other slot), and
every stream inside the patch is decoded piece by piece (:class:`~fleetloop_shared.update.inflate.Inflow`).
What memory a patch can make the device use is fixed by this module's constants, not by the image:
one chunk body (≤ :func:`max_body` of :data:`MAX_CHUNK`, ~8.2 MiB) and either the decoders of one
chunk's streams (≤ 1 MiB buffers; an extra stream coded against old regions, an LZMA2 decoder whose
dictionary holds those regions and the stream, ≤ :data:`MAX_EXTRA_DICT` + :data:`MAX_CHUNK`), or one
zstd output chunk (≤ :data:`MAX_CHUNK`) and a patch-from dictionary (≤ :data:`MAX_DICT`; built once,
copied once by zstd), or an LZMA2 decoder whose dictionary holds the old regions and the chunk
(≤ :data:`MAX_DICT` + :data:`MAX_CHUNK`) and ≤ 1 MiB of its output — under 26 MiB in all.

An lzma-patch chunk needs nothing beyond the standard library: the encoder presets LZMA2's dictionary
with the old regions (:mod:`fleetloop_shared.update.lzma_preset`, cloud only); the device gets the
decoder into the same state by feeding it those regions first as LZMA2 *uncompressed* chunks
(:func:`dictionary_prefix`), whose output it discards, then the stream.

Container (all integers little-endian)::

    magic "FLDELTA2" | new_size u64 | old_size u64 | chunk_size u32 | chunk_count u32
    per chunk: method u8 | out_len u32 | body_len u32 | body
      method 0, zstd:       a zstd frame (content size declared), no dictionary
      method 1, zstd-patch: region_count u16 | region_count × (offset u64 | length u32) | a zstd frame
                            whose raw-content dictionary is those old regions, concatenated in order
      method 3, lzma-patch: region_count u16 | region_count × (offset u64 | length u32) | a raw LZMA2
                            stream (end mark included) whose dictionary starts out holding those old
                            regions, concatenated in order (none: plain LZMA2); the dictionary is
                            sized :func:`lzma_dict_size` of the regions and the chunk
      method 2, streams:    tuple_count u32 | 6 × (codec u8 | raw_len u32 | packed_len u32) | 6 streams:
                            seeks, copy lengths, add lengths (LEB128 varints; seeks zigzag-signed),
                            diff runs (varints), diff bytes, extra bytes;
                            codec: 0 stored, 1 zstd, 2 bzip2, 3 LZMA2 (raw), 4 (extra bytes
                            only) LZMA2 against old regions: region_count u16 | region_count ×
                            (offset u64 | length u32) | a raw LZMA2 stream whose dictionary starts out
                            holding those regions (≤ MAX_EXTRA_DICT in all), sized
                            :func:`lzma_dict_size` of the regions and the stream's raw length

A streams chunk is bsdiff's idea with whole-image reach: an old position starts at 0; each tuple
``(seek, x, y)`` moves it by ``seek``, appends ``x`` bytes of old + diff (bytewise, mod 256: a relocated
pointer differs in a few bytes), moves it by ``x``, then appends ``y`` bytes of extra. Every tuple
appends at least one byte. The diff is mostly zeros: with an empty *diff runs* stream the diff bytes are
the diff itself; otherwise the diff is rebuilt from runs alternately of zeros and of the diff bytes
(starting with zeros), which LZMA2 codes in a tenth of the time it takes on the zeros themselves. The
extra bytes may be coded against old regions (codec 4): the encoder turns copies too short to pay for
their tuple into extra bytes and presets the coder's dictionary with the old blocks they came from.

Hostile input: the header, each chunk header, each region and each tuple is checked against the old
image, the output and the declared lengths *before* the read or allocation it would cause; every stream
must decode to exactly its declared length. Anything else is :class:`IntegrityError`.
"""

from __future__ import annotations

import lzma
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO

import numpy as np

from fleetloop_shared.errors import IntegrityError
from fleetloop_shared.update.delta_format import ChunkedContainer, read_exact
from fleetloop_shared.update.inflate import CODEC_LZMA2, Inflow, unzstd, unzstd_patch

MAGIC = b"FLDELTA2"
CHUNK = struct.Struct("<BII")
REGION = struct.Struct("<QI")
REGION_COUNT = struct.Struct("<H")
STREAMS = struct.Struct("<I")
STREAM = struct.Struct("<BII")
STREAM_NAMES = ("seeks", "copy lengths", "add lengths", "diff runs", "diff", "extra")

METHOD_ZSTD = 0
METHOD_ZSTD_PATCH = 1
METHOD_STREAMS = 2
METHOD_LZMA_PATCH = 3
METHOD_NAMES = {
    METHOD_ZSTD: "zstd",
    METHOD_ZSTD_PATCH: "zstd-patch",
    METHOD_STREAMS: "streams",
    METHOD_LZMA_PATCH: "lzma-patch",
}

#: Largest output chunk a patch may declare (the device holds at most one zstd chunk decoded).
MAX_CHUNK = 8 << 20
#: Largest patch-from dictionary (old regions) a chunk may ask the device to assemble.
MAX_DICT = 8 << 20
MAX_REGIONS = 1024
#: Largest dictionary of old regions an extra stream (codec 4) may ask for.
MAX_EXTRA_DICT = 2 << 20
#: Codec of an extra stream coded against old regions (see the container above).
CODEC_LZMA2_OLD = 4
#: Output handed to ``write`` per call, and the largest positioned read of the old image.
FLUSH = 1 << 20
_VARINT_MAX = 10
#: An LZMA2 uncompressed chunk holds at most this many bytes.
_LZMA2_RAW = 1 << 16


def lzma_dict_size(regions: int, out_len: int) -> int:
    """LZMA2 dictionary of an lzma-patch chunk: its old regions and its output, so that every distance the
    encoder may use is in reach. Both ends compute it from the declared lengths (never from the stream),
    which bounds what the decoder allocates."""
    return max(4096, regions + out_len)


def dictionary_prefix(pieces: Iterable[bytes]) -> Iterator[bytes]:
    """Old bytes as LZMA2 uncompressed chunks (the first resets the dictionary, the rest keep it)."""
    first = True
    for piece in pieces:
        for at in range(0, len(piece), _LZMA2_RAW):
            part = piece[at : at + _LZMA2_RAW]
            yield bytes((1 if first else 2,)) + (len(part) - 1).to_bytes(2, "big") + part
            first = False


def max_body(out_len: int) -> int:
    """The largest chunk body that can be honest: plain zstd of the chunk always fits (zstd's bound),
    plus a region table."""
    return out_len + (out_len >> 7) + (1 << 16) + REGION_COUNT.size + MAX_REGIONS * REGION.size


class _Varints:
    """LEB128 integers out of an :class:`Inflow`, a piece at a time."""

    def __init__(self, stream: Inflow) -> None:
        self.stream = stream
        self.buf = b""
        self.i = 0

    def next(self) -> int:
        value = shift = 0
        for _ in range(_VARINT_MAX):
            if self.i >= len(self.buf):
                if not self.stream.left:
                    raise IntegrityError(f"delta is malformed: {self.stream.what} ends inside a number")
                self.buf, self.i = self.stream.read(min(1 << 16, self.stream.left)), 0
            byte = self.buf[self.i]
            self.i += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7
        raise IntegrityError(f"delta is malformed: {self.stream.what} holds a number over 64 bits")

    def finish(self) -> None:
        if self.i != len(self.buf):
            raise IntegrityError(f"delta is malformed: {self.stream.what} has numbers nobody read")
        self.stream.finish()


class _SparseDiff:
    """The diff rebuilt from runs of zeros and of literal bytes (see the module docstring)."""

    def __init__(self, runs: Inflow, literal: Inflow) -> None:
        self.runs = _Varints(runs)
        self.literal = literal
        self.zeros = True  # the kind of the current run
        self.left = 0  # bytes left in it
        self.started = False

    def read(self, n: int) -> bytes:
        parts: list[bytes] = []
        while n:
            if not self.left:
                if self.started:
                    self.zeros = not self.zeros
                self.started = True
                self.left = self.runs.next()
                continue
            take = min(n, self.left)
            parts.append(bytes(take) if self.zeros else self.literal.read(take))
            self.left -= take
            n -= take
        return b"".join(parts)

    def finish(self) -> None:
        if self.left:
            raise IntegrityError("delta is malformed: diff runs are longer than the copies")
        self.runs.finish()
        self.literal.finish()


def _read_old(old: BinaryIO, pos: int, n: int) -> bytes:
    old.seek(pos)
    data = old.read(n)
    if len(data) != n:
        raise IntegrityError("the installed image is shorter than it was when the delta was checked")
    return data


def _streams(old: BinaryIO, old_size: int, body: bytes, out_len: int) -> tuple[int, list[Inflow]]:
    """The tuple count and the six streams of a streams chunk, every declared length checked."""
    n = len(STREAM_NAMES)
    if len(body) < STREAMS.size + n * STREAM.size:
        raise IntegrityError("delta is malformed: streams chunk shorter than its header")
    (tuples,) = STREAMS.unpack_from(body)
    if tuples > out_len:
        raise IntegrityError(f"delta is malformed: {tuples} tuples cannot build {out_len} bytes")
    heads = [STREAM.unpack_from(body, STREAMS.size + i * STREAM.size) for i in range(n)]
    offset = STREAMS.size + n * STREAM.size
    if offset + sum(h[2] for h in heads) != len(body):
        raise IntegrityError("delta is malformed: stream lengths do not add up to the chunk body")
    limits = (_VARINT_MAX * tuples,) * 3 + (_VARINT_MAX * (out_len + 1), out_len, out_len)
    streams = []
    for (codec, raw_len, packed_len), limit, name in zip(heads, limits, STREAM_NAMES, strict=True):
        if raw_len > limit:
            raise IntegrityError(f"delta is malformed: {name} of {raw_len} bytes exceeds {limit}")
        packed = memoryview(body)[offset : offset + packed_len]
        offset += packed_len
        if codec != CODEC_LZMA2_OLD:
            streams.append(Inflow(codec, packed, raw_len, name))
            continue
        if name != STREAM_NAMES[-1]:
            raise IntegrityError(f"delta is malformed: {name} coded against old regions (extra bytes only)")
        regions, total, start = _dictionary_regions(packed, old_size, budget=MAX_EXTRA_DICT)
        decoder = _primed_decoder(old, regions, lzma_dict_size(total, raw_len), name)
        streams.append(Inflow(CODEC_LZMA2, packed[start:], raw_len, name, primed=decoder))
    return tuples, streams


def _apply_streams(
    old: BinaryIO, old_size: int, body: bytes, out_len: int, write: Callable[[bytes], object]
) -> None:
    tuples, (seeks_s, xs_s, ys_s, runs, literal, extra) = _streams(old, old_size, body, out_len)
    seeks, xs, ys = _Varints(seeks_s), _Varints(xs_s), _Varints(ys_s)
    diff: Inflow | _SparseDiff = _SparseDiff(runs, literal) if runs.left else literal
    if diff is literal:
        runs.finish()
    pos = produced = fill = 0
    out = bytearray(FLUSH)  # one output buffer, filled in place and handed on whenever it is full
    for _ in range(tuples):
        zig = seeks.next()
        pos += (zig >> 1) ^ -(zig & 1)
        x = xs.next()
        y = ys.next()
        if x + y == 0 or produced + x + y > out_len:
            raise IntegrityError("delta is malformed: a tuple builds nothing or past the chunk")
        if x and (pos < 0 or pos + x > old_size):
            raise IntegrityError(f"delta is malformed: copy of {x} bytes at {pos} is outside the old image")
        produced += x + y
        while x:
            n = min(x, FLUSH - fill)
            target = np.frombuffer(out, dtype=np.uint8, count=n, offset=fill)
            np.add(
                np.frombuffer(_read_old(old, pos, n), dtype=np.uint8),
                np.frombuffer(diff.read(n), dtype=np.uint8),
                out=target,
            )
            pos, x, fill = pos + n, x - n, fill + n
            if fill == FLUSH:
                write(bytes(out))
                fill = 0
        while y:
            n = min(y, FLUSH - fill)
            out[fill : fill + n] = extra.read(n)
            y, fill = y - n, fill + n
            if fill == FLUSH:
                write(bytes(out))
                fill = 0
    if produced != out_len:
        raise IntegrityError(f"delta is malformed: tuples build {produced} of {out_len} bytes")
    for v in (seeks, xs, ys):
        v.finish()
    diff.finish()
    extra.finish()
    if fill:
        write(bytes(memoryview(out)[:fill]))


def _dictionary_regions(
    body: bytes | memoryview, old_size: int, *, least: int = 1, budget: int = MAX_DICT
) -> tuple[list[tuple[int, int]], int, int]:
    """The old regions a patch chunk or an extra stream starts with, checked against the old image and
    ``budget``; returns (regions, dictionary size, where the coded stream starts)."""
    if len(body) < REGION_COUNT.size:
        raise IntegrityError("delta is malformed: region table shorter than its header")
    (count,) = REGION_COUNT.unpack_from(body)
    start = REGION_COUNT.size + count * REGION.size
    if not least <= count <= MAX_REGIONS or start > len(body):
        raise IntegrityError(f"delta is malformed: {count} dictionary regions")
    regions = []
    total = 0
    for i in range(count):
        offset, length = REGION.unpack_from(body, REGION_COUNT.size + i * REGION.size)
        total += length
        if length == 0 or offset + length > old_size:
            raise IntegrityError(
                f"delta is malformed: dictionary region {offset}+{length} is empty or outside the old image"
            )
        if total > budget:
            raise IntegrityError(f"delta is malformed: dictionary regions over {budget} bytes in all")
        regions.append((offset, length))
    return regions, total, start


def _old_pieces(old: BinaryIO, regions: list[tuple[int, int]], size: int) -> Iterator[bytes]:
    """The regions' bytes, read from the old slot at most ``size`` bytes at a time."""
    for offset, length in regions:
        for at in range(offset, offset + length, size):
            yield _read_old(old, at, min(size, offset + length - at))


def _apply_zstd_patch(old: BinaryIO, old_size: int, body: bytes, out_len: int) -> bytes:
    regions, total, start = _dictionary_regions(body, old_size)

    def fill(buf: memoryview) -> None:
        at = 0
        for piece in _old_pieces(old, regions, FLUSH):
            buf[at : at + len(piece)] = piece
            at += len(piece)

    return unzstd_patch(body[start:], out_len, "zstd-patch chunk", total, fill)


def _primed_decoder(
    old: BinaryIO, regions: list[tuple[int, int]], dict_size: int, what: str
) -> lzma.LZMADecompressor:
    """A raw LZMA2 decoder of ``dict_size`` whose dictionary holds the old ``regions``: fed them as
    uncompressed chunks, read from the old slot a piece at a time, their output dropped."""
    try:
        decoder = lzma.LZMADecompressor(
            format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "dict_size": dict_size}]
        )
        for part in dictionary_prefix(_old_pieces(old, regions, _LZMA2_RAW)):
            decoder.decompress(part)
    except (lzma.LZMAError, EOFError, ValueError) as exc:
        raise IntegrityError(f"delta is malformed: {what}: {exc}") from None
    return decoder


def _apply_lzma_patch(
    old: BinaryIO, old_size: int, body: bytes, out_len: int, write: Callable[[bytes], object]
) -> None:
    """Feed the decoder the old regions (output dropped), then the stream in :data:`_LZMA2_RAW` slices
    (the decoder keeps no copy of input it has not used); output in ≤ FLUSH pieces, never past the
    chunk's declared length by more than a byte."""
    regions, total, start = _dictionary_regions(body, old_size, least=0)
    decoder = _primed_decoder(old, regions, lzma_dict_size(total, out_len), "lzma-patch chunk")
    stream = memoryview(body)[start:]
    produced = fed = 0

    def decode(data: bytes | memoryview, limit: int = -1) -> bytes:
        try:
            return decoder.decompress(data, max_length=limit)
        except (lzma.LZMAError, EOFError, ValueError) as exc:
            raise IntegrityError(f"delta is malformed: lzma-patch chunk is corrupt ({exc})") from None

    while not decoder.eof:
        data: bytes | memoryview = b""
        if decoder.needs_input:
            if fed == len(stream):
                raise IntegrityError("delta is malformed: lzma-patch chunk is truncated")
            data, fed = stream[fed : fed + _LZMA2_RAW], min(len(stream), fed + _LZMA2_RAW)
        piece = decode(data, min(FLUSH, out_len - produced + 1))
        produced += len(piece)
        if produced > out_len:
            raise IntegrityError(f"delta is malformed: lzma-patch chunk expands past {out_len} bytes")
        if piece:
            write(piece)
    if decoder.unused_data or fed < len(stream):
        raise IntegrityError("delta is malformed: lzma-patch chunk has trailing bytes")
    if produced != out_len:
        raise IntegrityError(f"delta is malformed: chunk decodes to {produced} of {out_len} bytes")


def _apply_chunk(
    old: BinaryIO, old_size: int, patch: BinaryIO, write: Callable[[bytes], object], expected: int
) -> None:
    """One chunk, by its method: streams against the old image, LZMA2 or zstd patch-from, plain zstd."""
    method, out_len, body_len = CHUNK.unpack(read_exact(patch, CHUNK.size, "chunk header"))
    if out_len != expected:
        raise IntegrityError("delta is malformed: chunk length out of bounds")
    if body_len > max_body(out_len):
        raise IntegrityError(f"delta is malformed: chunk body of {body_len} bytes is impossible")
    body = read_exact(patch, body_len, "chunk body")
    if method == METHOD_STREAMS:
        _apply_streams(old, old_size, body, out_len, write)
    elif method == METHOD_LZMA_PATCH:
        _apply_lzma_patch(old, old_size, body, out_len, write)
    elif method in (METHOD_ZSTD, METHOD_ZSTD_PATCH):
        if method == METHOD_ZSTD:
            data = unzstd(body, out_len, "zstd chunk")
        else:
            data = _apply_zstd_patch(old, old_size, body, out_len)
        if len(data) != out_len:
            raise IntegrityError(f"delta is malformed: chunk decodes to {len(data)} of {out_len} bytes")
        write(data)
    else:
        raise IntegrityError(f"delta is malformed: unknown chunk method {method}")


#: How a device reads an FLDELTA2 patch (``READER.decode``).
READER = ChunkedContainer(MAGIC, MAX_CHUNK, _apply_chunk)
