"""Decoding CAN frames through a DBC many at a time: one set of numpy operations per message id and
batch, instead of one cantools call per frame.

A busy bus carries thousands of frames a second but only tens of message ids, so the cost that matters
is per frame. Here a batch's frames are grouped by message (exact id, or the PGN for J1939 messages),
and each message is decoded for all its frames at once: its 8-byte windows are read as 64-bit words,
every signal is a shift and a mask over them (little- or big-endian bit layouts), sign extension,
IEEE float reinterpretation and scale/offset are whole-column operations, and multiplexed signals are
masks computed from their multiplexer's column.

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
        #: indices of the decoder's 8-byte windows this message reads (set by the decoder)
        self.windows: set[int] = set()
        # A signal reaching past the message's length cannot be unpacked: cantools refuses every frame.
        self.never = any(
            (c.lsb_lin + 1 if c.big_endian else c.layout.start + c.layout.length) > 8 * layout.length
            for c in self.columns
        )
        self.muxed = any(c.layout.multiplexer is not None or c.layout.is_multiplexer for c in self.columns)

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
        unscaled = (
            raw.astype(np.uint32).view(np.float32).astype(np.float64)
            if sig.length == 32
            else raw.view(np.float64)
            if sig.length == 64
            else raw.astype(np.uint16).view(np.float16).astype(np.float64)
        )
        scaled = unscaled if sig.conversion == "identity" else unscaled * float(sig.scale) + float(sig.offset)
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


class BatchDecoder:
    """Decodes a batch of frames for a chosen set of messages (and, optionally, signals).

    Frames whose id names no chosen message are ignored; J1939 messages match any frame with their PGN
    (priority and source address ignored; for PDU1 the destination too), as :class:`~.dbc.FrameDecoder`
    matches them.

    The work is flat over the batch: every (frame, signal) pair of every message is one element of the
    same few arrays, so a batch costs a fixed number of numpy operations plus a slice per decoded signal,
    whatever the mix of messages.
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
        windows = sorted({(c.big_endian, max(c.window, 0)) for c in columns})
        self._windows = windows
        window_index = {w: k for k, w in enumerate(windows)}
        self._sig_window = np.array(
            [window_index[(c.big_endian, max(c.window, 0))] for c in columns], np.intp
        )
        self._shift = np.array([c.shift for c in columns], _U64)
        self._mask = np.array([c.mask for c in columns], _U64)
        self._sign = np.array([c.sign for c in columns], _U64)
        kinds = [k for m in self._messages for k in m.kinds]
        self._scale_i = np.array(
            [c.layout.scale if k == _INTEGER else 1 for c, k in zip(columns, kinds, strict=True)], np.int64
        )
        self._offset_i = np.array(
            [c.layout.offset if k == _INTEGER else 0 for c, k in zip(columns, kinds, strict=True)], np.int64
        )
        self._scale_f = np.array(
            [float(c.layout.scale) if k == _LINEAR else 1.0 for c, k in zip(columns, kinds, strict=True)]
        )
        self._offset_f = np.array(
            [float(c.layout.offset) if k == _LINEAR else 0.0 for c, k in zip(columns, kinds, strict=True)]
        )
        for compiled in self._messages:
            compiled.windows = {window_index[(c.big_endian, max(c.window, 0))] for c in compiled.columns}
        self._any_integer = _INTEGER in kinds
        self._any_linear = _LINEAR in kinds
        self._count = np.array([len(m.columns) for m in self._messages] + [0], np.int64)
        self._first = np.array([m.first for m in self._messages] + [0], np.int64)
        self._need = np.array([m.layout.length for m in self._messages] + [0], np.int64)
        self._never = np.array([m.never for m in self._messages] + [False], bool)
        # per-signal constants stacked by type, so a batch gathers each table once, not once per constant
        self._bits = np.stack((self._shift, self._mask, self._sign)) if columns else np.zeros((3, 0), _U64)
        self._linear_i = np.stack((self._scale_i, self._offset_i)) if columns else np.zeros((2, 0), np.int64)
        self._linear_f = np.stack((self._scale_f, self._offset_f)) if columns else np.zeros((2, 0))
        self._by_id = {m.layout.frame_id: k for k, m in enumerate(self._messages)}
        self._by_pgn = {
            j1939_pgn(m.layout.frame_id): k for k, m in enumerate(self._messages) if m.layout.is_j1939
        }
        self._resolved: dict[int, int] = {}
        # Ids seen so far and their message (-1: none), sorted, so a batch is looked up in one search.
        self._known_ids = np.zeros(0, np.int64)
        self._known_msg = np.zeros(0, np.int64)
        #: Frames of a chosen message that cantools would refuse (too short, unknown multiplexer value).
        self.errors_total = 0

    @property
    def frame_ids(self) -> frozenset[int]:
        return frozenset(self._by_id)

    @property
    def matches_pgn(self) -> bool:
        """Whether some chosen message is J1939 (matched by PGN, not by exact id)."""
        return bool(self._by_pgn)

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

    def _which(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """The chosen message of every frame id (-1: none), by one search in the ids seen so far."""
        known = self._known_ids
        pos = np.searchsorted(known, ids)
        np.minimum(pos, max(known.size - 1, 0), out=pos)
        hit = known[pos] == ids if known.size else np.zeros(ids.shape, bool)
        if not hit.all():
            fresh = np.unique(ids[~hit])
            if known.size + fresh.size <= 65_536:  # bounded: a bus of random ids cannot grow it
                found = np.fromiter(
                    (self.message_index(int(i)) for i in fresh.tolist()), np.int64, fresh.size
                )
                ids_all = np.concatenate((known, fresh))
                msg_all = np.concatenate((self._known_msg, found))
                order = np.argsort(ids_all, kind="stable")
                self._known_ids, self._known_msg = ids_all[order], msg_all[order]
                return self._which(ids)
            out = np.full(ids.shape, -1, np.int64)
            out[hit] = self._known_msg[pos[hit]]
            miss = np.flatnonzero(~hit)
            out[miss] = [self.message_index(int(i)) for i in ids[miss].tolist()]
            return out
        return self._known_msg[pos]

    def decode(self, batch: FrameBatch) -> list[DecodedMessage]:
        """Every chosen message present in ``batch``, in the order the decoder was given them."""
        if len(batch) == 0 or not self._messages:
            return []
        which = self._which(batch.frame_id)
        chosen = which >= 0
        need = self._need[which]
        usable = chosen & (batch.length >= need) & ~self._never[which]
        if batch.payload.shape[1] < int(need.max(initial=0)):
            usable &= batch.payload.shape[1] >= need
        sel = np.flatnonzero(usable)
        self.errors_total += int(np.count_nonzero(chosen)) - sel.size
        if sel.size == 0:
            return []
        sel = sel[np.argsort(which[sel], kind="stable")]
        msg = which[sel]
        payload = batch.payload[sel]
        if payload.shape[1] < CLASSIC_WIDTH:
            payload = np.pad(payload, ((0, 0), (0, CLASSIC_WIDTH - payload.shape[1])))
        bounds = np.flatnonzero(np.diff(msg)) + 1
        starts = np.concatenate(([0], bounds))
        ends = np.concatenate((bounds, [sel.size]))
        present = msg[starts]
        windows: set[int] = set()
        for k in present.tolist():
            windows |= self._messages[k].windows
        raw, ints, ivals, fvals = self._pairs(payload, msg, windows)
        counts = self._count[present]
        pair_starts = np.concatenate(([0], np.cumsum((ends - starts) * counts)[:-1]))
        out = []
        for a, b, p0, k in zip(
            starts.tolist(), ends.tolist(), pair_starts.tolist(), present.tolist(), strict=True
        ):
            decoded = self._message(self._messages[k], sel[a:b], payload[a:b], raw, ints, ivals, fvals, p0)
            if decoded is not None:
                out.append(decoded)
        return out

    def _pairs(
        self, payload: npt.NDArray[np.uint8], msg: npt.NDArray[np.int64], windows: set[int]
    ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """Raw fields, sign-extended ints, and int / float values of every (frame, signal) pair, frames in
        the order given and each frame's signals in its message's order."""
        n = payload.shape[0]
        counts = self._count[msg]
        total = int(counts.sum())
        pair_row = np.repeat(np.arange(n), counts)
        pair_sig = np.repeat(self._first[msg] - (np.cumsum(counts) - counts), counts) + np.arange(total)
        words = np.zeros((len(self._windows), n), _U64)
        for w in windows:
            big, start = self._windows[w]
            block = payload[:, start : start + 8]
            if block.shape[1] < 8:
                block = np.pad(block, ((0, 0), (0, 8 - block.shape[1])))
            words[w] = np.ascontiguousarray(block).view(">u8" if big else "<u8")[:, 0]
        shift, mask, sign = self._bits[:, pair_sig]
        raw = (words[self._sig_window[pair_sig], pair_row] >> shift) & mask
        ints = ((raw ^ sign) - sign).view(np.int64)
        if self._any_integer:
            scale_i, offset_i = self._linear_i[:, pair_sig]
            ivals = ints * scale_i + offset_i
        else:
            ivals = ints
        if self._any_linear:
            scale_f, offset_f = self._linear_f[:, pair_sig]
            fvals = ints.astype(np.float64) * scale_f + offset_f
        else:
            fvals = np.zeros(0)
        return raw, ints, ivals, fvals

    def _message(
        self,
        m: _Message,
        rows: npt.NDArray[np.intp],
        payload: npt.NDArray[np.uint8],
        raw: npt.NDArray[np.uint64],
        ints: npt.NDArray[np.int64],
        ivals: npt.NDArray[np.int64],
        fvals: npt.NDArray[np.float64],
        p0: int,
    ) -> DecodedMessage | None:
        n, width = rows.size, len(m.columns)
        span = slice(p0, p0 + n * width)
        block_i = ivals[span].reshape(n, width)
        block_f = fvals[span].reshape(n, width) if fvals.size else block_i
        values: dict[str, npt.NDArray[Any]] = {}
        codes: dict[str, npt.NDArray[Any]] = {}
        for j, name, kind, choices in m.plan:
            if kind == _LINEAR:
                values[name] = block_f[:, j]
            elif kind != _SLOW:
                values[name] = block_i[:, j]
            else:
                values[name], code = _slow_value(
                    m.columns[j],
                    raw[span].reshape(n, width)[:, j],
                    ints[span].reshape(n, width)[:, j],
                    payload,
                )
                if code is not None:
                    codes[name] = code
                continue
            if choices:
                codes[name] = ints[span].reshape(n, width)[:, j]
        present: dict[str, npt.NDArray[np.bool_]] = {}
        if m.muxed:
            ok = m.multiplex(values, present, n)
            if not ok.all():
                self.errors_total += int((~ok).sum())
                if not ok.any():
                    return None
                rows = rows[ok]
                values = {k: v[ok] for k, v in values.items()}
                present = {k: v[ok] for k, v in present.items()}
                codes = {k: v[ok] for k, v in codes.items()}
        return DecodedMessage(m.layout, rows, values, present, codes)
