"""zstd for the segment codecs: the only module of the segment format that imports ``zstandard``.

A ``zstandard.ZstdCompressor`` must not be used by two threads at once (it fails with "Src size is
incorrect" or worse), and the agent, the simulator and the cloud encode from several threads; so each
thread gets its own compressor, made on first use and reused after (making one per call would cost more
than compressing a small block). Frames from outside are read only through :func:`content_size` and
:func:`decompress_at_most`, which turn every zstd error into :class:`StreamError`.
"""

from __future__ import annotations

import threading

import zstandard

from fleetloop_shared.segment.codecs import StreamError

#: zstd level of every block and byte plane: an encoder choice, not part of the format. Level 3 is the
#: measured balance (benchmarks/store.py: level 9 saves 1.8 % of bytes for ~20 % more encode time).
LEVEL = 3
#: zstd level of byte planes (each plane is one byte position of every residual: long matches are rare
#: there, so the faster level finds as much — on the real corpus 73 bytes *fewer*, ~3 % less encode time).
PLANE_LEVEL = 1

_local = threading.local()


def compress(raw: bytes, *, level: int = LEVEL) -> bytes:
    """One zstd frame of ``raw`` with its content size set (the decoders require it)."""
    compressors = getattr(_local, "compressors", None)
    if compressors is None:
        compressors = _local.compressors = {}
    compressor = compressors.get(level)
    if compressor is None:
        compressor = compressors[level] = zstandard.ZstdCompressor(
            level=level, write_content_size=True, write_checksum=False
        )
    return bytes(compressor.compress(raw))


def decompress(frame: bytes) -> bytes:
    """The content of one zstd frame made by :func:`compress` (for the encoder's own frames: a reader of
    outside bytes checks the declared size first, with :func:`content_size` and
    :func:`decompress_at_most`)."""
    return bytes(_decompressor().decompress(frame))


def _decompressor() -> zstandard.ZstdDecompressor:
    """This thread's decompressor (each call starts a fresh frame; making one per block cost more than
    decompressing a small block)."""
    decompressor = getattr(_local, "decompressor", None)
    if decompressor is None:
        decompressor = _local.decompressor = zstandard.ZstdDecompressor()
    return decompressor


def content_size(frame: bytes) -> int:
    """The content size a frame declares (-1 when it declares none), read before anything is
    decompressed."""
    try:
        return int(zstandard.frame_content_size(frame))
    except zstandard.ZstdError:
        raise StreamError("not a zstd frame") from None


def decompress_at_most(frame: bytes, size: int, *, allow_extra_data: bool = False) -> bytes:
    """The content of a frame from outside, never more than ``size`` bytes: a frame that declares more
    (or no size) is refused before anything is decompressed. The caller compares what it got with what
    it expected."""
    declared = content_size(frame)
    if not 0 <= declared <= size:
        raise StreamError(f"zstd frame declares {declared} bytes, at most {size} expected")
    try:
        return bytes(
            _decompressor().decompress(frame, max_output_size=size, allow_extra_data=allow_extra_data)
        )
    except zstandard.ZstdError as exc:
        raise StreamError(f"zstd error: {exc}") from None
