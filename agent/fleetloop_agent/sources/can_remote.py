"""python-can-remote's frame stream, read in bulk: what a remote CAN bus costs per frame.

python-can's ``recv`` on a remote bus (``interface: remote``) takes one frame per call: a ``select``, two
or three socket reads for the websocket header and payload, and a ``can.Message`` built with eleven
keywords — ~7 µs per frame, most of an agent's CPU at a busy bus's rate. After python-can-remote has
opened the bus (HTTP upgrade, the bus request with the filters, the server's answer), the rest of the
connection is a plain stream of websocket frames, each a binary message of one CAN frame: type byte 1,
then ``>dIBB`` (timestamp, arbitration id, DLC, flags) and the payload. :func:`parse` reads every whole
frame of a buffer at once (pure; what the receive thread has got from one ``recv``), so a burst costs one
system call and a few hundred nanoseconds per frame.

Anything else on the stream — the server's JSON events (an ``error`` ends the session), pings, a close —
comes back as a control item for the caller. A frame header declaring more than ``MAX_FRAME_BYTES`` is
no frame of this protocol: :class:`RemoteStreamError`, and the source reconnects.
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass, field
from typing import Final

#: websocket opcodes (RFC 6455) that python-can-remote sends.
TEXT: Final = 0x1
BINARY: Final = 0x2
CLOSE: Final = 0x8
PING: Final = 0x9
PONG: Final = 0xA
#: python-can-remote's binary message type for a CAN frame, and its header after the type byte.
CAN_FRAME: Final = 1
_HEADER: Final = struct.Struct(">dIBB")
_PAYLOAD_AT: Final = 1 + _HEADER.size
#: A short unmasked websocket frame's two header bytes, the type byte and the CAN header, in one read.
_SHORT_CAN: Final = struct.Struct(">BBBdIBB")
#: Flags of the header's last byte.
IS_REMOTE_FRAME: Final = 0x2
IS_ERROR_FRAME: Final = 0x4
#: Largest websocket frame accepted (a CAN FD frame is 79 bytes; JSON events are small).
MAX_FRAME_BYTES: Final = 1 << 16


class RemoteStreamError(Exception):
    """The stream is not python-can-remote's protocol (or the server said so): reconnect."""


@dataclass
class Frames:
    """What one buffer held: CAN frames in order (bus timestamps in seconds, ids, payloads), error frames
    counted, and the websocket frames that are not CAN frames (opcode, payload)."""

    bus_s: list[float] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    payloads: list[bytes] = field(default_factory=list)
    error_frames: int = 0
    control: list[tuple[int, bytes]] = field(default_factory=list)


def parse(buf: bytes | bytearray, out: Frames) -> int:
    """Append every whole websocket frame at the start of ``buf`` to ``out``; returns the bytes used (a
    partial frame at the end stays for the next call)."""
    pos, n = 0, len(buf)
    unpack = _SHORT_CAN.unpack_from
    add_t, add_id, add_data = out.bus_s.append, out.ids.append, out.payloads.append
    while pos + 2 <= n:
        b2 = buf[pos + 1]
        end = pos + 2 + b2
        # the common case, one call per frame: an unmasked binary CAN frame of under 126 bytes
        if _PAYLOAD_AT <= b2 < 126 and end <= n and buf[pos] & 0xF == BINARY and buf[pos + 2] == CAN_FRAME:
            _, _, _, ts, arb, _, flags = unpack(buf, pos)
            if flags & IS_ERROR_FRAME:
                out.error_frames += 1
            elif not flags & IS_REMOTE_FRAME:
                add_t(ts)
                add_id(arb)
                add_data(bytes(buf[pos + 2 + _PAYLOAD_AT : end]))
            pos = end
            continue
        b1, length, head = buf[pos], b2 & 0x7F, 2
        if length == 126:
            if pos + 4 > n:
                break
            length, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
        elif length == 127:
            if pos + 10 > n:
                break
            length, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
        if length > MAX_FRAME_BYTES:
            raise RemoteStreamError(f"websocket frame of {length} bytes (at most {MAX_FRAME_BYTES})")
        masked = b2 & 0x80
        start = pos + head + (4 if masked else 0)
        end = start + length
        if end > n:
            break
        opcode = b1 & 0xF
        if masked:  # servers do not mask; unmask all the same rather than misread
            key = buf[start - 4 : start]
            body = bytes(b ^ key[i % 4] for i, b in enumerate(buf[start:end]))
            parse_one(opcode, body, 0, length, out)
        else:
            parse_one(opcode, buf, start, end, out)
        pos = end
    return pos


def parse_one(opcode: int, buf: bytes | bytearray, start: int, end: int, out: Frames) -> None:
    """One websocket frame's payload ``buf[start:end]`` into ``out``."""
    if opcode == BINARY and end - start >= _PAYLOAD_AT and buf[start] == CAN_FRAME:
        ts, arb, _dlc, flags = _HEADER.unpack_from(buf, start + 1)
        if flags & IS_ERROR_FRAME:
            out.error_frames += 1
        elif not flags & IS_REMOTE_FRAME:
            out.bus_s.append(ts)
            out.ids.append(arb)
            out.payloads.append(bytes(buf[start + _PAYLOAD_AT : end]))
    elif opcode != BINARY:
        out.control.append((opcode, bytes(buf[start:end])))


def receive_stamps(bus_s: list[float], received_ns: int, floor_ns: int) -> list[int]:
    """Device-clock stamps for frames that arrived in one read at ``received_ns``: the last frame's is the
    read's time, the others keep their spacing on the bus before it — never after the read, never before
    ``floor_ns`` (the previous read's last stamp), never before an earlier frame's, so stamps never go
    backwards whatever the bus clock does."""
    if not bus_s:
        return []
    received_ns = max(received_ns, floor_ns)
    last = bus_s[-1]
    stamps = [received_ns - max(0, int((last - t) * 1e9)) for t in bus_s]
    stamps[0] = max(stamps[0], floor_ns)
    return list(itertools.accumulate(stamps, max))
