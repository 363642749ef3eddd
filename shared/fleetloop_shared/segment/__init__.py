"""The segment format: one or several groups' samples as self-describing, compressed, checksummed bytes.

A segment is the unit the agent stores, the uplink sends and the cloud ingests, so the same code encodes
on the device and decodes in the cloud. The byte layout is specified in ``docs/segment-format.md``; this
package is its only implementation:

* :mod:`.model` — what a segment is (:class:`Segment`), made from batches, bundled into several groups;
* :mod:`.layout` — the numbers the format fixes (versions, limits, codec ids, field layouts);
* :mod:`.registry` — every codec id: its data type, first format version, encoder, decoder, decoded
  sizes and what it wraps; the one place a codec error becomes a :class:`CorruptSegmentError`;
* :mod:`.plain` and :mod:`.derived` — the codecs' encoders and decoders, over the column codecs of
  :mod:`.codecs` (integer streams, decimal and grid floats, text, bit packing, zstd);
* :mod:`.plan_values`, :mod:`.plan_columns`, :mod:`.plan_times` — the encoder's choices;
* :mod:`.framing` — header, groups, descriptors, block headers and checksum, both ways;
* :mod:`.encode` and :mod:`.decode` — :func:`encode_segment` and :func:`decode_segment`.

The names below are what callers use; the rest of the format's numbers are in :mod:`.layout`.

Why the layout looks the way it does:

* Signals of one group share one timestamp column, and timestamps are most of the cost, so they get the
  strongest transform: an integer stream (:mod:`.codecs.intstream`) that picks values, first or second
  differences, divides out the clock's tick and bit-packs with exceptions.
* Floats are mostly decimals or scaled integers in disguise, so they become integers plus an exact ulp
  residual (:mod:`.codecs.decimal_float`); true doubles fall back to plain bytes or first differences
  of their bits.
* Every block names its codec (and whether zstd was applied on top), so the encoder picks per block
  whatever is smallest and a reader can say *which* codec it does not know.
* Text (catalog ``STRING``) is a dictionary of distinct strings plus per-row or run-length indices
  (:mod:`.codecs.strings`): machine text is states and codes with few distinct values.
* A writer stamps the *lowest* format version that expresses the segment (2 unless a column is text,
  4 only for a segment of several groups, 5 only where a keyed, difference, recent-value or dictionary
  column pays, 6 only where a compressed body, a grid float or a time offset pays), so a cloud that
  reads only version 2 keeps accepting every single-group segment without text;
  ``encode_segment(max_version=...)`` caps it for a fleet whose cloud is older.
* Format 5 columns may be stored relative to something: in the order of a key column (interleaved
  series), as the difference from a twin column, as references to recent equal rows, or as indices into
  a few distinct values — each only where the block comes out smaller.
* Format 6 compresses the whole body as one zstd frame (dozens of small groups no longer pay a frame,
  tables and zero-filled headers each), stores floats on a grid of any step as integers times that step
  (a unit conversion, a calibration) and a group's times as offsets from an earlier group's (frames one
  node sends one after another).
* A segment may hold several groups (format version 4) because on a CAN bus the *arrival* times are
  the cost: frames of different messages that came in one USB batch carry the very same timestamp, so
  those groups share one sorted "clock" column and each group stores indices into it (cheap: a periodic
  message's indices step by an almost constant amount) when that is smaller than its own timestamps.
* Decoding trusts nothing: every length is checked against what the header implies *before* anything is
  allocated or decompressed, and the checksum is verified before any block is decompressed, so hostile or
  truncated bytes end in :class:`CorruptSegmentError` rather than in a crash, a huge allocation or a
  silently wrong value.
"""

from fleetloop_shared.segment.decode import decode_segment
from fleetloop_shared.segment.encode import encode_segment
from fleetloop_shared.segment.layout import (
    BODY_MAX_RATIO,
    BODY_MAX_SLACK,
    CODEC_BOOL_PACKBITS,
    CODEC_F64_BITS_INTSTREAM,
    CODEC_F64_DICT,
    CODEC_F64_DIFF,
    CODEC_F64_GRID,
    CODEC_F64_KEYED,
    CODEC_F64_RAW,
    CODEC_F64_RAW_ZSTD,
    CODEC_F64_RECENT,
    CODEC_F64_SCALED,
    CODEC_F64_XOR,
    CODEC_F64_XOR_ZSTD,
    CODEC_I64_DICT,
    CODEC_I64_INTSTREAM,
    CODEC_I64_KEYED,
    CODEC_STR_DICT,
    CODEC_TS_CLOCK_INDEX,
    CODEC_TS_INTSTREAM,
    CODEC_TS_OFFSET,
    CODEC_TS_SAME_AS,
    FLAG_BODY_ZSTD,
    FORMAT_VERSION,
    MAGIC,
    MAX_CELLS,
    MAX_ROWS,
    MAX_TEXT_BYTES,
    READ_VERSIONS,
    ZSTD_FLAG,
)
from fleetloop_shared.segment.model import (
    BUNDLE_MAX_ROWS,
    Segment,
    bundle_segments,
    new_segment_id,
    segment_from_batch,
)

__all__ = [
    "BODY_MAX_RATIO",
    "BODY_MAX_SLACK",
    "BUNDLE_MAX_ROWS",
    "CODEC_BOOL_PACKBITS",
    "CODEC_F64_BITS_INTSTREAM",
    "CODEC_F64_DICT",
    "CODEC_F64_DIFF",
    "CODEC_F64_GRID",
    "CODEC_F64_KEYED",
    "CODEC_F64_RAW",
    "CODEC_F64_RAW_ZSTD",
    "CODEC_F64_RECENT",
    "CODEC_F64_SCALED",
    "CODEC_F64_XOR",
    "CODEC_F64_XOR_ZSTD",
    "CODEC_I64_DICT",
    "CODEC_I64_INTSTREAM",
    "CODEC_I64_KEYED",
    "CODEC_STR_DICT",
    "CODEC_TS_CLOCK_INDEX",
    "CODEC_TS_INTSTREAM",
    "CODEC_TS_OFFSET",
    "CODEC_TS_SAME_AS",
    "FLAG_BODY_ZSTD",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_CELLS",
    "MAX_ROWS",
    "MAX_TEXT_BYTES",
    "READ_VERSIONS",
    "ZSTD_FLAG",
    "Segment",
    "bundle_segments",
    "decode_segment",
    "encode_segment",
    "new_segment_id",
    "segment_from_batch",
]
