"""Fleet catalog ids, the pure part both sides share: id ranges, the checks on catalogs and assignments
from a peer (hostile input is MalformedMessageError, an IntegrityError, and nothing else), the
assignment's decoder under fuzzing, and rewriting a segment's ids."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetloop_shared.catalog import Catalog, DataType, SignalSpec
from fleetloop_shared.catalog_ids import (
    FLEET_ID_MAX,
    LOCAL_ID_MAX,
    LOCAL_ID_MIN,
    Assignment,
    assignment_from_wire,
    check_consistent,
    check_unique,
    is_fleet_id,
    is_local_id,
    remap_segment,
)
from fleetloop_shared.errors import IntegrityError, MalformedMessageError
from fleetloop_shared.segment import Segment, decode_segment, encode_segment, new_segment_id
from fleetloop_shared.wire import device_pb2, parse


def test_the_id_space_is_cut_in_two_and_zero_is_neither() -> None:
    assert is_fleet_id(1) and is_fleet_id(FLEET_ID_MAX) and not is_fleet_id(LOCAL_ID_MIN)
    assert is_local_id(LOCAL_ID_MIN) and is_local_id(LOCAL_ID_MAX) and not is_local_id(FLEET_ID_MAX)
    assert not is_fleet_id(0) and not is_local_id(0) and not is_local_id(LOCAL_ID_MAX + 1)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([(1, "A"), (1, "B")], "id 1 names both 'A' and 'B'"),
        ([(1, "A"), (2, "A")], "signal 'A' comes twice"),
        ([(0, "A")], "has id 0, outside 1"),
        ([(LOCAL_ID_MAX + 1, "A")], "outside 1"),
        ([(3, "")], "path must be 1 to"),
        ([(3, "x" * 513)], "path must be 1 to"),
    ],
)
def test_a_catalog_with_an_id_or_path_twice_or_out_of_range_is_refused(
    entries: list[tuple[int, str]], message: str
) -> None:
    with pytest.raises(MalformedMessageError, match=message):
        check_unique(entries, "hello from car-1")


def test_a_path_keeps_its_id_and_an_id_its_path() -> None:
    check_consistent({"A": 1, "B": 2}, {"A": 1, "C": 3}, "w")  # new paths, same ids: fine
    with pytest.raises(MalformedMessageError, match="signal 'A' has id 1, not 7"):
        check_consistent({"A": 1}, {"A": 7}, "w")
    with pytest.raises(MalformedMessageError, match="id 1 is 'A'"):
        check_consistent({"A": 1}, {"B": 1}, "w")


def assignment_msg(*signals: tuple[int, str, int], fleet: str = "taxi") -> device_pb2.CatalogAssignment:
    msg = device_pb2.CatalogAssignment(fleet=fleet)
    for i, path, dtype in signals:
        msg.signals.add(id=i, path=path, data_type=dtype, unit="u")  # type: ignore[arg-type]
    return msg


def test_an_assignment_round_trips_through_the_wire() -> None:
    a = Assignment("taxi", (SignalSpec(1, "Vehicle.Speed", DataType.FLOAT64, "km/h"),
                            SignalSpec(2, "Vehicle.Gear", DataType.STRING)), (("X", "reason"),))  # fmt: skip
    wire = parse(device_pb2.CatalogAssignment, a.to_wire().SerializeToString())
    assert assignment_from_wire(wire) == a


@pytest.mark.parametrize(
    ("signals", "message"),
    [
        ([(1, "A", 1), (1, "B", 1)], "id 1 names both"),
        ([(1, "A", 1), (2, "A", 1)], "comes twice"),
        ([(LOCAL_ID_MIN, "A", 1)], "not a fleet id"),
        ([(0, "A", 1)], "outside 1"),
        ([(1, "A", 9)], "unknown datatype 9"),
    ],
)
def test_a_hostile_assignment_is_refused(signals: list[tuple[int, str, int]], message: str) -> None:
    with pytest.raises(MalformedMessageError, match=message):
        assignment_from_wire(assignment_msg(*signals))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_the_assignment_decoder_never_raises_anything_but_an_integrity_error(data: bytes) -> None:
    try:
        a = assignment_from_wire(parse(device_pb2.CatalogAssignment, data))
    except IntegrityError:
        return
    # what it accepts is consistent: fleet ids, each id and path once, known datatypes
    assert all(is_fleet_id(s.id) for s in a.signals)
    assert len({s.id for s in a.signals}) == len({s.path for s in a.signals}) == len(a.signals)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.text(max_size=6), st.integers(0, 6)), max_size=12))
def test_structured_assignments_are_accepted_exactly_when_consistent(
    signals: list[tuple[int, str, int]],
) -> None:
    msg = assignment_msg(*signals)
    ids, paths = [s[0] for s in signals], [s[1] for s in signals]
    valid = (
        len(set(ids)) == len(ids) and len(set(paths)) == len(paths)
        and all(is_fleet_id(i) and p and 1 <= t <= 4 for i, p, t in signals)
    )  # fmt: skip
    try:
        a = assignment_from_wire(msg)
    except MalformedMessageError:
        assert not valid
        return
    assert valid and [(s.id, s.path, int(s.data_type)) for s in a.signals] == signals


def test_a_segment_is_rewritten_to_fleet_ids_in_every_group_and_still_decodes() -> None:
    sid = new_segment_id()
    t = np.arange(5, dtype=np.int64) * 1000
    nine = LOCAL_ID_MIN + 9
    second = Segment(sid, "b", t + 7, {nine: np.arange(5.0)}, {nine: DataType.FLOAT64})
    seg = Segment(sid, "a", t, {LOCAL_ID_MIN + 1: np.arange(5, dtype=np.int64), 3: np.ones(5)},
                  {LOCAL_ID_MIN + 1: DataType.INT64, 3: DataType.FLOAT64}, (second,))  # fmt: skip
    out = remap_segment(decode_segment(encode_segment(seg)), {LOCAL_ID_MIN + 1: 7, LOCAL_ID_MIN + 9: 8})
    groups = decode_segment(encode_segment(out)).groups()
    assert [sorted(g.columns) for g in groups] == [[3, 7], [8]]
    assert groups[0].data_types[7] is DataType.INT64 and groups[1].data_types[8] is DataType.FLOAT64
    assert list(groups[0].columns[7]) == [0, 1, 2, 3, 4]
    assert remap_segment(seg, {}) is seg
    with pytest.raises(MalformedMessageError, match="one signal under two ids"):
        remap_segment(seg, {LOCAL_ID_MIN + 1: 3})


def test_a_catalog_takes_its_ids_from_the_assigner_it_is_given() -> None:
    given_ids = iter([40, LOCAL_ID_MIN + 5])
    c = Catalog(assign=lambda path, dtype, unit: next(given_ids))
    assert c.add("A", DataType.FLOAT64).id == 40 and c.add("B", DataType.INT64).id == LOCAL_ID_MIN + 5
    assert c.add("A", DataType.FLOAT64).id == 40  # idempotent: the assigner is not asked again
    assert [s.id for s in Catalog() if s] == [] and Catalog().add("A", DataType.BOOL).id == 1
