"""Text columns as a dictionary of distinct UTF-8 strings plus one index per row.

String signals on machines are states, modes, fault codes, firmware names, VINs: few distinct values,
long runs of the same one. So a column becomes its distinct strings (in order of first appearance) and
the rows' indices into them. First-appearance order makes the indices of a column whose values are all
distinct ``0, 1, 2, …`` (free as an integer stream of first differences) and those of a slowly changing
state mostly repeats; the indices are stored either as one integer stream per row (bit-packed, see
:mod:`fleetloop_shared.segment.codecs.intstream`) or, when runs are long, as run values and run lengths —
whichever is smaller, computed exactly. zstd on top (the segment framing's choice) takes care of text
the dictionary cannot share (similar but distinct strings).

The round trip is exact for every Python ``str`` that UTF-8 can encode: ``""``, any script, any length
(within :data:`MAX_TEXT_BYTES` per column). Strings UTF-8 cannot encode (lone surrogates) are refused
by the encoder, never altered. Layout: docs/segment-format.md, "String dictionary".
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import numpy.typing as npt

from fleetloop_shared.segment.codecs import StreamError, intstream

#: Index layouts (the payload's first byte).
INDEX_ROWS = 0
INDEX_RUNS = 1
#: Largest total of a column's distinct strings, UTF-8 bytes: bounds what a decoder may allocate
#: (the segment decoder checks the block's declared size against it before decompressing).
MAX_TEXT_BYTES = 64 * 1024 * 1024
_HEAD = struct.Struct("<BI")  # index layout, dictionary entries D
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class TextError(ValueError):
    """A value the encoder cannot store (not a ``str``, or not encodable as UTF-8)."""


def max_encoded_size(count: int) -> int:
    """Upper bound of :func:`encode`'s output for ``count`` rows (a decoder's allocation cap)."""
    return (
        _HEAD.size
        + intstream.max_encoded_size(count)  # lengths
        + _U64.size
        + MAX_TEXT_BYTES
        + _U32.size
        + 2 * intstream.max_encoded_size(count)  # indices, or run values + run lengths
    )


def dictionary(values: npt.NDArray[Any]) -> tuple[list[str], npt.NDArray[np.int64]]:
    """The distinct strings in order of first appearance and each row's index into them.

    Raises :class:`TextError` naming the first row that is not a ``str``. The loops run in C (a dict
    built from the rows keeps first appearance; a map looks each row up), so only the distinct values
    are checked in Python: a value that is not a ``str`` is a distinct key of its own.
    """
    rows = values.tolist()
    try:
        first = dict.fromkeys(rows)
    except TypeError:  # an unhashable row (a list, say): certainly not text
        first = None
    types = set(map(type, first)) if first is not None else {object}
    if not all(issubclass(t, str) for t in types):
        for i, v in enumerate(rows):
            if not isinstance(v, str):
                raise TextError(f"row {i} holds {type(v).__name__} {v!r:.40}, not str")
    assert first is not None
    # a str subclass (numpy.str_) is stored as the plain text it holds
    entries = list(first) if types <= {str} else [str(k) for k in first]
    if len(first) == len(rows):  # all distinct: first appearance is row order
        return entries, np.arange(len(rows), dtype=np.int64)
    lookup = dict(zip(first, range(len(first)), strict=True))
    idx = np.fromiter(map(lookup.__getitem__, rows), dtype=np.int64, count=len(rows))
    return entries, idx


def encode(values: npt.NDArray[Any]) -> bytes:
    """The string-dictionary payload of ``values`` (a 1-D array of ``str``)."""
    return encode_measured(values)[0]


def encode_measured(values: npt.NDArray[Any]) -> tuple[bytes, int]:
    """:func:`encode`, and the bytes of distinct text it holds (the segment caps their sum, as the
    decoder does)."""
    entries, idx = dictionary(values)
    try:
        encoded = list(map(str.encode, entries))  # UTF-8, strict
    except UnicodeEncodeError as exc:
        raise TextError(f"a value is not encodable as UTF-8 ({exc.reason})") from None
    text = b"".join(encoded)
    if len(text) > MAX_TEXT_BYTES:
        raise TextError(f"{len(text)} bytes of distinct text exceed the limit of {MAX_TEXT_BYTES}")
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    head_rest = intstream.encode(lengths, (0, 1)) + _U64.pack(len(text)) + text
    rows = int(idx.shape[0])
    by_rows = intstream.encode(idx, (0, 1))
    layout, body = INDEX_ROWS, by_rows
    if rows > 1:
        starts = np.flatnonzero(np.concatenate(([True], idx[1:] != idx[:-1])))
        if starts.shape[0] * 2 < rows:  # runs can only win when they average more than two rows
            run_lengths = np.diff(np.append(starts, rows)).astype(np.int64)
            runs = (
                _U32.pack(int(starts.shape[0]))
                + intstream.encode(idx[starts], (0, 1))
                + intstream.encode(run_lengths, (0, 1))
            )
            if len(runs) < len(by_rows):
                layout, body = INDEX_RUNS, runs
    return _HEAD.pack(layout, len(entries)) + head_rest + body, len(text)


def decode(data: bytes, count: int, max_text: int = MAX_TEXT_BYTES) -> tuple[npt.NDArray[np.object_], int]:
    """Inverse of :func:`encode`: an object array of ``count`` ``str``, and the bytes of distinct text
    it held (so a caller decoding many columns can cap their total with ``max_text``).

    Raises :class:`StreamError` on any malformed field (sizes are checked before use).
    """
    if len(data) < _HEAD.size:
        raise StreamError("string dictionary header truncated")
    layout, entries = _HEAD.unpack_from(data, 0)
    if layout not in (INDEX_ROWS, INDEX_RUNS):
        raise StreamError(f"unknown string index layout {layout}")
    if entries > count or (count > 0 and entries == 0):
        raise StreamError(f"{entries} dictionary entries impossible for {count} rows")
    lengths, pos = intstream.decode(data, _HEAD.size, entries)
    if pos + _U64.size > len(data):
        raise StreamError("string dictionary truncated in text length")
    (total,) = _U64.unpack_from(data, pos)
    pos += _U64.size
    if total > max_text:
        raise StreamError(f"string dictionary text of {total} bytes exceeds the limit of {max_text}")
    if pos + total > len(data):
        raise StreamError(f"string dictionary text of {total} bytes exceeds the block")
    if entries and (int(lengths.min()) < 0 or int(lengths.max()) > total or int(lengths.sum()) != total):
        raise StreamError("string lengths do not add up to the dictionary text")
    text = data[pos : pos + total]
    pos += total
    table = _strings(text, lengths)
    if layout == INDEX_ROWS:
        idx, pos = intstream.decode(data, pos, count)
    else:
        if pos + _U32.size > len(data):
            raise StreamError("string runs truncated in run count")
        (nruns,) = _U32.unpack_from(data, pos)
        pos += _U32.size
        if nruns > count or (count > 0 and nruns == 0):
            raise StreamError(f"{nruns} runs impossible for {count} rows")
        run_values, pos = intstream.decode(data, pos, nruns)
        run_lengths, pos = intstream.decode(data, pos, nruns)
        if nruns and (int(run_lengths.min()) < 1 or int(run_lengths.max()) > count):
            raise StreamError("string run lengths out of range")
        if int(run_lengths.sum()) != count:
            raise StreamError(f"string runs cover {int(run_lengths.sum())} rows, expected {count}")
        idx = np.repeat(run_values, run_lengths)
    if pos != len(data):
        raise StreamError(f"{len(data) - pos} bytes after the string dictionary block")
    if count and (int(idx.min()) < 0 or int(idx.max()) >= entries):
        raise StreamError(f"string index out of range of {entries} dictionary entries")
    out: npt.NDArray[np.object_] = table[idx] if count else np.empty(0, dtype=object)
    return out, int(total)


def _strings(text: bytes, lengths: npt.NDArray[np.int64]) -> npt.NDArray[np.object_]:
    """The dictionary's strings (an object array), each checked to be valid UTF-8."""
    table = np.empty(lengths.shape[0], dtype=object)
    ends = np.cumsum(lengths).tolist()
    starts = [0, *ends][:-1]
    if text.isascii():  # byte offsets are character offsets: decode once, then slice
        whole = text.decode("ascii")
        table[:] = [whole[a:b] for a, b in zip(starts, ends, strict=True)]
        return table
    try:
        table[:] = [text[a:b].decode("utf-8") for a, b in zip(starts, ends, strict=True)]
    except UnicodeDecodeError as exc:
        raise StreamError(f"string dictionary entry is not valid UTF-8 ({exc.reason})") from None
    return table
