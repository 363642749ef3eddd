"""Fleet catalog ids: one id per signal path across a fleet, assigned by the cloud, cached by the device.

The id space of a segment (uint32) is cut in two so that a reader can tell which kind an id is without
asking anyone: ``1 .. 2^31-1`` are the fleet's ids (the cloud's database assigns them, once per path,
forever), ``2^31 .. 2^32-1`` are device-local ids a device gives a signal it has no fleet id for yet (it
started offline, or the signal is new). A device never reuses a local id for another path, so a segment
written under a local id still decodes after the signal got its fleet id: the cloud keeps each local id
as an alias of the fleet id and rewrites segments on ingest (:func:`remap_segment`). Id ``0`` is never
valid.

Everything here is pure: the checks both sides run on catalogs and assignments from the other (hostile
or inconsistent input is :class:`~fleetloop_shared.errors.MalformedMessageError`, an IntegrityError),
and the decoder of the wire's ``CatalogAssignment``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fleetloop_shared.catalog import DataType, SignalSpec
from fleetloop_shared.errors import MalformedMessageError
from fleetloop_shared.segment.model import Segment
from fleetloop_shared.wire import device_pb2

#: Largest fleet id; fleet ids are 1 .. FLEET_ID_MAX.
FLEET_ID_MAX = 2**31 - 1
#: Device-local ids are LOCAL_ID_MIN .. LOCAL_ID_MAX (the upper half of a segment's uint32 ids).
LOCAL_ID_MIN = 2**31
LOCAL_ID_MAX = 2**32 - 1
#: Signals one assignment may carry (a fleet's catalog is bounded by what fits one control message).
MAX_ASSIGNED = 100_000
#: Longest signal path accepted (VSS paths are far shorter; bounds what a hostile peer makes us keep).
MAX_PATH_CHARS = 512


def is_fleet_id(signal_id: int) -> bool:
    return 1 <= signal_id <= FLEET_ID_MAX


def is_local_id(signal_id: int) -> bool:
    return LOCAL_ID_MIN <= signal_id <= LOCAL_ID_MAX


def check_unique(entries: Iterable[tuple[int, str]], where: str) -> dict[str, int]:
    """``path → id`` of ``entries``; MalformedMessageError when an id is 0 or beyond uint32, a path is
    empty or too long, or an id or a path comes twice."""
    by_path: dict[str, int] = {}
    by_id: dict[int, str] = {}
    for signal_id, path in entries:
        if not 1 <= signal_id <= LOCAL_ID_MAX:
            raise MalformedMessageError(
                f"{where}: signal {path!r} has id {signal_id}, outside 1 .. {LOCAL_ID_MAX}"
            )
        if not path or len(path) > MAX_PATH_CHARS:
            raise MalformedMessageError(f"{where}: a signal path must be 1 to {MAX_PATH_CHARS} characters")
        if path in by_path:
            raise MalformedMessageError(f"{where}: signal {path!r} comes twice")
        if signal_id in by_id:
            raise MalformedMessageError(
                f"{where}: id {signal_id} names both {by_id[signal_id]!r} and {path!r}"
            )
        by_path[path] = signal_id
        by_id[signal_id] = path
    return by_path


def check_consistent(known: Mapping[str, int], new: Mapping[str, int], where: str) -> None:
    """A path keeps its id and an id keeps its path: MalformedMessageError when ``new`` reassigns
    either of what ``known`` holds (both ``path → id``, each already unique)."""
    paths_of = {i: p for p, i in known.items()}
    for path, signal_id in new.items():
        had = known.get(path)
        if had is not None and had != signal_id:
            raise MalformedMessageError(f"{where}: signal {path!r} has id {had}, not {signal_id}")
        owner = paths_of.get(signal_id)
        if owner is not None and owner != path:
            raise MalformedMessageError(f"{where}: id {signal_id} is {owner!r}'s, not {path!r}'s")


@dataclass(frozen=True)
class Assignment:
    """The fleet's ids of a device's signals, and the signals the fleet refused with the reason."""

    fleet: str
    signals: tuple[SignalSpec, ...]
    refused: tuple[tuple[str, str], ...] = ()

    def to_wire(self) -> device_pb2.CatalogAssignment:
        msg = device_pb2.CatalogAssignment(fleet=self.fleet)
        for s in self.signals:
            msg.signals.add(id=s.id, path=s.path, data_type=int(s.data_type), unit=s.unit)
        for path, reason in self.refused:
            msg.refused.add(path=path, reason=reason)
        return msg


def assignment_from_wire(msg: device_pb2.CatalogAssignment) -> Assignment:
    """The assignment a cloud sent, checked: fleet ids only, each id and path once, known datatypes.
    Anything else is MalformedMessageError (the device keeps what it has)."""
    where = f"catalog assignment for fleet {msg.fleet!r}"
    if len(msg.signals) > MAX_ASSIGNED or len(msg.refused) > MAX_ASSIGNED:
        raise MalformedMessageError(f"{where}: more than {MAX_ASSIGNED} signals")
    check_unique(((s.id, s.path) for s in msg.signals), where)
    signals = []
    for s in msg.signals:
        if not is_fleet_id(s.id):
            raise MalformedMessageError(f"{where}: signal {s.path!r} got id {s.id}, not a fleet id")
        try:
            data_type = DataType(s.data_type)
        except ValueError:
            raise MalformedMessageError(
                f"{where}: signal {s.path!r} has unknown datatype {s.data_type}"
            ) from None
        signals.append(SignalSpec(s.id, s.path, data_type, s.unit[:MAX_PATH_CHARS]))
    refused = tuple((r.path[:MAX_PATH_CHARS], r.reason[:MAX_PATH_CHARS]) for r in msg.refused)
    return Assignment(msg.fleet, tuple(signals), refused)


def remap_segment(segment: Segment, ids: Mapping[int, int]) -> Segment:
    """``segment`` with its signal ids replaced through ``ids`` (ids not in it stay); every group of a
    bundled segment. MalformedMessageError when two of a group's ids would become one."""
    if not ids:
        return segment

    def one(group: Segment) -> Segment:
        columns = {ids.get(k, k): v for k, v in group.columns.items()}
        if len(columns) != len(group.columns):
            raise MalformedMessageError(
                f"segment {group.segment_id.hex()}: group {group.group!r} names one signal under two ids"
            )
        types = {ids.get(k, k): v for k, v in group.data_types.items()}
        return dataclasses.replace(group, columns=columns, data_types=types, more_groups=())

    head = one(segment)
    if not segment.more_groups:
        return head
    return dataclasses.replace(head, more_groups=tuple(one(g) for g in segment.more_groups))
