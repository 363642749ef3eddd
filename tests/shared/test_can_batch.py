"""The batch decoder gives exactly cantools' values, frame for frame: on every recording of the real data
set with its DBCs, and on generated layouts (byte orders, signedness, IEEE floats, scale/offset,
multiplexing, CAN FD widths) against cantools' own decode of random payloads."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import cantools
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetloop_agent.recordings import read_can_frames
from fleetloop_shared.can_batch import BatchDecoder, FrameBatch
from fleetloop_shared.dbc import DbcDatabase, FrameDecoder, load_dbc


def _same(a: Any, b: Any) -> bool:
    """Equal values of the same kind (int vs float), NaN equal to NaN."""
    if isinstance(a, float) or isinstance(b, float):
        if not (isinstance(a, float) and isinstance(b, float)):
            return False
        return (math.isnan(a) and math.isnan(b)) or a == b
    return int(a) == int(b)


def assert_batch_equals_cantools(db: DbcDatabase, batch: FrameBatch, chunk: int = 4096) -> int:
    """Decode ``batch`` both ways (in chunks) and compare every frame; returns frames compared."""
    names = db.message_names()
    reference: FrameDecoder = db.decoder(names)
    decoder = BatchDecoder([db.layout(m) for m in names])
    compared = 0
    for lo in range(0, len(batch), chunk):
        part = batch.take(slice(lo, lo + chunk))
        got: dict[int, tuple[str, dict[str, Any]]] = {}
        for message in decoder.decode(part):
            for k, row in enumerate(message.rows.tolist()):
                values = {
                    name: column[k].item() if isinstance(column[k], np.generic) else column[k]
                    for name, column in message.values.items()
                    if name not in message.present or bool(message.present[name][k])
                }
                got[row] = (message.layout.name, values)
        for row in range(len(part)):
            data = part.payload[row, : int(part.length[row])].tobytes()
            want = reference.decode(int(part.frame_id[row]), data)
            have = got.get(row)
            if want is None:
                assert have is None, f"row {lo + row}: cantools refuses id {part.frame_id[row]:#x}, we decode"
                continue
            assert have is not None, f"row {lo + row}: id {part.frame_id[row]:#x} {data.hex()} not decoded"
            assert have[0] == want[0]
            assert set(have[1]) == set(want[1]), f"row {lo + row}: signals differ"
            for name, value in want[1].items():
                assert _same(have[1][name], value), (
                    f"row {lo + row} {want[0]}.{name}: {have[1][name]!r} != {value!r}"
                )
            compared += 1
    assert decoder.errors_total == reference.errors_total
    return compared


def _frames(path: Path, bus: int | None = None) -> FrameBatch:
    frames = read_can_frames(path)
    assert frames is not None
    keep = np.ones(len(frames.t_ns), bool) if bus is None else frames.bus == bus
    rows = np.flatnonzero(keep).tolist()
    return FrameBatch.from_payloads(
        frames.t_ns[keep], frames.frame_id[keep], [frames.data[i] for i in rows], width=64
    )


def _cases(root: Path) -> list[tuple[str, Path, int | None, Path]]:
    comma = next((root / "comma2k19").rglob("raw_can"))
    kona = root / "kona-ev"
    css = root / "css-electronics"
    cases = [
        ("comma2k19 bus 0", comma, 0, root / "opendbc" / "toyota_rav4_2017_pt_generated.dbc"),
        ("comma2k19 bus 1", comma, 1, root / "opendbc" / "toyota_adas.dbc"),
        (
            "j1939 truck",
            css / "j1939_truck_400s" / "00000001.MF4",
            None,
            css / "dbc" / "CSS-Electronics-SAE-J1939-DEMO.dbc",
        ),
        (
            "canmod gps",
            css / "canmod_gps_obd2_545s" / "00000001-60FE3F04.MF4",
            None,
            css / "dbc" / "canmod-gps.dbc",
        ),
    ]
    for log in sorted(kona.glob("*.csv")) + sorted(kona.glob("*.asc")):
        for dbc in sorted((kona / "dbc").glob("*.dbc")):
            cases.append((f"{log.name} {dbc.name}", log, None, dbc))
    return cases


def test_equal_to_cantools_on_every_real_recording(recordings: Path) -> None:
    total = 0
    for label, log, bus, dbc in _cases(recordings):
        compared = assert_batch_equals_cantools(load_dbc(dbc), _frames(log, bus))
        if "bcan" not in label and "comp_can" not in label and "ccan" not in label:
            assert compared > 0, f"{label}: no frame of the DBC decoded"
        total += compared
    assert total > 150_000


# -- generated layouts ---------------------------------------------------------------------------------


@st.composite
def _message(draw: st.DrawFn, frame_id: int = 0x123, name: str = "GEN", extended: bool = False) -> Any:
    from cantools.database.can import Message, Signal
    from cantools.database.conversion import BaseConversion

    length = draw(st.sampled_from([1, 2, 4, 8, 8, 8, 12, 16, 32, 64]))
    bits = 8 * length
    signals = []
    mux_ids: list[int] = []
    # Signals never overlap: cantools lays out one bit format per byte order, and overlapping fields
    # (a broken DBC) shift each other there instead of reading the bits the DBC declares.
    used: set[int] = set()
    if draw(st.booleans()) and bits >= 8:
        signals.append(Signal("MUX", start=0, length=4, byte_order="little_endian", is_multiplexer=True))
        used.update(range(4))
        mux_ids = sorted(draw(st.sets(st.integers(0, 15), min_size=1, max_size=4)))
    for k in range(draw(st.integers(1, 6))):
        is_float = draw(st.integers(0, 9)) == 0 and bits >= 32
        size = (
            draw(st.sampled_from([32, 64] if bits >= 64 else [32]))
            if is_float
            else draw(st.integers(1, min(64, bits)))
        )
        big = draw(st.booleans())
        if big:
            # MSB position in network order, then back to the DBC's sawtooth start bit
            msb = draw(st.integers(0, bits - size))
            start = 8 * (msb // 8) + 7 - msb % 8
            cells = {8 * (p // 8) + 7 - p % 8 for p in range(msb, msb + size)}
        else:
            start = draw(st.integers(0, bits - size))
            cells = set(range(start, start + size))
        if cells & used:
            continue
        used |= cells
        scale = draw(st.sampled_from([1, 1, 2, 0.5, 0.1, -3, 1.0]))
        offset = draw(st.sampled_from([0, 0, 7, -40, 0.25, -1.5]))
        choices = {0: "ZERO", 3: "THREE"} if draw(st.integers(0, 4)) == 0 and not is_float else None
        muxed = bool(mux_ids) and draw(st.booleans())
        signals.append(
            Signal(
                f"S{k}",
                start=start,
                length=size,
                byte_order="big_endian" if big else "little_endian",
                is_signed=draw(st.booleans()) and not is_float,
                conversion=BaseConversion.factory(
                    scale=scale, offset=offset, choices=choices, is_float=is_float
                ),
                multiplexer_ids=[draw(st.sampled_from(mux_ids))] if muxed else None,
                multiplexer_signal="MUX" if muxed else None,
            )
        )
    return Message(
        frame_id=frame_id,
        name=name,
        is_extended_frame=extended,
        length=length,
        signals=signals,
        is_fd=length > 8,
        strict=False,
    )


@settings(max_examples=150, deadline=None)
@given(message=_message(), seed=st.integers(0, 2**32 - 1))
def test_equal_to_cantools_on_generated_layouts(message: Any, seed: int) -> None:
    db = DbcDatabase(cantools.database.can.Database(messages=[message], strict=False))
    rng = np.random.default_rng(seed)
    n = 64
    lengths = rng.choice([message.length, message.length, max(0, message.length - 1), 64], size=n)
    payloads = [rng.integers(0, 256, size=int(x), dtype=np.uint8).tobytes() for x in lengths]
    batch = FrameBatch.from_payloads(np.arange(n), np.full(n, 0x123), payloads, width=64)
    assert_batch_equals_cantools(db, batch, chunk=17)


@st.composite
def _database(draw: st.DrawFn) -> Any:
    """Several generated messages in one database (ids of 11 bits, or 29 when extended)."""
    extended = draw(st.booleans())
    ids = draw(st.sets(st.integers(0, (1 << 29) - 1 if extended else 0x7FF), min_size=2, max_size=5))
    return [draw(_message(frame_id=i, name=f"M{k}", extended=extended)) for k, i in enumerate(sorted(ids))]


@settings(max_examples=60, deadline=None)
@given(messages=_database(), seed=st.integers(0, 2**32 - 1))
def test_equal_to_cantools_on_generated_databases(messages: list[Any], seed: int) -> None:
    """The flat path: every message of a batch decoded in the same arrays, frames of several messages
    (and ids of none) interleaved, classic and FD widths in one batch."""
    db = DbcDatabase(cantools.database.can.Database(messages=messages, strict=False))
    rng = np.random.default_rng(seed)
    n = 200
    ids = rng.choice([m.frame_id for m in messages] + [0x7FF if messages[0].frame_id != 0x7FF else 0], size=n)
    by_id = {m.frame_id: m.length for m in messages}
    lengths = [
        int(rng.choice([by_id.get(int(i), 8), by_id.get(int(i), 8), max(0, by_id.get(int(i), 8) - 1), 64]))
        for i in ids
    ]
    payloads = [rng.integers(0, 256, size=x, dtype=np.uint8).tobytes() for x in lengths]
    batch = FrameBatch.from_payloads(np.arange(n), ids, payloads, width=64)
    for chunk in (7, 64, n):
        assert_batch_equals_cantools(db, batch, chunk=chunk)
    # a classic bus: rows of 8 bytes, where FD messages of the DBC can never fit
    classic = FrameBatch.from_payloads(np.arange(n), ids, [p[:8] for p in payloads], width=8)
    assert_batch_equals_cantools(db, classic, chunk=n)


def test_choice_labels_are_cantools_choices(recordings: Path) -> None:
    db = load_dbc(recordings / "opendbc" / "toyota_rav4_2017_pt_generated.dbc")
    batch = _frames(next((recordings / "comma2k19").rglob("raw_can")), 0).take(slice(0, 20_000))
    decoder = BatchDecoder([db.layout(m) for m in db.message_names()])
    seen = 0
    for message in decoder.decode(batch):
        cm = db._message(message.layout.name)  # the cantools message behind the adapter
        for s in message.layout.signals:
            if not s.choices:
                continue
            labels = message.labels(s.name)
            for k, row in enumerate(message.rows.tolist()[:50]):
                data = batch.payload[row, : int(batch.length[row])].tobytes()
                want = cm.decode(data, decode_choices=True, scaling=True)[s.name]
                assert str(labels[k]) == str(want)
                seen += 1
    assert seen > 100


def test_j1939_frames_match_by_pgn_whatever_the_source_address(recordings: Path) -> None:
    css = recordings / "css-electronics"
    db = load_dbc(css / "dbc" / "CSS-Electronics-SAE-J1939-DEMO.dbc")
    batch = _frames(css / "j1939_truck_400s" / "00000001.MF4")
    decoder = BatchDecoder([db.layout(m) for m in db.message_names()])
    decoded = {m.layout.name: m for m in decoder.decode(batch)}
    assert set(decoded) == {"EEC1", "CCVS1"}
    for message in decoded.values():
        ids = np.unique(batch.frame_id[message.rows])
        assert all(i != message.layout.frame_id for i in ids.tolist()) or len(ids) >= 1
    rpm = decoded["EEC1"].values["EngineSpeed"]
    assert rpm.dtype == np.float64 and rpm.size > 1000


def test_short_and_unknown_frames_are_counted_not_raised(tmp_path: Path) -> None:
    from cantools.database.can import Message, Signal

    msg = Message(0x10, "M", 8, [Signal("A", 0, 16), Signal("B", 16, 8, is_signed=True)], strict=False)
    db = DbcDatabase(cantools.database.can.Database(messages=[msg], strict=False))
    decoder = BatchDecoder([db.layout("M")])
    batch = FrameBatch.from_payloads(
        [1, 2, 3], [0x10, 0x10, 0x99], [b"\x01\x02\xff" + bytes(5), b"\x01", bytes(8)]
    )
    (m,) = decoder.decode(batch)
    assert m.rows.tolist() == [0]
    assert m.values["A"].tolist() == [0x0201] and m.values["B"].tolist() == [-1]
    assert decoder.errors_total == 1


def test_a_float_scaled_past_the_largest_double_is_infinite_as_in_cantools() -> None:
    """A DBC whose scale takes an IEEE float signal past the largest double gives ±inf, as cantools' own
    arithmetic does — a value, not a numpy overflow warning in the agent's log."""
    import warnings

    from cantools.database.can import Message, Signal
    from cantools.database.conversion import BaseConversion

    wide = BaseConversion.factory(scale=-3, offset=0, choices=None, is_float=True)
    msg = Message(0x10, "F", 8, [Signal("X", 0, 64, conversion=wide)], strict=False)
    db = DbcDatabase(cantools.database.can.Database(messages=[msg], strict=False))
    largest = np.array([np.finfo(np.float64).max, 1.5, -np.finfo(np.float64).max]).tobytes()
    batch = FrameBatch.from_payloads([1, 2, 3], [0x10] * 3, [largest[k : k + 8] for k in (0, 8, 16)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (m,) = BatchDecoder([db.layout("F")]).decode(batch)
        assert assert_batch_equals_cantools(db, batch) == 3
    assert m.values["X"].tolist() == [-math.inf, -4.5, math.inf]


@pytest.mark.parametrize("width", [8, 64])
def test_empty_batch(width: int) -> None:
    assert BatchDecoder([]).decode(FrameBatch.empty(width)) == []


def test_ids_outside_the_dense_table_match_nothing() -> None:
    """Ids below 0 or above 11 bits never reach the message of id 0 or 0x7FF (the table's ends)."""
    from cantools.database.can import Message, Signal

    low = Message(0x0, "LOW", 8, [Signal("A", 0, 8)], strict=False)
    high = Message(0x7FF, "HIGH", 8, [Signal("B", 0, 8)], strict=False)
    db = DbcDatabase(cantools.database.can.Database(messages=[low, high], strict=False))
    decoder = BatchDecoder([db.layout("LOW"), db.layout("HIGH")])
    ids = [-1, 0x800, 0x7FF, 0, -(1 << 40), 1 << 40]
    batch = FrameBatch.from_payloads(range(6), ids, [bytes([k]) * 8 for k in range(6)])
    decoded = {
        m.layout.name: (m.rows.tolist(), m.values[m.layout.signals[0].name].tolist())
        for m in decoder.decode(batch)
    }
    assert decoded == {"LOW": ([3], [3]), "HIGH": ([2], [2])}
    assert decoder.errors_total == 0


@settings(max_examples=60, deadline=None)
@given(
    ids=st.lists(
        st.one_of(
            st.integers(0x800, 0x1FFFFFFF), st.sampled_from([0x18FEF100, 0x0CF00400, 0x18FEF1FE, 0x0CF004FF])
        ),
        min_size=1,
        max_size=300,
    ),
    hostile=st.lists(st.integers(-(1 << 62), 1 << 62), max_size=5),
    batches=st.integers(1, 4),
)
def test_29_bit_ids_are_looked_up_as_message_index_says(
    ids: list[int], hostile: list[int], batches: int
) -> None:
    """The hashed id table (29-bit and J1939 buses) gives every frame the message ``message_index``
    gives its id, across batches that teach it new ids, with colliding slots and hostile ids."""
    from cantools.database.can import Message, Signal

    eec1 = Message(
        0x0CF00400, "EEC1", 8, [Signal("Rpm", 24, 16)], is_extended_frame=True, strict=False, protocol="j1939"
    )
    ccvs = Message(
        0x18FEF100,
        "CCVS1",
        8,
        [Signal("Speed", 8, 16)],
        is_extended_frame=True,
        strict=False,
        protocol="j1939",
    )
    plain = Message(0x1ABCDEF0, "PLAIN", 8, [Signal("X", 0, 8)], strict=False, is_extended_frame=True)
    db = DbcDatabase(cantools.database.can.Database(messages=[eec1, ccvs, plain], strict=False))
    decoder = BatchDecoder([db.layout(m) for m in ("EEC1", "CCVS1", "PLAIN")])
    every = ids + hostile + [0x1ABCDEF0]
    step = max(1, len(every) // batches)
    for a in range(0, len(every), step):
        chunk = np.array(every[a : a + step] + every[:a], np.int64)  # old ids again, and new ones
        got = decoder._which(chunk).tolist()
        assert got == [decoder.message_index(int(i)) for i in chunk.tolist()]
