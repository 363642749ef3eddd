"""python-can-remote's stream, read in bulk: whatever the frames and however the reads cut the stream, the
parser gives exactly the frames python-can-remote's own encoder sent, in order; control frames come
back for the caller; a frame no CAN server would send is refused; receive stamps never go backwards."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetloop_agent.sources import can_remote
from fleetloop_agent.sources.can_remote import Frames, RemoteStreamError, parse, receive_stamps

HEADER = struct.Struct(">dIBB")


def websocket(opcode: int, payload: bytes, mask: bytes | None = None) -> bytes:
    """A websocket frame as RFC 6455 lays it out (python-can-remote's server sends them unmasked)."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    size = bytes([n]) if n < 126 else bytes([126]) + n.to_bytes(2, "big")
    if mask is None:
        return head + size + payload
    size = bytes([size[0] | 0x80]) + size[1:]
    return head + size + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def can_frame(ts: float, frame_id: int, data: bytes, flags: int = 0) -> bytes:
    return bytes([can_remote.CAN_FRAME]) + HEADER.pack(ts, frame_id, len(data), flags) + data


frames_st = st.lists(
    st.tuples(
        st.floats(0, 2e9, allow_nan=False),
        st.integers(0, 0x1FFFFFFF),
        st.binary(max_size=64),
        st.sampled_from([0, 1, 2, 4, 8]),  # extended, remote, error, FD
        st.booleans(),  # masked
    ),
    max_size=60,
)


@given(frames_st, st.lists(st.integers(1, 200), max_size=30))
def test_any_cut_of_the_stream_gives_the_frames_sent(
    sent: list[tuple[float, int, bytes, int, bool]], cuts: list[int]
) -> None:
    stream = b"".join(
        websocket(can_remote.BINARY, can_frame(ts, i, d, f), b"\x01\x02\x03\x04" if m else None)
        for ts, i, d, f, m in sent
    )
    out, pending, at = Frames(), bytearray(), 0
    for size in [*cuts, len(stream)]:
        pending += stream[at : at + size]
        at += size
        del pending[: parse(pending, out)]
    assert not pending
    kept = [
        (ts, i, d)
        for ts, i, d, f, _ in sent
        if not f & (can_remote.IS_ERROR_FRAME | can_remote.IS_REMOTE_FRAME)
    ]
    assert list(zip(out.bus_s, out.ids, out.payloads, strict=True)) == kept
    assert out.error_frames == sum(1 for *_, f, _ in sent if f & can_remote.IS_ERROR_FRAME)


def test_control_frames_come_back_and_a_huge_frame_is_refused() -> None:
    stream = websocket(can_remote.PING, b"hi") + websocket(
        can_remote.TEXT, b'{"type": "error", "payload": "x"}'
    )
    stream += websocket(can_remote.BINARY, can_frame(1.0, 0x123, b"\x01\x02"))
    out = Frames()
    assert parse(stream, out) == len(stream)
    assert out.control == [(can_remote.PING, b"hi"), (can_remote.TEXT, b'{"type": "error", "payload": "x"}')]
    assert out.ids == [0x123]
    huge = bytes([0x82, 127]) + (1 << 40).to_bytes(8, "big")
    with pytest.raises(RemoteStreamError, match="websocket frame of"):
        parse(huge, Frames())


@given(st.lists(st.floats(0, 1e4, allow_nan=False), min_size=1, max_size=50), st.integers(0, 10**12),
       st.integers(0, 10**12))  # fmt: skip
def test_receive_stamps_never_go_backwards_nor_after_the_read(
    bus_s: list[float], received: int, floor: int
) -> None:
    stamps = receive_stamps(bus_s, received, floor)
    assert len(stamps) == len(bus_s)
    assert all(a <= b for a, b in itertools.pairwise(stamps))
    assert stamps[0] >= floor and stamps[-1] == max(received, floor)


def test_receive_stamps_keep_the_spacing_on_the_bus() -> None:
    assert receive_stamps([10.0, 10.001, 10.003], 5_000_000_000, 0) == [
        4_997_000_000,
        4_998_000_000,
        5_000_000_000,
    ]
