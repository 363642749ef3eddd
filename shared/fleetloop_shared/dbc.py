"""DBC files: which CAN frames carry which signals, and how to turn payload bytes into numbers and back.

This is the only module that imports cantools, so its quirks (exception types, value types, strictness)
stop here: callers see :class:`~fleetloop_shared.errors.ConfigError` for a bad file and ``None`` for a bad
frame, never a cantools exception.

Community DBCs (opendbc, kona-ev-dbc, ...) often omit the ``BS_:`` and ``BU_:`` sections that the DBC
grammar requires; without ``BS_:`` the ``NS_`` keyword list swallows the first ``BO_`` and the whole file
fails to parse. :func:`load_dbc` inserts empty sections where they are missing, so such files load as
their authors intended.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fleetloop_shared.errors import ConfigError


def _import_cantools() -> Any:
    """cantools imports python-can, whose MF4 log writer imports asammdf — and with it pandas and
    canmatrix, ~300 ms and ~85 MB — whenever asammdf is installed (the ``mf4`` extra). The agent decodes
    frames and never writes MF4 through python-can, so asammdf is hidden while cantools loads; our own
    MF4 reader (``store_import.read_mf4``) imports it normally afterwards, only when a file is read."""
    hide = "asammdf" not in sys.modules
    if hide:
        sys.modules["asammdf"] = None  # type: ignore[assignment]  # "not installed" for this import only
    try:
        import cantools as module
    finally:
        if hide and sys.modules.get("asammdf", 0) is None:
            del sys.modules["asammdf"]
    return module


cantools = _import_cantools()

#: Largest DBC file we parse; real ones are well under 1 MiB, and the parser's cost grows with size.
MAX_DBC_BYTES = 16 * 1024 * 1024

_BS_LINE = re.compile(r"^[ \t]*BS_[ \t]*:", re.MULTILINE)
_BU_LINE = re.compile(r"^[ \t]*BU_[ \t]*:", re.MULTILINE)
_NS_LINE = re.compile(r"^[ \t]*NS_[ \t]*:", re.MULTILINE)
# The first line after the NS_ keyword list: one that starts in column 0 with a non-blank character.
_TOP_LEVEL_LINE = re.compile(r"^\S", re.MULTILINE)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _with_required_sections(text: str) -> tuple[str, int, int]:
    """``text`` with empty ``BS_:``/``BU_:`` sections inserted where the file lacks them, plus the line
    (1-based) before which lines were inserted and how many, so parse errors can cite the user's lines."""
    has_bs = _BS_LINE.search(text) is not None
    has_bu = _BU_LINE.search(text) is not None
    if has_bs and has_bu:
        return text, 0, 0
    if has_bs:
        # Only BU_ is missing: it belongs right after the BS_ line.
        bs = _BS_LINE.search(text)
        assert bs is not None
        end = text.find("\n", bs.end())
        pos = len(text) if end < 0 else end + 1
        insert = "\nBU_:\n\n"
    else:
        insert = "\nBS_:\n\n" + ("" if has_bu else "BU_:\n\n")
        ns = _NS_LINE.search(text)
        if ns is None:
            # No NS_ list to terminate: the sections can open the file (after VERSION if there is one).
            version = re.search(r"^[ \t]*VERSION[^\n]*\n", text, re.MULTILINE)
            pos = version.end() if version else 0
        else:
            nxt = _TOP_LEVEL_LINE.search(text, ns.end())
            pos = nxt.start() if nxt else len(text)
    if pos > 0 and text[pos - 1] != "\n":
        insert = "\n" + insert
    return text[:pos] + insert + text[pos:], text.count("\n", 0, pos) + 1, insert.count("\n")


def _parse_error(exc: BaseException, inserted_at: int, inserted: int) -> str:
    """cantools' message for a parse failure, with line numbers of the file as the user wrote it."""
    reason = _one_line(exc)
    wrapped = re.fullmatch(r'DBC: "(.*)"', reason)
    if wrapped:
        reason = wrapped.group(1)

    def fix(match: re.Match[str]) -> str:
        line = int(match.group(1))
        if inserted and line >= inserted_at + inserted:
            line -= inserted
        return f"line {line}"

    return re.sub(r"line (\d+)", fix, reason, count=1)


def _decode_text(raw: bytes) -> str:
    # DBC editors write either UTF-8 or Windows-1252; latin-1 accepts every byte, so this never fails.
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _is_float_or_scaled(signal: Any) -> bool:
    """Whether values of ``signal`` need FLOAT64: IEEE floats, fractional scale or offset, or raw values
    that do not fit a signed 64-bit integer."""
    if bool(signal.is_float):
        return True
    scale, offset = float(signal.scale), float(signal.offset)
    if not (scale.is_integer() and offset.is_integer()):
        return True
    return int(signal.length) >= 64 and not bool(signal.is_signed)


def load_dbc(path: Path) -> DbcDatabase:
    """Parse the DBC at ``path`` leniently (missing ``BS_:``/``BU_:`` are inserted; overlapping signals and
    similar slips that cantools' strict mode refuses are accepted)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_DBC_BYTES:
            raise ConfigError(f"{path}: not a valid DBC: {size} bytes exceeds the {MAX_DBC_BYTES} byte limit")
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: not a valid DBC: cannot read it ({exc.strerror or exc})") from None
    text, inserted_at, inserted = _with_required_sections(_decode_text(raw))
    try:
        db: Any = cantools.database.load_string(text, database_format="dbc", strict=False)
    except Exception as exc:  # cantools raises many types (parse, value, key errors) for malformed text
        raise ConfigError(f"{path}: not a valid DBC: {_parse_error(exc, inserted_at, inserted)}") from None
    if not db.messages:
        raise ConfigError(f"{path}: not a valid DBC: it defines no messages")
    return DbcDatabase(db, source=str(path))


def j1939_pgn(frame_id: int) -> int:
    """The parameter group number of a 29-bit J1939 id: data page + PDU format, and the PDU specific
    byte only for PDU2 (PF ≥ 240; for PDU1 it is the destination address)."""
    pgn = (frame_id >> 8) & 0x3FFFF
    if (pgn >> 8) & 0xFF < 240:
        pgn &= 0x3FF00
    return pgn


@dataclass(frozen=True)
class SignalLayout:
    """Where one signal sits in its message and how its raw bits become a value, as plain data.

    ``start`` is the DBC start bit: the least significant bit for little-endian (Intel) signals, the most
    significant bit in the DBC's sawtooth numbering for big-endian (Motorola) ones. ``conversion`` is how
    the decoded value is typed, exactly as cantools types it: ``identity`` (the raw value, an int, or a
    float for IEEE signals), ``integer`` (``raw * scale + offset`` in integers) or ``linear`` (the same in
    floats). A multiplexed signal is present when its ``multiplexer`` signal's value is in
    ``multiplexer_ids``; a multiplexer signal's value must be one of ``selector_ids`` (its children's ids
    and its choices), or the whole frame does not decode.
    """

    name: str
    start: int
    length: int
    byte_order: Literal["little_endian", "big_endian"]
    is_signed: bool
    is_float: bool
    conversion: Literal["identity", "integer", "linear"]
    scale: int | float
    offset: int | float
    unit: str
    choices: Mapping[int, str]
    multiplexer: str | None
    multiplexer_ids: frozenset[int] | None
    is_multiplexer: bool
    selector_ids: frozenset[int]


@dataclass(frozen=True)
class MessageLayout:
    """One DBC message as plain data: what a batch decoder compiles (see :mod:`.can_batch`)."""

    name: str
    frame_id: int
    is_extended: bool
    length: int
    is_fd: bool
    is_j1939: bool
    signals: tuple[SignalLayout, ...]


def _conversion_kind(signal: Any) -> Literal["identity", "integer", "linear"]:
    """Which of cantools' conversions types this signal's values (its ``BaseConversion.factory`` rule:
    identity for scale 1 and offset 0, integer arithmetic for whole scale and offset, else floats)."""
    scale, offset = signal.scale, signal.offset
    if scale == 1 and offset == 0:
        return "identity"

    def whole(value: Any) -> bool:
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())

    if whole(scale) and whole(offset) and not bool(signal.is_float):
        return "integer"
    return "linear"


def _signal_layout(signal: Any, children: Mapping[str, set[int]]) -> SignalLayout:
    kind = _conversion_kind(signal)
    scale, offset = signal.scale, signal.offset
    if kind == "integer":
        scale, offset = int(scale), int(offset)
    choices = {int(k): str(v) for k, v in (signal.choices or {}).items()}
    ids = signal.multiplexer_ids
    return SignalLayout(
        name=str(signal.name),
        start=int(signal.start),
        length=int(signal.length),
        byte_order="big_endian" if signal.byte_order == "big_endian" else "little_endian",
        is_signed=bool(signal.is_signed),
        is_float=bool(signal.is_float),
        conversion=kind,
        scale=scale,
        offset=offset,
        unit=str(signal.unit or ""),
        choices=choices,
        multiplexer=None if signal.multiplexer_signal is None else str(signal.multiplexer_signal),
        multiplexer_ids=None if ids is None else frozenset(int(i) for i in ids),
        is_multiplexer=bool(signal.is_multiplexer),
        selector_ids=frozenset(children.get(str(signal.name), set()) | set(choices))
        if signal.is_multiplexer
        else frozenset(),
    )


def message_layout(message: Any) -> MessageLayout:
    """The plain-data layout of one cantools message."""
    children: dict[str, set[int]] = {}
    for s in message.signals:
        if s.multiplexer_signal is not None and s.multiplexer_ids is not None:
            children.setdefault(str(s.multiplexer_signal), set()).update(int(i) for i in s.multiplexer_ids)
    return MessageLayout(
        name=str(message.name),
        frame_id=int(message.frame_id),
        is_extended=bool(message.is_extended_frame),
        length=int(message.length),
        is_fd=bool(message.is_fd),
        is_j1939=getattr(message, "protocol", None) == "j1939",
        signals=tuple(_signal_layout(s, children) for s in message.signals),
    )


class FrameDecoder:
    """Turns (frame id, payload) into physical signal values for a chosen set of messages.

    Hostile or damaged payloads (too short, wrong layout) never raise: :meth:`decode` returns ``None`` and
    :attr:`errors_total` counts them, so one bad frame on a bus cannot stop a device's capture.
    """

    def __init__(self, messages: Mapping[int, Any]) -> None:
        self._by_id = dict(messages)
        # J1939 messages are named by their PGN: the same message comes from any source address (and,
        # for PDU1, to any destination), so the DBC's one frame id is not what is on the bus.
        self._by_pgn = {
            j1939_pgn(frame_id): m
            for frame_id, m in self._by_id.items()
            if getattr(m, "protocol", None) == "j1939"
        }
        #: Frames of a selected message whose payload could not be decoded.
        self.errors_total = 0

    @property
    def frame_ids(self) -> frozenset[int]:
        """Ids of the frames this decoder handles (callers use it to filter before decoding)."""
        return frozenset(self._by_id)

    def decode(self, frame_id: int, data: bytes) -> tuple[str, dict[str, float | int]] | None:
        """``(message name, {signal: value})`` for a selected frame id, else ``None``.

        Payload bytes beyond the message's declared length are ignored (loggers pad to 8 bytes); a payload
        shorter than that length is malformed.
        """
        message = self._by_id.get(int(frame_id))
        if message is None and self._by_pgn:
            message = self._by_pgn.get(j1939_pgn(int(frame_id)))
        if message is None:
            return None
        try:
            decoded = message.decode(
                bytes(data), decode_choices=False, scaling=True, allow_truncated=False, allow_excess=True
            )
        except Exception:  # any decode failure of outside bytes is counted, never raised
            self.errors_total += 1
            return None
        if not isinstance(decoded, dict):
            self.errors_total += 1
            return None
        values: dict[str, float | int] = {}
        for name, value in decoded.items():
            if isinstance(value, bool | int | float):
                values[str(name)] = value
            else:  # a value cantools could not express as a number (e.g. a container); not a signal
                self.errors_total += 1
                return None
        return str(message.name), values


class DbcDatabase:
    """The messages and signals of one DBC file, with decoding and (for the simulator) encoding."""

    def __init__(self, db: Any, *, source: str = "DBC") -> None:
        self._db = db
        self.source = source
        self._by_name: dict[str, Any] = {}
        for message in db.messages:
            self._by_name.setdefault(str(message.name), message)

    def _message(self, message: str) -> Any:
        try:
            return self._by_name[message]
        except KeyError:
            raise ConfigError(f"{self.source}: no message named {message!r}") from None

    def message_names(self) -> list[str]:
        """Message names in file order."""
        return list(self._by_name)

    def signals_of(self, message: str) -> list[tuple[str, str, bool]]:
        """``(signal name, unit, is_float_or_scaled)`` for each signal of ``message``, in start-bit order.

        ``is_float_or_scaled`` tells the catalog to store FLOAT64; otherwise the values are whole numbers
        and stay INT64, so enumerations and counters keep their exact integer codes.
        """
        return [
            (str(s.name), str(s.unit or ""), _is_float_or_scaled(s)) for s in self._message(message).signals
        ]

    def frame_id(self, message: str) -> int:
        return int(self._message(message).frame_id)

    def layout(self, message: str) -> MessageLayout:
        """``message`` as plain data, for decoders that work on many frames at once."""
        return message_layout(self._message(message))

    def decoder(self, messages: Collection[str]) -> FrameDecoder:
        """A decoder for just ``messages``: frames with other ids decode to ``None`` at the cost of a dict
        lookup, which is what makes decoding a busy bus cheap."""
        selected = {}
        for name in messages:
            msg = self._message(name)
            selected[int(msg.frame_id)] = msg
        return FrameDecoder(selected)

    def encode(self, message: str, values: Mapping[str, float]) -> bytes:
        """The payload of ``message`` carrying ``values`` (physical units); signals not given are encoded as
        raw zero (clamped into the signal's declared range)."""
        msg = self._message(message)
        known = {str(s.name) for s in msg.signals}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{self.source}: message {message!r} has no signal {unknown[0]!r}")
        full: dict[str, float] = {}
        for s in msg.signals:
            if s.name in values:
                value = float(values[s.name])
                if not math.isfinite(value):
                    raise ConfigError(f"{self.source}: {message}.{s.name}: cannot encode {value}")
                full[str(s.name)] = value
            else:
                default = float(s.offset)
                if s.minimum is not None:
                    default = max(default, float(s.minimum))
                if s.maximum is not None:
                    default = min(default, float(s.maximum))
                full[str(s.name)] = default
        try:
            return bytes(msg.encode(full, scaling=True, padding=False, strict=True))
        except Exception as exc:  # cantools range/size errors
            raise ConfigError(f"{self.source}: cannot encode {message}: {_one_line(exc)}") from None
