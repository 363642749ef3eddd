"""Bounded decompression of the streams inside a delta: never more bytes than declared, never a crash.

A delta arrives from the network and is decoded on the device, so every stream inside it is hostile
until proven otherwise: a few hundred bytes of zstd or bzip2 can claim gigabytes (a decompression bomb),
and a decoder's own memory grows with what the stream header asks for (zstd's window, LZMA's dictionary,
bzip2's block size). Here each stream is decoded against a limit the caller derives from the container,
in bounded pieces, with the decoder's memory capped, and every library error becomes
:class:`IntegrityError` ("delta is malformed: ..."). zstandard, bz2 and lzma errors are mapped here and
only here (the formats' own modules call these functions).

Two shapes: :func:`unzstd` / :func:`unbzip2` decode a whole (small, bounded) stream at once;
:class:`Inflow` hands a stream out piece by piece, so a chunk's control, diff and extra streams are read
side by side without any of them being held whole.
"""

from __future__ import annotations

import bz2
import io
import lzma
from collections.abc import Callable
from typing import Protocol

import zstandard

from fleetloop_shared.errors import IntegrityError

#: Stream codecs of FLDELTA2 (one byte before each stream).
CODEC_STORED = 0
CODEC_ZSTD = 1
CODEC_BZIP2 = 2
CODEC_LZMA2 = 3
#: Largest zstd window a stream may ask the device for (streams are at most one chunk long).
STREAM_WINDOW = 1 << 20
#: Largest window of a whole-chunk zstd frame: a patch-from dictionary plus the chunk.
FRAME_WINDOW = 1 << 24
#: Decoded bytes pulled from a decompressor per step.
_PIECE = 1 << 16


def lzma_filters(raw_len: int) -> list[dict[str, int]]:
    """The LZMA2 filter chain of a stream of ``raw_len`` bytes, for encoder and decoder alike.

    The dictionary is the stream's length rounded up to a power of two (a larger one finds nothing
    more), at most :data:`STREAM_WINDOW`: it is what the device's decoder allocates, so it follows from
    the declared length, not from a byte in the stream.
    """
    size = 1 << max(12, (max(raw_len, 1) - 1).bit_length())
    return [{"id": lzma.FILTER_LZMA2, "dict_size": min(size, STREAM_WINDOW)}]


def unzstd(
    body: bytes,
    limit: int,
    what: str,
    dictionary: bytes | zstandard.ZstdCompressionDict | None = None,
    *,
    window: int = FRAME_WINDOW,
) -> bytes:
    """Decompress one zstd frame whose content size is declared and at most ``limit`` bytes.

    The content size is read from the frame header before anything is allocated; the frame is then
    decoded in one call into a buffer of exactly that size (no streaming window).
    """
    try:
        size = zstandard.frame_content_size(body)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"delta is malformed: {what} is not a zstd frame ({exc})") from None
    if size < 0:
        raise IntegrityError(f"delta is malformed: {what} does not declare its size")
    if size > limit:
        raise IntegrityError(f"delta is malformed: {what} expands past {limit} bytes")
    try:
        if isinstance(dictionary, zstandard.ZstdCompressionDict):
            dctx = zstandard.ZstdDecompressor(dict_data=dictionary, max_window_size=window)
        elif dictionary:
            d = zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
            dctx = zstandard.ZstdDecompressor(dict_data=d, max_window_size=window)
        else:
            dctx = zstandard.ZstdDecompressor(max_window_size=window)
        data = dctx.decompress(body, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"delta is malformed: {what} is not valid zstd ({exc})") from None
    if len(data) != size:
        raise IntegrityError(f"delta is malformed: {what} decodes to {len(data)} bytes, not {size}")
    return data


def unzstd_patch(
    body: bytes, limit: int, what: str, dict_len: int, fill: Callable[[memoryview], None]
) -> bytes:
    """Decompress one zstd frame against a raw-content dictionary of ``dict_len`` bytes that ``fill``
    writes into the buffer it is given (positioned reads of the old image).

    The buffer is released as soon as zstd has its own copy, so the peak is two dictionaries before
    decoding and one dictionary plus the output while decoding.
    """
    buf = bytearray(dict_len)
    fill(memoryview(buf))
    try:
        d = zstandard.ZstdCompressionDict(buf, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"delta is malformed: {what}: dictionary refused ({exc})") from None
    del buf
    return unzstd(body, limit, what, d)


def unbzip2(body: bytes, limit: int, what: str) -> bytes:
    """Decompress one bzip2 stream, refusing more than ``limit`` bytes (bomb defence)."""
    return Inflow(CODEC_BZIP2, body, limit, what, exact=False).read_all()


class _Decoder(Protocol):
    @property
    def eof(self) -> bool: ...

    @property
    def needs_input(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes | memoryview, max_length: int = -1) -> bytes: ...


class Inflow:
    """One compressed stream read piece by piece: :meth:`read` returns exactly the bytes asked for.

    ``raw_len`` is the stream's declared decoded length; with ``exact`` (FLDELTA2) the stream must
    decode to exactly that, otherwise (FLDELTA1) to at most that. Reading past it, a stream that ends
    early, trailing bytes or a corrupt stream raise :class:`IntegrityError`. Memory: the compressed
    body (the caller's), the decoder's state (bounded by the codec's parameters above) and at most one
    piece of decoded bytes not yet read.
    """

    def __init__(
        self,
        codec: int,
        body: bytes | memoryview,
        raw_len: int,
        what: str,
        *,
        exact: bool = True,
        primed: lzma.LZMADecompressor | None = None,
    ) -> None:
        """``primed``: for :data:`CODEC_LZMA2`, a raw LZMA2 decoder already fed a preset dictionary
        (its own dictionary size bounds its memory), used instead of a fresh one."""
        self.what = what
        self.left = raw_len
        self.exact = exact
        self._buf = b""
        self._pos = 0
        self._stored: memoryview | None = None
        self._reader: zstandard.ZstdDecompressionReader | None = None
        self._decoder: _Decoder | None = None
        self._fed = 0  # bytes of ``body`` handed to the decoder so far, a slice at a time
        self._body = body
        try:
            if codec == CODEC_STORED:
                if len(body) != raw_len or not exact:
                    raise IntegrityError(f"delta is malformed: stored {what} is not {raw_len} bytes")
                self._stored = memoryview(body)
            elif codec == CODEC_ZSTD:
                dctx = zstandard.ZstdDecompressor(max_window_size=STREAM_WINDOW)
                self._reader = dctx.stream_reader(io.BytesIO(body), read_across_frames=False)
            elif codec == CODEC_BZIP2:
                self._decoder = bz2.BZ2Decompressor()
            elif codec == CODEC_LZMA2:
                self._decoder = primed or lzma.LZMADecompressor(
                    format=lzma.FORMAT_RAW, filters=lzma_filters(raw_len)
                )
            else:
                raise IntegrityError(f"delta is malformed: {what} has unknown codec {codec}")
        except (zstandard.ZstdError, lzma.LZMAError, ValueError) as exc:
            raise IntegrityError(f"delta is malformed: {what}: {exc}") from None

    def _more(self, want: int) -> bytes:
        """Up to ``want`` (> 0) further decoded bytes; b"" at the end of the stream."""
        try:
            if self._stored is not None:
                part = bytes(self._stored[:want])
                self._stored = self._stored[len(part) :]
                return part
            if self._reader is not None:
                return bytes(self._reader.read(want))
            decoder = self._decoder
            assert decoder is not None
            while not decoder.eof:
                # fed a slice at a time: a decoder keeps its own copy of input it has not used yet
                data: bytes | memoryview = b""
                if decoder.needs_input:
                    if self._fed >= len(self._body):
                        raise IntegrityError(f"delta is malformed: {self.what} is truncated")
                    data = self._body[self._fed : self._fed + _PIECE]
                    self._fed += len(data)
                part = decoder.decompress(data, max_length=want)
                if part:
                    return part
                if not data:  # it neither needed input nor gave output
                    raise IntegrityError(f"delta is malformed: {self.what} is corrupt (no progress)")
            return b""
        except (zstandard.ZstdError, OSError, EOFError, ValueError, lzma.LZMAError) as exc:
            raise IntegrityError(f"delta is malformed: {self.what} is corrupt ({exc})") from None

    def read(self, n: int) -> bytes:
        """Exactly ``n`` decoded bytes."""
        if n > self.left:
            raise IntegrityError(f"delta is malformed: {self.what} is read past its {self.left} bytes left")
        parts: list[bytes] = []
        need = n
        while need:
            if self._pos < len(self._buf):
                take = self._buf[self._pos : self._pos + need]
                self._pos += len(take)
                parts.append(take)
                need -= len(take)
                continue
            piece = self._more(max(min(need, 1 << 20), _PIECE))
            if not piece:
                raise IntegrityError(f"delta is malformed: {self.what} ends early")
            self._buf, self._pos = piece, 0
        self.left -= n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_all(self) -> bytes:
        """Everything (up to the declared length) the stream decodes to, then :meth:`finish`."""
        parts = [self._buf[self._pos :]]
        self._buf, self._pos = b"", 0
        got = len(parts[0])
        while piece := self._more(min(self.left - got + 1, 1 << 20)):
            parts.append(piece)
            got += len(piece)
            if got > self.left:
                raise IntegrityError(f"delta is malformed: {self.what} expands past {self.left} bytes")
        self.left -= got
        self.finish()
        return b"".join(parts)

    def finish(self) -> None:
        """The stream is used up: nothing left to read, nothing more in it, no trailing bytes."""
        if self.exact and self.left:
            raise IntegrityError(f"delta is malformed: {self.what} has {self.left} bytes nobody read")
        if self._pos < len(self._buf) or self._more(1):
            raise IntegrityError(f"delta is malformed: {self.what} expands past its declared size")
        if self._decoder is not None and (
            not self._decoder.eof or self._decoder.unused_data or self._fed < len(self._body)
        ):
            raise IntegrityError(f"delta is malformed: {self.what} has trailing bytes or no end mark")
