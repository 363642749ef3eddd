"""The numbers docs/segment-format.md fixes: versions, limits, codec ids, field layouts, block records.

Everything here is part of the byte contract (changing a value changes what a reader accepts or what
the bytes mean); the encoder's tunable choices live in the ``plan_*`` modules instead.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

from fleetloop_shared.segment.codecs import strings

#: The newest format version this build writes (and reads): 4 for segments of several groups, 5 only
#: for segments with a derived column, 6 only where a compressed body, grid float or time offset pays.
FORMAT_VERSION: int = 6
#: Every version this build reads (the versioning rule: readers keep reading what was ever released).
READ_VERSIONS: frozenset[int] = frozenset({2, 3, 4, 5, 6})
MAGIC: bytes = b"FLSG"

#: Hard limits a decoder enforces before it allocates anything; an encoder refuses to exceed them too.
MAX_ROWS = 50_000_000
MAX_COLUMNS = 4096
#: Rows × (columns + 1): caps what one segment may decode to (~800 MB of 8-byte cells) whatever it claims.
MAX_CELLS = 100_000_000
MAX_GROUP_BYTES = 1024
MAX_SIGNAL_ID = 2**32 - 1
#: Groups of one (format 4) segment.
MAX_GROUPS = 4096
#: Distinct text of all STRING columns of one segment, UTF-8 bytes: what one segment's text may decode to.
MAX_TEXT_BYTES = strings.MAX_TEXT_BYTES
#: Distinct values of a dictionary block (an index fits a byte).
DICT_MAX_VALUES = 256

#: ``flags`` bit of format 6: the body (after the fixed header, before the checksum) is one zstd frame.
FLAG_BODY_ZSTD = 1
#: A format 6 body may decompress to at most this many times its stored size plus the slack (a reader
#: refuses more before decompressing; the encoder writes format 5 instead of exceeding it).
BODY_MAX_RATIO = 32
BODY_MAX_SLACK = 1 << 20
#: The smallest body a format 6 frame can hold (group count, clock rows, the clock block's header).
SMALLEST_BODY = 2 + 4 + 9

# Codec ids (one byte, stable forever within a format version; see docs/segment-format.md and the
# registry, which says what each one is). The high bit (ZSTD_FLAG) says the block's payload is a zstd
# frame of the transform's bytes.
CODEC_TS_INTSTREAM = 2
CODEC_TS_CLOCK_INDEX = 3
CODEC_TS_SAME_AS = 4
CODEC_TS_OFFSET = 5
CODEC_F64_RAW = 16
CODEC_F64_XOR = 17
CODEC_F64_SCALED = 18
CODEC_F64_BITS_INTSTREAM = 19
CODEC_F64_KEYED = 20
CODEC_F64_DIFF = 21
CODEC_F64_RECENT = 22
CODEC_F64_DICT = 23
CODEC_F64_GRID = 24
CODEC_I64_INTSTREAM = 33
CODEC_I64_KEYED = 34
CODEC_I64_DICT = 35
CODEC_BOOL_PACKBITS = 48
CODEC_STR_DICT = 64
ZSTD_FLAG = 0x80
# Names kept for callers of format version 1 (the zstd-wrapped forms of the same transforms).
CODEC_F64_RAW_ZSTD = CODEC_F64_RAW | ZSTD_FLAG
CODEC_F64_XOR_ZSTD = CODEC_F64_XOR | ZSTD_FLAG

# magic, version, flags, segment id, row count, first ns, last ns
FIXED = struct.Struct("<4sHH16sQqq")
U16 = struct.Struct("<H")
U32 = struct.Struct("<I")
CRC = struct.Struct("<I")
COLUMN = struct.Struct("<IBB")  # signal id, data type, codec id
BLOCK = struct.Struct("<BII")  # codec id, raw (decompressed) length, stored (compressed) length
KEYED = struct.Struct("<IBI")  # key signal id, wrapped codec id, wrapped decoded length
DIFF = struct.Struct("<IBII")  # reference signal id, wrapped codec id, wrapped decoded length, patches


@dataclass(frozen=True)
class Block:
    """A block as a reader found it: its framing checked, its payload not yet decoded."""

    codec: int
    raw_len: int
    payload: bytes
    #: where it is, for errors ("group 2: value block of signal 7")
    what: str
    #: the segment's format version (what codecs the block and the blocks it wraps may use)
    version: int


class Encoded(NamedTuple):
    """A block as the encoder made it."""

    #: codec id, with :data:`ZSTD_FLAG` when the payload is a zstd frame
    codec: int
    #: the stored bytes
    payload: bytes
    #: the codec's bytes before zstd (what the block header declares)
    raw_len: int
    #: the codec ids of the blocks it wraps: they decide the segment's format version too
    inner: tuple[int, ...] = ()
