"""Blocks that wrap other blocks (format 5): keyed, difference, recent-values and dictionary columns.

Each stores a column relative to something — the order of a key column, a twin column, the rows just
before, a few distinct values — and frames the blocks that hold the rest (docs/segment-format.md, "Keyed
columns" and after). Which columns get one is the encoder's plan (:mod:`.plan_values`,
:mod:`.plan_columns`); here are only their payloads: built from blocks already encoded, and read back
through :meth:`Reading.part`, which checks each wrapped block against the registry before decoding it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from fleetloop_shared.catalog import DataType
from fleetloop_shared.segment.codecs import StreamError
from fleetloop_shared.segment.codecs.recent import WINDOW as RECENT_WINDOW
from fleetloop_shared.segment.layout import BLOCK, DICT_MAX_VALUES, DIFF, KEYED, U32, Block, Encoded

if TYPE_CHECKING:
    from fleetloop_shared.segment.registry import Reading

F64 = npt.NDArray[np.float64]
_NUMERIC = (DataType.FLOAT64, DataType.INT64)

# ------------------------------------------------------------------------------------------ encoders


def _framed(*blocks: Encoded) -> bytes:
    return b"".join(BLOCK.pack(b.codec, b.raw_len, len(b.payload)) + b.payload for b in blocks)


def keyed(key_id: int, inner: Encoded) -> bytes:
    """Codecs 20/34: the key's signal id, then the column's block in the key's (stable) order."""
    return KEYED.pack(key_id, inner.codec, inner.raw_len) + inner.payload


def difference(ref_id: int, patches: npt.NDArray[np.int64], exact: F64, inner: Encoded) -> bytes:
    """Codec 21: the reference's signal id, the rows the addition does not give back (and their
    values), then the block of the differences."""
    return b"".join(
        [
            DIFF.pack(ref_id, inner.codec, inner.raw_len, patches.shape[0]),
            patches.astype("<u4").tobytes(),
            exact.astype("<f8").tobytes(),
            inner.payload,
        ]
    )


def recent(references: Encoded, literals: Encoded) -> bytes:
    """Codec 22: the references (rows back, 0 for a literal), then the literal values."""
    return _framed(references, literals)


def dictionary(count: int, entries: Encoded, indices: Encoded) -> bytes:
    """Codecs 23/35: the number of distinct values, their bits, then one index a row."""
    return U32.pack(count) + _framed(entries, indices)


# ------------------------------------------------------------------------------------------ decoders


def decode_keyed(block: Block, rows: int, reading: Reading) -> npt.NDArray[Any]:
    """The wrapped block holds the values in the order of a stable sort by the key column."""
    key_id, codec, raw_len = KEYED.unpack_from(block.payload)
    key = reading.decoded.get(key_id)
    if key is None or not reading.is_plain(key_id) or reading.data_types[key_id] not in _NUMERIC:
        raise StreamError(f"key signal {key_id} is not an unkeyed number column of this group")
    values = reading.part(block, 0, codec, raw_len, block.payload[KEYED.size :], rows)
    order = reading.orders.get(key_id)
    if order is None:
        order = reading.orders[key_id] = np.argsort(key, kind="stable")
    out = np.empty_like(values)
    out[order] = values
    return out


def decode_difference(block: Block, rows: int, reading: Reading) -> F64:
    """The wrapped FLOAT64 block plus the reference column in IEEE doubles, then the patched rows'
    exact values."""
    ref_id, codec, raw_len, npatches = DIFF.unpack_from(block.payload)
    ref = reading.reference(ref_id, rows)
    if ref is None:
        raise StreamError(f"reference signal {ref_id} is no FLOAT64 column of {rows} rows decoded before")
    patch_end = DIFF.size + 12 * npatches
    if npatches > rows or len(block.payload) <= patch_end:
        raise StreamError(f"{npatches} patched rows impossible for {rows} rows")
    positions = np.frombuffer(block.payload, dtype="<u4", count=npatches, offset=DIFF.size).astype(np.int64)
    if npatches and (int(positions[-1]) >= rows or (npatches > 1 and bool((np.diff(positions) <= 0).any()))):
        raise StreamError("patched rows out of range or not increasing")
    exact = np.frombuffer(block.payload, dtype="<f8", count=npatches, offset=DIFF.size + 4 * npatches)
    values = reading.part(block, 0, codec, raw_len, block.payload[patch_end:], rows)
    with np.errstate(invalid="ignore", over="ignore"):
        out: F64 = ref + values
    out[positions] = exact
    return out


def decode_recent(block: Block, rows: int, reading: Reading) -> F64:
    """The references (an integer stream), then the literals (a FLOAT64 block)."""
    (ref_codec, ref_len, ref_payload), (literal_codec, literal_len, literal_payload) = _frames(
        block.payload, 0, ("references", "literals")
    )
    refs = reading.part(block, 0, ref_codec, ref_len, ref_payload, rows)
    row = np.arange(rows, dtype=np.int64)
    if rows and (int(refs.min()) < 0 or int(refs.max()) > RECENT_WINDOW or bool((refs > row).any())):
        raise StreamError(f"a reference points outside 0..{RECENT_WINDOW} rows back")
    literal = refs == 0
    count = int(np.count_nonzero(literal))
    literals = reading.part(block, 1, literal_codec, literal_len, literal_payload, count)
    # Every reference points strictly back, so following them ends at a literal; pointer jumping gets
    # there in at most log2(rows) + 1 rounds.
    source = row - refs
    for _ in range(64):
        further = source[source]
        if np.array_equal(further, source):
            break
        source = further
    out: F64 = literals[(np.cumsum(literal) - 1)[source]]
    return out


def decode_dictionary(block: Block, rows: int, reading: Reading) -> npt.NDArray[np.int64]:
    """The count, the distinct values (bits), one index a row."""
    if len(block.payload) < U32.size:
        raise StreamError("dictionary truncated")
    (count,) = U32.unpack_from(block.payload, 0)
    if not 1 <= count <= min(DICT_MAX_VALUES, max(rows, 1)):
        raise StreamError(f"{count} dictionary entries impossible for {rows} rows")
    entries, indices = _frames(block.payload, U32.size, ("dictionary entries", "indices"))
    table = reading.part(block, 0, *entries, count)
    index = reading.part(block, 1, *indices, rows)
    if rows and (int(index.min()) < 0 or int(index.max()) >= count):
        raise StreamError(f"an index outside the {count} dictionary entries")
    out: npt.NDArray[np.int64] = table[index]
    return out


def decode_float_dictionary(block: Block, rows: int, reading: Reading) -> F64:
    out: F64 = decode_dictionary(block, rows, reading).view(np.float64)
    return out


def _frames(payload: bytes, start: int, names: tuple[str, ...]) -> list[tuple[int, int, bytes]]:
    """(codec, raw length, stored bytes) of the blocks framed in a payload (as in *Blocks*) from
    ``start``, filling it exactly; what each may be is checked when it is decoded."""
    pos = start
    out: list[tuple[int, int, bytes]] = []
    for name in names:
        if pos + BLOCK.size > len(payload):
            raise StreamError(f"truncated in the {name} header")
        codec, raw_len, stored = BLOCK.unpack_from(payload, pos)
        pos += BLOCK.size
        if pos + stored > len(payload):
            raise StreamError(f"{name} have impossible lengths")
        out.append((codec, raw_len, payload[pos : pos + stored]))
        pos += stored
    if pos != len(payload):
        raise StreamError(f"{len(payload) - pos} bytes after the {names[-1]}")
    return out
