"""J1939 multi-packet messages (SAE J1939-21 transport protocol), reassembled by a passive listener.

Parameter groups longer than 8 bytes (diagnostics, vehicle identification, component data) travel as a
connection-management frame (TP.CM, PGN 0xEC00) announcing size, packet count and PGN, then numbered
data frames (TP.DT, PGN 0xEB00) of 7 bytes each. Broadcast sessions (BAM) go to address 255 unasked;
point-to-point sessions open with RTS, are paced by the receiver's CTS, and close with its
EndOfMsgAck. The agent only listens: it joins any session it sees announced, places each data packet
by its sequence number (so a CTS asking for a retransmission simply overwrites), and hands the
message on as soon as every packet is in, as one frame whose id carries the PGN and the sender's
address (priority 6), to be decoded by PGN like any other J1939 frame.

Pure and bounded: time is the frames' own, at most :data:`MAX_SESSIONS` sessions are open (the
oldest is dropped past that), and a session without traffic for :data:`T1_NS` (J1939-21's T1, 750 ms)
is abandoned. Every abandoned, aborted or malformed session is counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

import numpy as np

from fleetloop_shared.can_batch import FrameBatch

TP_CM: Final = 0xEC00
TP_DT: Final = 0xEB00
RTS: Final = 16
CTS: Final = 17
EOM_ACK: Final = 19
BAM: Final = 32
ABORT: Final = 255
GLOBAL: Final = 0xFF
#: Largest message the transport protocol carries (255 packets of 7 bytes, as the standard bounds it).
MAX_SIZE: Final = 1785
MAX_SESSIONS: Final = 64
T1_NS: Final = 750_000_000
DEFAULT_PRIORITY: Final = 6


def pgn_of(frame_id: int) -> int:
    """PGN of a 29-bit id; the PDU-specific byte is part of it only for PDU2 (PF >= 240)."""
    pgn = (frame_id >> 8) & 0x3FFFF
    return pgn if (pgn >> 8) & 0xFF >= 240 else pgn & 0x3FF00


def frame_id_of(pgn: int, source: int, destination: int = GLOBAL, priority: int = DEFAULT_PRIORITY) -> int:
    """The 29-bit id a single-frame message of ``pgn`` from ``source`` would carry."""
    ps = destination if (pgn >> 8) & 0xFF < 240 else pgn & 0xFF
    return (priority << 26) | ((pgn & 0x3FF00) << 8) | (ps << 8) | source


@dataclass
class _Session:
    pgn: int
    size: int
    packets: int
    last_ns: int
    data: bytearray
    have: set[int] = field(default_factory=set)


@dataclass
class TransportStats:
    completed: int = 0
    aborted: int = 0
    timed_out: int = 0
    malformed: int = 0
    overflowed: int = 0


class J1939Reassembler:
    """Joins the transport-protocol sessions seen on one bus into whole messages."""

    def __init__(self, max_sessions: int = MAX_SESSIONS, timeout_ns: int = T1_NS) -> None:
        self._sessions: dict[tuple[int, int], _Session] = {}
        self._max = max_sessions
        self._timeout = timeout_ns
        self.stats = TransportStats()

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

    def feed(self, batch: FrameBatch) -> FrameBatch:
        """The messages completed by the transport frames of ``batch`` (other frames are ignored)."""
        if len(batch) == 0:
            return FrameBatch.empty()
        pf = (batch.frame_id >> 16) & 0xFF
        rows = np.flatnonzero(((pf == 0xEC) | (pf == 0xEB)) & (batch.frame_id > 0x7FF))
        done_t: list[int] = []
        done_id: list[int] = []
        done_data: list[bytes] = []
        for row in rows.tolist():
            frame_id = int(batch.frame_id[row])
            t_ns = int(batch.t_ns[row])
            data = batch.payload[row, : int(batch.length[row])].tobytes()
            source, destination = frame_id & 0xFF, (frame_id >> 8) & 0xFF
            self._expire(t_ns)
            if (frame_id >> 16) & 0xFF == 0xEC:
                self._control(source, destination, data, t_ns)
            else:
                message = self._data(source, destination, data, t_ns)
                if message is not None:
                    done_t.append(t_ns)
                    done_id.append(frame_id_of(message.pgn, source, destination))
                    done_data.append(bytes(message.data[: message.size]))
        if len(batch):
            self._expire(int(batch.t_ns[-1]))
        if not done_t:
            return FrameBatch.empty()
        return FrameBatch.from_payloads(done_t, done_id, done_data)

    def _control(self, source: int, destination: int, data: bytes, t_ns: int) -> None:
        if len(data) < 8:
            self.stats.malformed += 1
            return
        control = data[0]
        pgn = int.from_bytes(data[5:8], "little")
        if control in (RTS, BAM):
            size = int.from_bytes(data[1:3], "little")
            packets = data[3]
            if control == BAM and destination != GLOBAL:
                destination = GLOBAL
            if not 9 <= size <= MAX_SIZE or packets != (size + 6) // 7:
                self.stats.malformed += 1
                return
            key = (source, destination)
            if key in self._sessions:
                self.stats.aborted += 1  # a new announcement replaces an unfinished session
            elif len(self._sessions) >= self._max:
                oldest = min(self._sessions, key=lambda k: self._sessions[k].last_ns)
                del self._sessions[oldest]
                self.stats.overflowed += 1
            self._sessions[key] = _Session(pgn, size, packets, t_ns, bytearray(7 * packets))
        elif control == ABORT:
            # either side may abort: the sender (source -> destination) or the receiver (reversed)
            for key in ((source, destination), (destination, source)):
                session = self._sessions.get(key)
                if session is not None and session.pgn == pgn:
                    del self._sessions[key]
                    self.stats.aborted += 1
        elif control in (CTS, EOM_ACK):
            session = self._sessions.get((destination, source))  # sent by the receiver
            if session is not None:
                session.last_ns = t_ns
        else:
            self.stats.malformed += 1

    def _data(self, source: int, destination: int, data: bytes, t_ns: int) -> _Session | None:
        session = self._sessions.get((source, destination))
        if session is None or len(data) < 2:
            return None  # a packet of a session begun before we listened, or of one we gave up
        seq = data[0]
        if not 1 <= seq <= session.packets:
            self.stats.malformed += 1
            return None
        chunk = data[1:8]
        session.data[7 * (seq - 1) : 7 * (seq - 1) + len(chunk)] = chunk
        session.have.add(seq)
        session.last_ns = t_ns
        if len(session.have) < session.packets:
            return None
        del self._sessions[(source, destination)]
        self.stats.completed += 1
        return session

    def _expire(self, now_ns: int) -> None:
        stale = [k for k, s in self._sessions.items() if now_ns - s.last_ns > self._timeout]
        for key in stale:
            del self._sessions[key]
            self.stats.timed_out += 1
