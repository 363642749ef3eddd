"""A Modbus tag map, and the fewest read requests that cover it (pure: no I/O, no pymodbus).

A tag is one value at a register address: its register type (holding, input, coil, discrete), data type
(16/32/64-bit integers, 32/64-bit IEEE floats, a bit), word and byte order, scale and offset, engineering
unit and poll interval. Tags polled at the same interval from the same device form one *poll group*: one
timestamp per poll, as the signals of one CAN frame share theirs. Each poll group's tags are covered by
the fewest requests the protocol allows (at most ``max_registers`` registers or ``max_bits`` bits each,
and no hole wider than ``max_gap`` inside one), planned once at start.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from fleetloop_shared.catalog import DataType
from fleetloop_shared.choices import check_choice
from fleetloop_shared.errors import ConfigError, MalformedMessageError

#: Register types and their read function codes.
REGISTER_TYPES: Final = {"holding": 3, "input": 4, "coil": 1, "discrete": 2}
BIT_TYPES: Final = ("coil", "discrete")
#: data type → (16-bit words, struct code)
DATA_TYPES: Final = {
    "bool": (1, ""),
    "int16": (1, "h"),
    "uint16": (1, "H"),
    "int32": (2, "i"),
    "uint32": (2, "I"),
    "int64": (4, "q"),
    "float32": (2, "f"),
    "float64": (4, "d"),
}
ORDERS: Final = ("big", "little")
#: Protocol limits of one read request (Modbus application protocol 1.1b3, 6.1–6.4).
MAX_REGISTERS: Final = 125
MAX_BITS: Final = 2000
MAX_ADDRESS: Final = 65_535


@dataclass(frozen=True)
class Tag:
    """One mapped value. ``bit``: for a ``bool`` in a register, which bit (0 = least significant)."""

    signal: str
    register: str
    address: int
    data_type: str = "uint16"
    word_order: str = "big"
    byte_order: str = "big"
    scale: float = 1.0
    offset: float = 0.0
    unit: str = ""
    poll_ns: int = 1_000_000_000
    device_id: int = 1
    bit: int | None = None

    def __post_init__(self) -> None:
        where = f"tag {self.signal!r}"
        check_choice(self.register, REGISTER_TYPES, f"{where}: register")
        check_choice(self.data_type, DATA_TYPES, f"{where}: type")
        if self.register in BIT_TYPES and self.data_type != "bool":
            raise ConfigError(f"{where}: a {self.register} holds one bit; its type must be bool")
        if self.data_type == "bool" and self.register not in BIT_TYPES and self.bit is None:
            raise ConfigError(f"{where}: a bool in a {self.register} register needs 'bit' (0-15)")
        if self.bit is not None and (self.register in BIT_TYPES or not 0 <= self.bit <= 15):
            raise ConfigError(f"{where}: 'bit' (0-15) applies to a bool in a holding or input register")
        check_choice(self.word_order, ORDERS, f"{where}: word_order")
        check_choice(self.byte_order, ORDERS, f"{where}: byte_order")
        if not self.address >= 0 or self.address + self.words - 1 > MAX_ADDRESS:
            raise ConfigError(f"{where}: address {self.address} is outside 0-{MAX_ADDRESS}")
        if not 0 <= self.device_id <= 255:
            raise ConfigError(f"{where}: device_id must be 0-255, got {self.device_id}")
        if self.poll_ns <= 0:
            raise ConfigError(f"{where}: poll interval must be positive")
        if self.scale == 0:
            raise ConfigError(f"{where}: scale 0 would make every value 0")

    @property
    def words(self) -> int:
        """Registers (or bits, for coils and discrete inputs) the tag occupies."""
        return 1 if self.register in BIT_TYPES else DATA_TYPES[self.data_type][0]

    @property
    def catalog_type(self) -> DataType:
        if self.data_type == "bool":
            return DataType.BOOL
        if self.data_type.startswith("float") or self.scale != 1.0 or self.offset != 0.0:
            return DataType.FLOAT64
        return DataType.INT64


@dataclass(frozen=True)
class _Slot:
    """Where a tag sits in its request's answer, and how to turn it into a value."""

    index: int
    words: int
    code: str
    reorder: bool  # word or byte order differs from the block's big-endian layout
    word_order: str
    byte_order: str
    bit: int | None
    scale: float
    offset: float
    integer: bool  # deliver as int (catalog INT64)


@dataclass(frozen=True)
class ReadRequest:
    """One read: ``count`` registers or bits from ``address`` of ``register`` on ``device_id``."""

    register: str
    device_id: int
    address: int
    count: int
    tags: tuple[int, ...]  # positions in the poll group
    slots: tuple[_Slot, ...]

    @property
    def function_code(self) -> int:
        return REGISTER_TYPES[self.register]

    def describe(self) -> str:
        last = self.address + self.count - 1
        return f"device {self.device_id} {self.register} {self.address}-{last}"

    def decode(self, words: Sequence[int] | Sequence[bool]) -> list[float | int | bool]:
        """The tag values of one answer (``count`` registers, or at least ``count`` bits)."""
        if len(words) < self.count:
            raise MalformedMessageError(
                f"{self.describe()}: answer has {len(words)} values, expected {self.count}"
            )
        if self.register in BIT_TYPES:
            return [bool(words[s.index]) for s in self.slots]
        try:
            buf = struct.pack(f">{self.count}H", *words[: self.count])
        except struct.error as exc:
            raise MalformedMessageError(f"{self.describe()}: register out of range: {exc}") from None
        out: list[float | int | bool] = []
        for s in self.slots:
            if s.bit is not None:
                out.append(bool((words[s.index] >> s.bit) & 1))
                continue
            raw = buf[2 * s.index : 2 * (s.index + s.words)]
            if s.reorder:
                pairs = [raw[i : i + 2] for i in range(0, len(raw), 2)]
                if s.word_order == "little":
                    pairs.reverse()
                if s.byte_order == "little":
                    pairs = [p[::-1] for p in pairs]
                raw = b"".join(pairs)
            (value,) = struct.unpack(">" + s.code, raw)
            if s.scale != 1.0 or s.offset != 0.0:
                value = value * s.scale + s.offset
            out.append(int(value) if s.integer else float(value))
        return out


@dataclass(frozen=True)
class PollGroup:
    """Tags polled together (same interval, same device); one timestamp per poll."""

    key: str
    poll_ns: int
    device_id: int
    tags: tuple[Tag, ...]
    requests: tuple[ReadRequest, ...]


def plan_requests(
    tags: Sequence[Tag],
    *,
    max_registers: int = MAX_REGISTERS,
    max_bits: int = MAX_BITS,
    max_gap: int | None = None,
) -> list[ReadRequest]:
    """The fewest requests covering ``tags`` (all of one device): per register type, tags sorted by
    address, a request grown while the next tag still fits within the size limit and the hole before it
    is at most ``max_gap`` (None: any hole the size limit allows). Greedy is optimal here: every request
    starts at the lowest address not yet covered and reaches as far as it can."""
    if not 1 <= max_registers <= MAX_REGISTERS or not 1 <= max_bits <= MAX_BITS:
        raise ConfigError(f"max_registers must be 1-{MAX_REGISTERS} and max_bits 1-{MAX_BITS}")
    devices = {t.device_id for t in tags}
    if len(devices) > 1:
        raise ValueError("plan_requests: tags of one device only")
    requests: list[ReadRequest] = []
    for register in REGISTER_TYPES:
        limit = max_bits if register in BIT_TYPES else max_registers
        members = sorted(
            ((i, t) for i, t in enumerate(tags) if t.register == register),
            key=lambda it: (it[1].address, it[0]),
        )
        current: list[tuple[int, Tag]] = []
        start = end = 0
        for i, tag in members:
            if tag.words > limit:
                raise ConfigError(f"tag {tag.signal!r}: {tag.words} registers exceed max_registers {limit}")
            tag_end = tag.address + tag.words
            gap_ok = max_gap is None or tag.address - end <= max_gap
            if current and tag_end - start <= limit and gap_ok:
                current.append((i, tag))
                end = max(end, tag_end)
                continue
            if current:
                requests.append(_request(register, start, end, current))
            current, start, end = [(i, tag)], tag.address, tag_end
        if current:
            requests.append(_request(register, start, end, current))
    return requests


def _request(register: str, start: int, end: int, members: list[tuple[int, Tag]]) -> ReadRequest:
    slots = []
    for _, t in members:
        words, code = DATA_TYPES[t.data_type]
        slots.append(
            _Slot(
                index=t.address - start,
                words=t.words,
                code=code,
                reorder=(words > 1 and t.word_order != "big") or t.byte_order != "big",
                word_order=t.word_order,
                byte_order=t.byte_order,
                bit=t.bit,
                scale=t.scale,
                offset=t.offset,
                integer=t.catalog_type is DataType.INT64,
            )
        )
    device_id = members[0][1].device_id
    return ReadRequest(register, device_id, start, end - start, tuple(i for i, _ in members), tuple(slots))


def poll_groups(
    tags: Sequence[Tag],
    *,
    source: str,
    max_registers: int = MAX_REGISTERS,
    max_bits: int = MAX_BITS,
    max_gap: int | None = None,
) -> list[PollGroup]:
    """Tags split by (interval, device) into poll groups, each with its planned requests."""
    seen: set[str] = set()
    for t in tags:
        if t.signal in seen:
            raise ConfigError(f"tag {t.signal!r} is mapped twice")
        seen.add(t.signal)
    keyed: dict[tuple[int, int], list[Tag]] = {}
    for t in tags:
        keyed.setdefault((t.poll_ns, t.device_id), []).append(t)
    groups = []
    several_devices = len({d for _, d in keyed}) > 1
    for (poll_ns, device_id), members in sorted(keyed.items()):
        label = f"{poll_ns // 1_000_000}ms"
        if several_devices:
            label = f"dev{device_id}/{label}"
        reqs = plan_requests(members, max_registers=max_registers, max_bits=max_bits, max_gap=max_gap)
        groups.append(PollGroup(f"{source}/{label}", poll_ns, device_id, tuple(members), tuple(reqs)))
    return groups
