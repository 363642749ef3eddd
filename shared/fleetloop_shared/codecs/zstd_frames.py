"""zstd compression for the segment codecs, safe to call from any thread.

A ``zstandard.ZstdCompressor`` must not be used by two threads at once (it fails with "Src size is
incorrect" or worse), and the agent, the simulator and the cloud encode from several threads; so each
thread gets its own compressor, made on first use and reused after (making one per call would cost more
than compressing a small block).
"""

from __future__ import annotations

import threading

import zstandard

#: zstd level of every block and byte plane: an encoder choice, not part of the format. Level 3 is the
#: measured balance (benchmarks/store.py: level 9 saves 1.8 % of bytes for ~20 % more encode time).
LEVEL = 3

_local = threading.local()


def compress(raw: bytes) -> bytes:
    """One zstd frame of ``raw`` with its content size set (the decoders require it)."""
    compressor = getattr(_local, "compressor", None)
    if compressor is None:
        compressor = zstandard.ZstdCompressor(level=LEVEL, write_content_size=True, write_checksum=False)
        _local.compressor = compressor
    return bytes(compressor.compress(raw))
