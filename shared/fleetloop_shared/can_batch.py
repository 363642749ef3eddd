"""Decoding CAN frames through a DBC many at a time: one fixed sequence of numpy operations per batch,
for every message of the DBC together, instead of one cantools call per frame.

A busy bus carries thousands of frames a second over tens of message ids, and a CAN source decodes
what is pending on its decode cadence (thousands of frames, a few seconds; decision 0035), so a batch
holds each message only tens of times: work per message id and batch would dominate. So the DBC is
compiled into tables (per signal: where its bits are, shift, mask, sign, scale and offset; per message:
its signal count, first signal and length) and a batch is decoded flat: each frame's message is looked
up, the frames cantools would decode kept and grouped by message with one stable sort, expanded to
(frame, signal) pairs, each pair's 8-byte window read in its byte order with one gather, then shifted,
masked, sign-extended and scaled, all pairs at once. :class:`DecodedBatch` holds the result; its
``parts`` are one array per message and signal, views into it. Only messages that need per-signal
Python arithmetic (IEEE floats, fields wider than int64 or float64 keep exact, 9-byte fields) or
multiplexing are finished per message.

The results are exactly cantools' (``Message.decode(data, decode_choices=False, scaling=True,
allow_truncated=False, allow_excess=True)``): the same values, typed as cantools types them (ints for
identity and whole scale/offset, floats otherwise), and the same frames refused — a payload shorter
than the message, or a multiplexer value with no signals and no choice. A refused frame is counted in
:attr:`BatchDecoder.errors_total`, never raised. ``tests/shared/test_can_batch.py`` checks this on
every recording of the real data set and on generated layouts.

Layouts come from :mod:`fleetloop_shared.dbc` as plain data; this module never imports cantools.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from fleetloop_shared.dbc import MessageLayout, SignalLayout, j1939_pgn

#: Payload width every batch is padded to at least (a classic frame).
CLASSIC_WIDTH: Final = 8
_U64: Final = np.uint64


@dataclass(frozen=True)
class FrameBatch:
    """Raw frames in columns: receive time (ns), arbitration id, payload rows (zero-padded to one width)
    and each frame's real payload length."""

    t_ns: npt.NDArray[np.int64]
    frame_id: npt.NDArray[np.int64]
    payload: npt.NDArray[np.uint8]
    length: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.t_ns.shape[0])

    def take(self, rows: npt.NDArray[np.intp] | slice) -> FrameBatch:
        return FrameBatch(self.t_ns[rows], self.frame_id[rows], self.payload[rows], self.length[rows])

    @staticmethod
    def empty(width: int = CLASSIC_WIDTH) -> FrameBatch:
        return FrameBatch(
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
            np.zeros((0, width), np.uint8),
            np.zeros(0, np.int64),
        )

    @staticmethod
    def from_payloads(
        t_ns: Sequence[int] | npt.NDArray[np.int64],
        frame_id: Sequence[int] | npt.NDArray[np.int64],
        payloads: Sequence[bytes],
        width: int | None = None,
    ) -> FrameBatch:
        """Frames from byte strings of any length (up to ``width``, by default the longest, at least 8)."""
        n = len(payloads)
        lengths = np.fromiter(map(len, payloads), dtype=np.int64, count=n)
        longest = int(lengths.max()) if n else 0
        w = max(CLASSIC_WIDTH, longest) if width is None else width
        if longest > w:
            raise ValueError(f"payload of {longest} bytes is wider than {w}")
        flat = np.frombuffer(b"".join(payloads), dtype=np.uint8)
        if n and bool((lengths == w).all()):
            payload = flat.reshape(n, w).copy()
        else:  # scatter each payload into its zero-padded row
            payload = np.zeros((n, w), np.uint8)
            starts = np.cumsum(lengths) - lengths
            rows = np.repeat(np.arange(n), lengths)
            payload[rows, np.arange(flat.size) - np.repeat(starts, lengths)] = flat
        return FrameBatch(
            np.asarray(t_ns, dtype=np.int64), np.asarray(frame_id, dtype=np.int64), payload, lengths
        )


@dataclass
class DecodedMessage:
    """The frames of one message in a batch that decoded, and their signal values.

    ``rows`` index the batch. ``values`` holds one array per decoded signal, aligned with ``rows``:
    int64 (or uint64 for an unsigned 64-bit raw value) where cantools gives ints, float64 where it gives
    floats. A multiplexed signal also has a ``present`` mask (where its multiplexer selected it; its
    value elsewhere is meaningless); ``raw`` holds the raw codes of signals with choices (for labels).
    """

    layout: MessageLayout
    rows: npt.NDArray[np.intp]
    values: dict[str, npt.NDArray[Any]] = field(default_factory=dict)
    present: dict[str, npt.NDArray[np.bool_]] = field(default_factory=dict)
    raw: dict[str, npt.NDArray[np.int64]] = field(default_factory=dict)

    def labels(self, signal: str) -> list[str | int | float]:
        """Values of ``signal`` with choice codes replaced by their names (cantools' ``decode_choices``)."""
        choices = next(s.choices for s in self.layout.signals if s.name == signal)
        codes = self.raw.get(signal)
        values: list[str | int | float] = self.values[signal].tolist()
        if codes is None:
            return values
        return [choices.get(int(c), v) for c, v in zip(codes.tolist(), values, strict=True)]


@dataclass(frozen=True)
class _Column:
    """One compiled signal: where its bits are and how they become a value."""

    layout: SignalLayout
    window: int  # first byte of the 8-byte window holding it; -1: it spans 9 bytes (two windows)
    big_endian: bool
    shift: int
    mask: int
    sign: int  # 1 << (length - 1) for signed integers, else 0
    lsb_lin: int  # big-endian: network-order position of the least significant bit
    msb_lin: int


def _compile_column(sig: SignalLayout, width: int) -> _Column:
    mask = (1 << sig.length) - 1
    sign = (1 << (sig.length - 1)) if sig.is_signed and not sig.is_float else 0
    if sig.byte_order == "little_endian":
        first, last = sig.start // 8, (sig.start + sig.length - 1) // 8
        if last - first < 8:
            window = max(0, min(first, width - 8))
            return _Column(sig, window, False, sig.start - 8 * window, mask, sign, 0, 0)
        return _Column(sig, -1, False, sig.start % 8, mask, sign, 0, 0)
    msb = 8 * (sig.start // 8) + 7 - sig.start % 8
    lsb = msb + sig.length - 1
    first, last = msb // 8, lsb // 8
    if last - first < 8:
        window = max(0, min(first, width - 8))
        return _Column(sig, window, True, 63 - (lsb - 8 * window), mask, sign, lsb, msb)
    return _Column(sig, -1, True, 0, mask, sign, lsb, msb)


def _reachable(signals: Sequence[SignalLayout]) -> list[SignalLayout]:
    """The signals cantools can decode, parents before children: root signals, then the children of
    each multiplexer present (a signal naming a non-multiplexer, or no ids, is never decoded)."""
    by_parent: dict[str | None, list[SignalLayout]] = {}
    for s in signals:
        by_parent.setdefault(s.multiplexer, []).append(s)
    out: list[SignalLayout] = []
    todo = list(by_parent.get(None, []))
    seen: set[str] = set()
    while todo:
        s = todo.pop(0)
        if s.name in seen:
            continue
        seen.add(s.name)
        out.append(s)
        if s.is_multiplexer:
            todo.extend(c for c in by_parent.get(s.name, []) if c.multiplexer_ids is not None)
    return out


def _exact_product_needed(sig: SignalLayout) -> bool:
    """Whether float arithmetic could round ``raw * scale`` where Python keeps it exact (int scale and a
    raw field wider than float64's 53-bit mantissa)."""
    return isinstance(sig.scale, int) and sig.length > 53


def _fits_int64(sig: SignalLayout) -> bool:
    """Whether ``raw * scale + offset`` stays within int64 for every raw value of the field."""
    lo, hi = (
        (-(1 << (sig.length - 1)), (1 << (sig.length - 1)) - 1)
        if sig.is_signed
        else (0, (1 << sig.length) - 1)
    )
    ends = [lo * int(sig.scale) + int(sig.offset), hi * int(sig.scale) + int(sig.offset)]
    return all(-(1 << 63) <= e < (1 << 63) for e in ends) and hi < (1 << 63)


def _nine_byte_field(payload: npt.NDArray[np.uint8], c: _Column) -> npt.NDArray[np.uint64]:
    """A field of 58..64 bits that straddles nine bytes: two reads joined."""
    if not c.big_endian:
        first = c.layout.start // 8
        lo = np.ascontiguousarray(payload[:, first : first + 8]).view("<u8")[:, 0].astype(_U64)
        hi = payload[:, first + 8].astype(_U64)
        out = (lo >> _U64(c.shift)) | (hi << _U64(64 - c.shift))
    else:
        first = c.msb_lin // 8
        word = np.ascontiguousarray(payload[:, first : first + 8]).view(">u8")[:, 0].astype(_U64)
        extra = c.lsb_lin - (8 * first + 63)
        top = word & _U64((1 << (64 - (c.msb_lin - 8 * first))) - 1)
        out = (top << _U64(extra)) | (payload[:, first + 8].astype(_U64) >> _U64(8 - extra))
    return out & _U64(c.mask) if c.layout.length < 64 else out


#: How a compiled signal's value is made from its raw field: in whole-batch arrays (the first three) or
#: per signal (the rest, rare: IEEE floats, fields beyond int64 or float64 precision, 9-byte fields).
_IDENTITY, _INTEGER, _LINEAR, _SLOW = 0, 1, 2, 3


def _kind(c: _Column) -> int:
    sig = c.layout
    if c.window < 0 or sig.is_float:
        return _SLOW
    if sig.conversion == "identity":
        return _SLOW if sig.length == 64 and not sig.is_signed else _IDENTITY
    if sig.conversion == "integer":
        return _INTEGER if _fits_int64(sig) else _SLOW
    if _exact_product_needed(sig) or (sig.length == 64 and not sig.is_signed):
        return _SLOW
    return _LINEAR


class _Message:
    """One chosen message, compiled: its signals (parents before children) and where they start in the
    decoder's signal table."""

    def __init__(self, layout: MessageLayout, wanted: Collection[str] | None, first: int) -> None:
        self.layout = layout
        width = max(CLASSIC_WIDTH, layout.length)
        signals = _reachable(layout.signals)
        if wanted is not None:
            by_name = {s.name: s for s in signals}
            # a multiplexer refuses frames with unknown selector values, wanted or not, and a wanted
            # multiplexed signal needs its multiplexer chain
            keep = set(wanted) | {s.name for s in signals if s.is_multiplexer and s.selector_ids}
            for name in list(keep):
                parent = by_name[name].multiplexer if name in by_name else None
                while parent is not None and parent in by_name:
                    keep.add(parent)
                    parent = by_name[parent].multiplexer
            signals = [s for s in signals if s.name in keep]
        self.columns = [_compile_column(s, width) for s in signals]
        self.kinds = [_kind(c) for c in self.columns]
        #: (column, name, kind, has choices) per signal: what building one batch's output needs
        self.plan = [
            (j, c.layout.name, k, bool(c.layout.choices))
            for j, (c, k) in enumerate(zip(self.columns, self.kinds, strict=True))
        ]
        self.first = first
        # A signal reaching past the message's length cannot be unpacked: cantools refuses every frame.
        self.never = any(
            (c.lsb_lin + 1 if c.big_endian else c.layout.start + c.layout.length) > 8 * layout.length
            for c in self.columns
        )
        self.muxed = any(c.layout.multiplexer is not None or c.layout.is_multiplexer for c in self.columns)
        #: the signal names, in column order
        self.names = tuple(c.layout.name for c in self.columns)
        #: which columns are floats: None when none is, () when all are, else one flag per column
        self.floats: tuple[bool, ...] | None = (
            None
            if _LINEAR not in self.kinds
            else ()
            if all(k == _LINEAR for k in self.kinds)
            else tuple(k == _LINEAR for k in self.kinds)
        )
        #: (column, name) of the signals with choices
        self.choice_columns = [(j, c.layout.name) for j, c in enumerate(self.columns) if c.layout.choices]

    def multiplex(
        self, values: dict[str, npt.NDArray[Any]], present: dict[str, npt.NDArray[np.bool_]], n: int
    ) -> npt.NDArray[np.bool_]:
        """Presence of each multiplexed signal; frames whose multiplexer value selects nothing are bad."""
        ok = np.ones(n, dtype=bool)
        selector: dict[str, npt.NDArray[np.int64]] = {}
        for c in self.columns:  # parents come before their children
            sig = c.layout
            parent = sig.multiplexer
            if parent is not None:
                ids = np.fromiter(sorted(sig.multiplexer_ids or ()), dtype=np.int64)
                mask = np.isin(selector[parent], ids)
                if parent in present:
                    mask &= present[parent]
                present[sig.name] = mask
            if sig.is_multiplexer:
                v = np.asarray(
                    values[sig.name], dtype=np.float64 if values[sig.name].dtype == object else None
                )
                selector[sig.name] = (np.trunc(v) if v.dtype.kind == "f" else v).astype(np.int64)
                if sig.selector_ids:
                    valid = np.isin(selector[sig.name], np.fromiter(sorted(sig.selector_ids), np.int64))
                    here = present.get(sig.name)
                    ok &= valid if here is None else (valid | ~here)
        return ok


def _slow_value(
    c: _Column, raw: npt.NDArray[np.uint64], ints: npt.NDArray[np.int64], payload: npt.NDArray[np.uint8]
) -> tuple[npt.NDArray[Any], npt.NDArray[Any] | None]:
    """One rare signal's values (and choice codes), the way Python arithmetic gives them."""
    sig = c.layout
    if c.window < 0:
        raw = _nine_byte_field(payload, c)
        ints = ((raw ^ np.uint64(c.sign)) - np.uint64(c.sign)).view(np.int64)
    if sig.is_float:
        # IEEE arithmetic as Python's floats do it in cantools, silently: a signalling NaN on the bus
        # widens to NaN, an extreme scale gives ±inf, inf times a zero scale NaN
        with np.errstate(invalid="ignore", over="ignore"):
            unscaled = (
                raw.astype(np.uint32).view(np.float32).astype(np.float64)
                if sig.length == 32
                else raw.view(np.float64)
                if sig.length == 64
                else raw.astype(np.uint16).view(np.float16).astype(np.float64)
            )
            scaled = (
                unscaled if sig.conversion == "identity" else unscaled * float(sig.scale) + float(sig.offset)
            )
        return scaled, (np.trunc(unscaled) if sig.choices else None)
    unsigned64 = sig.length == 64 and not sig.is_signed
    field = raw if unsigned64 else ints
    if sig.conversion == "identity":
        return field, field if sig.choices else None
    if sig.conversion == "integer" and _fits_int64(sig):
        return ints * np.int64(sig.scale) + np.int64(sig.offset), ints if sig.choices else None
    python = [v * sig.scale + sig.offset for v in field.tolist()]
    kind = object if sig.conversion == "integer" else np.float64
    return np.array(python, dtype=kind), field if sig.choices else None


#: One message of a decoded batch: the decoder's message index, where its frames are in
#: :attr:`DecodedBatch.rows` (a slice, or positions when multiplexing refused some), its signals' values
#: (one array per compiled signal, in :meth:`BatchDecoder.signal_names` order) and the presence masks of
#: its multiplexed signals (empty for a plain message).
MessagePart = tuple[
    int, "slice | npt.NDArray[np.intp]", list[npt.NDArray[Any]], dict[str, npt.NDArray[np.bool_]]
]

#: Largest cached ``arange`` (elements): what a batch reuses instead of allocating one; bigger batches
#: allocate their own.
_ARANGE_CACHE: Final = 1 << 16
#: Highest frame id looked up in a dense table (11-bit ids); a decoder with larger ids (29-bit, J1939)
#: searches a sorted table of the ids it has seen instead.
_DENSE_IDS: Final = 1 << 11
#: Most distinct 8-byte windows for which each frame's windows are read once (else each pair reads its own).
_FEW_WINDOWS: Final = 4
#: Multiplicative hash of a frame id (ids below 2**32: the product stays within int64), and the shift
#: that keeps its well-mixed middle bits.
_HASH_MULT: Final = 0x9E3779B1
_HASH_SHIFT: Final = 24
_HASH_SLOTS: Final = 1 << 16
#: ``need`` of a frame that is never usable (no chosen message, or one cantools cannot unpack).
_NEVER: Final = 1 << 40


class DecodedBatch:
    """Every decoded frame of one batch, flat: the frames grouped by message (message index order, the
    batch's order within a message), and the values of every (frame, signal) pair in a few arrays.

    :meth:`parts` splits them per message (views into the flat arrays, no copy), which is all a consumer
    building per-signal columns needs; :meth:`BatchDecoder.decode` builds :class:`DecodedMessage` objects
    from them.
    """

    __slots__ = ("_decoder", "_done", "_fvals", "_ints", "_ivals", "_spans", "rows", "t_ns")

    def __init__(
        self,
        decoder: BatchDecoder,
        rows: npt.NDArray[np.intp],
        t_ns: npt.NDArray[np.int64],
        spans: list[tuple[int, int, int, int]],
        values: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float64]],
        done: dict[int, tuple[MessagePart, dict[str, npt.NDArray[Any]]]],
    ) -> None:
        self._decoder = decoder
        #: Batch rows of the decoded frames, grouped by message.
        self.rows = rows
        #: Their receive times (``batch.t_ns[rows]``).
        self.t_ns = t_ns
        self._spans = spans
        self._ints, self._ivals, self._fvals = values
        self._done = done

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def parts(self) -> list[MessagePart]:
        """One entry per message present, in the decoder's message order."""
        out: list[MessagePart] = []
        messages = self._decoder._messages
        for k, a, b, p0 in self._spans:
            done = self._done.get(k)
            if done is not None:
                out.append(done[0])
                continue
            m = messages[k]
            n, width = b - a, len(m.columns)
            span = slice(p0, p0 + n * width)
            columns: list[npt.NDArray[Any]]
            if width == 1:
                columns = [(self._fvals if m.floats == () else self._ivals)[p0 : p0 + n]]
            elif m.floats is None:
                columns = list(self._ivals[span].reshape(n, width).T)
            elif not m.floats:
                columns = list(self._fvals[span].reshape(n, width).T)
            else:
                ints = self._ivals[span].reshape(n, width)
                floats = self._fvals[span].reshape(n, width)
                columns = [(floats if f else ints)[:, j] for j, f in enumerate(m.floats)]
            out.append((k, slice(a, b), columns, {}))
        return out

    def codes(self, i: int) -> dict[str, npt.NDArray[Any]]:
        """Raw codes of the signals with choices of the ``i``-th message part (what
        :meth:`DecodedMessage.labels` maps)."""
        k, a, b, p0 = self._spans[i]
        done = self._done.get(k)
        if done is not None:
            return done[1]
        m = self._decoder._messages[k]
        if not m.choice_columns:
            return {}
        n, width = b - a, len(m.columns)
        block = self._ints[p0 : p0 + n * width].reshape(n, width)
        return {name: block[:, j] for j, name in m.choice_columns}


class BatchDecoder:
    """Decodes a batch of frames for a chosen set of messages (and, optionally, signals).

    Frames whose id names no chosen message are ignored; J1939 messages match any frame with their PGN
    (priority and source address ignored; for PDU1 the destination too), as :class:`~.dbc.FrameDecoder`
    matches them.

    Table-driven and flat over the batch: every (message, signal) is compiled at construction into rows
    of a few tables (where its bits are, how they become a value), and a batch is one fixed sequence of
    numpy operations over all its (frame, signal) pairs, whatever the mix of messages: look each frame's
    message up, keep the frames cantools would decode, group them by message (one stable sort), expand
    to pairs, read each pair's 8-byte window in its byte order with one gather, then shift, mask, sign
    and scale. Only messages needing per-signal Python arithmetic (IEEE floats, fields beyond int64 or
    float64 precision, multiplexing) cost more, and none of the real recordings has them.
    """

    def __init__(
        self,
        layouts: Iterable[MessageLayout],
        signals: Mapping[str, Collection[str]] | None = None,
    ) -> None:
        self._messages: list[_Message] = []
        first = 0
        for m in layouts:
            compiled = _Message(m, None if signals is None else signals.get(m.name), first)
            self._messages.append(compiled)
            first += len(compiled.columns)
        columns = [c for m in self._messages for c in m.columns]
        kinds = [k for m in self._messages for k in m.kinds]
        # Per signal, one uint64 table gathered once per batch: shift, mask, sign, then the integer and
        # float scale/offset (their bits; viewed back as int64 / float64).
        table = np.zeros((7, len(columns)), _U64)
        for j, (c, k) in enumerate(zip(columns, kinds, strict=True)):
            sig = c.layout
            table[0, j], table[1, j], table[2, j] = c.shift, c.mask, c.sign
            table[3:5, j] = np.array([sig.scale, sig.offset] if k == _INTEGER else [1, 0], np.int64).view(
                _U64
            )
            table[5:7, j] = np.array(
                [float(sig.scale), float(sig.offset)] if k == _LINEAR else [1.0, 0.0], np.float64
            ).view(_U64)
        self._any_integer = _INTEGER in kinds
        self._any_linear = _LINEAR in kinds
        # only the rows some signal needs: each row gathered costs one more value per pair
        self._table = np.ascontiguousarray(
            table[[0, 1, 2, *((3, 4) if self._any_integer else ()), *((5, 6) if self._any_linear else ())]]
        )
        # Per signal, the payload bytes of its 8-byte window in the order that makes a little-endian
        # read give its word (reversed for big-endian signals); 9-byte fields are read separately.
        self._bytes = np.array(
            [
                (range(max(c.window, 0) + 7, max(c.window, 0) - 1, -1))
                if c.big_endian
                else range(max(c.window, 0), max(c.window, 0) + 8)
                for c in columns
            ],
            np.intp,
        ).reshape(len(columns), 8)
        #: per payload width, how a batch of that width reads its words (see ``_windows_for``)
        self._by_width: dict[int, tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]] | None] = {}
        # Per message (plus a last row for "none"), gathered per frame: signal count and first signal.
        self._per_message = np.array(
            [[len(m.columns) for m in self._messages] + [0], [m.first for m in self._messages] + [0]],
            np.intp,
        )
        self._counts = [len(m.columns) for m in self._messages]
        self._need = np.array(
            [_NEVER if m.never else m.layout.length for m in self._messages] + [_NEVER], np.int64
        )
        self._max_need = max((m.layout.length for m in self._messages), default=0)
        self._special = {k for k, m in enumerate(self._messages) if m.muxed or _SLOW in m.kinds}
        self._by_id = {m.layout.frame_id: k for k, m in enumerate(self._messages)}
        self._by_pgn = {
            j1939_pgn(m.layout.frame_id): k for k, m in enumerate(self._messages) if m.layout.is_j1939
        }
        self._resolved: dict[int, int] = {}
        # Ids of 11 bits when every chosen message has one: a dense table, indexed by id + 1 (its end
        # entries, -1, for every negative or larger id). Otherwise the ids seen so far and their message
        # (-1: none), sorted, searched.
        self._dense: npt.NDArray[np.intp] | None = None
        if not self._by_pgn and all(i < _DENSE_IDS for i in self._by_id):
            dense = [-1] + [self.message_index(i) for i in range(_DENSE_IDS)] + [-1]
            self._dense = np.array(dense, np.intp)
        self._known_ids = np.zeros(0, np.int64)
        self._known_msg = np.zeros(0, np.intp)
        # ... and the same ids hashed into a small open table (one id per slot; an id whose slot was
        # taken is found by the search): a batch's lookup is a few passes instead of a binary search
        # per frame (searchsorted of unsorted ids costs ~80 ns a frame; a 29-bit bus has few ids).
        self._hash_keys = np.full(1, -1, np.int64)
        self._hash_msg = np.full(1, -1, np.intp)
        self._arange = np.arange(256, dtype=np.intp)
        #: Frames of a chosen message that cantools would refuse (too short, unknown multiplexer value).
        self.errors_total = 0

    @property
    def frame_ids(self) -> frozenset[int]:
        return frozenset(self._by_id)

    @property
    def matches_pgn(self) -> bool:
        """Whether some chosen message is J1939 (matched by PGN, not by exact id)."""
        return bool(self._by_pgn)

    @property
    def layouts(self) -> list[MessageLayout]:
        """The chosen messages, in message index order (what :data:`MessagePart` indices name)."""
        return [m.layout for m in self._messages]

    def signal_names(self, k: int) -> tuple[str, ...]:
        """The signals message ``k`` decodes, in the order of its :data:`MessagePart` columns."""
        return self._messages[k].names

    def column_dtypes(self, k: int) -> tuple[np.dtype[Any], ...] | None:
        """The dtypes of message ``k``'s columns (int64, or float64 for scaled floats), or None when they
        depend on the signal (IEEE floats, 64-bit unsigned or wider-than-int64 fields)."""
        m = self._messages[k]
        if k in self._special:
            return None
        return tuple(np.dtype(np.float64 if kind == _LINEAR else np.int64) for kind in m.kinds)

    def message_index(self, frame_id: int) -> int:
        """Index of the chosen message a frame id belongs to, or -1."""
        k = self._resolved.get(frame_id)
        if k is None:
            k = self._by_id.get(frame_id, -1)
            if k < 0 and self._by_pgn:
                k = self._by_pgn.get(j1939_pgn(frame_id), -1)
            if len(self._resolved) < 65_536:  # bounded: a bus of random ids cannot grow it
                self._resolved[frame_id] = k
        return k

    def _which(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.intp]:
        """The chosen message of every frame id (-1: none)."""
        if self._dense is not None:
            return self._dense.take(ids + 1, mode="clip")  # negative and large ids: an end entry, -1
        slots = ((ids * _HASH_MULT) >> _HASH_SHIFT) & (self._hash_keys.size - 1)
        in_table = self._hash_keys.take(slots) == ids
        if in_table.all():
            return self._hash_msg.take(slots)
        known = self._known_ids
        if known.size and not (fresh := ~in_table).all():  # most ids hashed: search only the others
            out = self._hash_msg.take(slots)
            miss = np.flatnonzero(fresh)
            out[miss] = self._search(ids[miss])
            return out
        return self._search(ids)

    def _search(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.intp]:
        """:meth:`_which` by binary search in the ids seen so far, learning new ones."""
        known = self._known_ids
        pos = np.searchsorted(known, ids)
        np.minimum(pos, max(known.size - 1, 0), out=pos)
        hit = known[pos] == ids if known.size else np.zeros(ids.shape, bool)
        if not hit.all():
            fresh = np.unique(ids[~hit])
            if known.size + fresh.size <= 65_536:  # bounded: a bus of random ids cannot grow it
                found = np.fromiter((self.message_index(int(i)) for i in fresh.tolist()), np.intp, fresh.size)
                ids_all = np.concatenate((known, fresh))
                msg_all = np.concatenate((self._known_msg, found))
                order = np.argsort(ids_all, kind="stable")
                self._known_ids, self._known_msg = ids_all[order], msg_all[order]
                self._rehash()
                return self._search(ids)
            out = np.full(ids.shape, -1, np.intp)
            out[hit] = self._known_msg[pos[hit]]
            miss = np.flatnonzero(~hit)
            out[miss] = [self.message_index(int(i)) for i in ids[miss].tolist()]
            return out
        return self._known_msg[pos]

    def _rehash(self) -> None:
        """Rebuild the hashed table of the ids seen (at least four slots per id; collisions searched)."""
        size = 64
        while size < 4 * self._known_ids.size and size < _HASH_SLOTS:  # bounded: 1 MiB at most
            size *= 2
        keys = np.full(size, -1, np.int64)
        msgs = np.full(size, -1, np.intp)
        slots = ((self._known_ids * _HASH_MULT) >> _HASH_SHIFT) & (size - 1)
        for i, slot in zip(self._known_ids.tolist(), slots.tolist(), strict=True):
            if keys[slot] < 0:
                keys[slot] = i
        placed = np.flatnonzero(keys >= 0)
        msgs[placed] = self._known_msg[np.searchsorted(self._known_ids, keys[placed])]
        self._hash_keys, self._hash_msg = keys, msgs

    def _range(self, n: int) -> npt.NDArray[np.intp]:
        if n > self._arange.size:
            if n > _ARANGE_CACHE:
                return np.arange(n, dtype=np.intp)
            self._arange = np.arange(max(n, 2 * self._arange.size), dtype=np.intp)
        return self._arange[:n]

    def decode(self, batch: FrameBatch) -> list[DecodedMessage]:
        """Every chosen message present in ``batch``, in the order the decoder was given them."""
        flat = self.decode_flat(batch)
        out = []
        for i, (k, where, columns, present) in enumerate(flat.parts()):
            m = self._messages[k]
            values = dict(zip(m.names, columns, strict=True))
            out.append(DecodedMessage(m.layout, flat.rows[where], values, present, flat.codes(i)))
        return out

    def decode_flat(self, batch: FrameBatch) -> DecodedBatch:
        """Every value of every chosen message in ``batch``, in flat arrays (see :class:`DecodedBatch`)."""
        n = len(batch)
        if n == 0 or not self._messages:
            return self._empty()
        msg = self._which(batch.frame_id)
        need = self._need[msg]
        usable = batch.length >= need
        width = batch.payload.shape[1]
        if width < self._max_need:  # a message longer than this batch's rows: none of its frames fit
            usable &= need <= width
        sel = np.flatnonzero(usable)
        if sel.size != n:
            self.errors_total += int(np.count_nonzero(msg >= 0)) - sel.size
            if sel.size == 0:
                return self._empty()
        m = msg[sel]
        order = m.argsort(kind="stable")
        sel, m = sel[order], m[order]
        payload = batch.payload
        if width < CLASSIC_WIDTH:
            payload = np.pad(payload, ((0, 0), (0, CLASSIC_WIDTH - width)))
            width = CLASSIC_WIDTH
        # pairs: frame-major within each message, each frame's signals in its message's order
        counts, firsts = np.take(self._per_message, m, axis=1)
        ends = counts.cumsum()
        total = int(ends[-1])
        pair_sig = np.repeat(firsts - ends + counts, counts) + self._range(total)
        flat_payload = payload.reshape(-1)
        windows = self._windows_for(width)
        if windows is not None:
            frame_bytes, slot = windows
            index = frame_bytes + (sel * width)[:, None]
            frame_words = flat_payload[index].view("<u8").reshape(-1)
            nw = frame_bytes.size // 8
            words = frame_words[np.repeat(self._range(sel.size) * nw, counts) + slot[pair_sig]]
        else:
            index = self._bytes[pair_sig]
            index += np.repeat(sel * width, counts)[:, None]
            words = flat_payload[index].view("<u8").reshape(total)
        # ``take`` along the axis: ``table[:, pairs]`` is several times slower (13 vs 2 µs at 300 pairs)
        rows = np.take(self._table, pair_sig, axis=1)
        shift, mask, sign = rows[:3]
        ints = (((words >> shift) & mask ^ sign) - sign).view(np.int64)
        ivals = ints * rows[3].view(np.int64) + rows[4].view(np.int64) if self._any_integer else ints
        fvals = np.zeros(0)
        if self._any_linear:
            f = 5 if self._any_integer else 3
            fvals = ints * rows[f].view(np.float64) + rows[f + 1].view(np.float64)
        # one span per message present: (message, first frame, end, first pair)
        spans: list[tuple[int, int, int, int]] = []
        bounds = (np.flatnonzero(m[1:] != m[:-1]) + 1).tolist()
        keys = m.tolist()
        a = p0 = 0
        for b in [*bounds, sel.size]:
            k = keys[a]
            spans.append((k, a, b, p0))
            p0 += (b - a) * self._counts[k]
            a = b
        done: dict[int, tuple[MessagePart, dict[str, npt.NDArray[Any]]]] = {}
        if self._special:
            for k, a, b, p0 in [s for s in spans if s[0] in self._special]:
                part = self._special_part(k, a, b, p0, payload[sel[a:b]], ints)
                if part is None:
                    spans.remove((k, a, b, p0))
                else:
                    done[k] = part
        return DecodedBatch(self, sel, batch.t_ns[sel], spans, (ints, ivals, fvals), done)

    def _windows_for(self, width: int) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]] | None:
        """The distinct 8-byte windows a batch of ``width``-byte rows can use (bytes in read order) and
        each signal's slot among them, when they are few: then each frame's windows are read once and
        every pair picks its word (one index per pair instead of eight). A classic batch has at most two
        (bytes 0-7 in either order); signals of messages longer than the rows never get a pair."""
        if width in self._by_width:
            return self._by_width[width]
        rows = [tuple(r) if max(r) < width else None for r in self._bytes.tolist()]
        windows = sorted({r for r in rows if r is not None})
        slots = {w: i for i, w in enumerate(windows)}
        found = None
        if len(windows) <= _FEW_WINDOWS:
            found = (
                np.array(windows or [tuple(range(8))], np.intp).reshape(-1),
                np.array([0 if r is None else slots[r] for r in rows], np.intp),
            )
        if len(self._by_width) < CLASSIC_WIDTH * 8:  # bounded: one entry per payload width seen
            self._by_width[width] = found
        return found

    def _empty(self) -> DecodedBatch:
        ints = np.zeros(0, np.int64)
        return DecodedBatch(self, np.zeros(0, np.intp), ints, [], (ints, ints, np.zeros(0)), {})

    def _special_part(
        self,
        k: int,
        a: int,
        b: int,
        p0: int,
        payload: npt.NDArray[np.uint8],
        ints: npt.NDArray[np.int64],
    ) -> tuple[MessagePart, dict[str, npt.NDArray[Any]]] | None:
        """A message needing per-signal work (IEEE floats, wide fields, multiplexing), built in full."""
        m = self._messages[k]
        n, width = b - a, len(m.columns)
        block = ints[p0 : p0 + n * width].reshape(n, width)
        values: dict[str, npt.NDArray[Any]] = {}
        codes: dict[str, npt.NDArray[Any]] = {}
        for j, name, kind, choices in m.plan:
            field_ints = block[:, j]
            if kind == _SLOW:
                values[name], code = _slow_value(m.columns[j], field_ints.view(_U64), field_ints, payload)
                if code is not None:
                    codes[name] = code
                continue
            if kind == _LINEAR:
                sig = m.columns[j].layout
                values[name] = field_ints * float(sig.scale) + float(sig.offset)
            elif kind == _INTEGER:
                sig = m.columns[j].layout
                values[name] = field_ints * np.int64(sig.scale) + np.int64(sig.offset)
            else:
                values[name] = field_ints
            if choices:
                codes[name] = field_ints
        present: dict[str, npt.NDArray[np.bool_]] = {}
        where: slice | npt.NDArray[np.intp] = slice(a, b)
        if m.muxed:
            ok = m.multiplex(values, present, n)
            if not ok.all():
                self.errors_total += int((~ok).sum())
                if not ok.any():
                    return None
                where = a + np.flatnonzero(ok)
                values = {name: v[ok] for name, v in values.items()}
                present = {name: v[ok] for name, v in present.items()}
                codes = {name: v[ok] for name, v in codes.items()}
        return (k, where, [values[name] for name in m.names], present), codes
