"""Fleet catalogs: one id per signal path across a fleet, assigned here and cached by the devices
(docs/decisions/0032-fleet-catalog-ids.md).

Two ways in: a device's hello (its signals get the fleet's ids, and the cloud keeps what that device's
segments may carry — the fleet ids, and the device-local ids it wrote before an id was assigned, as
aliases), and an operator pre-registering a catalog (``fleetloop catalog push``). A device from before
fleet ids keeps its own ids; its paths still join the fleet's catalog. Transport-free, like every
service: a :class:`~.access.Caller` and ``now`` in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fleetloop_cloud.repositories.interfaces import FleetCatalogRepository
from fleetloop_cloud.services.access import Access, Caller
from fleetloop_shared.catalog import DataType, SignalSpec, data_type_named
from fleetloop_shared.catalog_ids import (
    MAX_ASSIGNED,
    MAX_PATH_CHARS,
    Assignment,
    check_unique,
    is_fleet_id,
    is_local_id,
)
from fleetloop_shared.errors import MalformedMessageError, UserError

log = logging.getLogger("fleetloop.cloud")

#: Device-local ids kept per path as aliases (a device reinstalled many times offline); beyond it the
#: oldest alias goes, and segments still carrying it are refused as naming an unknown id.
MAX_ALIASES = 16

Entry = dict[str, Any]


def _declared(entries: Sequence[Mapping[str, Any]]) -> list[tuple[str, DataType, str]]:
    return [(str(e["path"]), DataType[str(e["data_type"])], str(e.get("unit", ""))) for e in entries]


def aliases_of(entries: Sequence[Mapping[str, Any]]) -> dict[int, int]:
    """Device-local id → the id the device's catalog now has for that path (what ingest rewrites)."""
    return {int(a): int(e["id"]) for e in entries for a in e.get("aliases", ())}


def merge_device_catalog(
    where: str, hello: Sequence[Mapping[str, Any]], previous: Sequence[Mapping[str, Any]],
    assignment: Assignment,
    fleet_catalog: Mapping[str, int],
    on_drop: Callable[[int], None] | None = None,
) -> list[Entry]:
    """What a fleet-ids device's segments may name, after this hello: each path under its fleet id when
    the fleet assigned one (its local ids kept as aliases), else under its local id; paths of earlier
    hellos are kept (segments of signals since removed may still be on their way) while
    ``fleet_catalog`` (the fleet's path → id) agrees with them.

    MalformedMessageError when the hello claims a fleet id the fleet did not give that path, or a local
    id that named another path before (a path reassigned). ``on_drop`` is told how many aliases the
    :data:`MAX_ALIASES` bound dropped (oldest first)."""
    by_path = check_unique(((int(e["id"]), str(e["path"])) for e in hello), where)
    fleet_of = {s.path: s.id for s in assignment.signals}
    for path, sid in by_path.items():
        if is_fleet_id(sid) and fleet_of.get(path) != sid:
            theirs = fleet_of.get(path)
            raise MalformedMessageError(
                f"{where}: signal {path!r} claims fleet id {sid}; "
                + (f"the fleet's id for it is {theirs}" if theirs else "the fleet has assigned it none")
            )
    local: dict[str, list[int]] = {}
    for e in previous:  # what earlier hellos said (an old agent's ids are neither local nor aliases)
        ids = [int(a) for a in e.get("aliases", ())] + ([int(e["id"])] if is_local_id(int(e["id"])) else [])
        local.setdefault(str(e["path"]), []).extend(ids)
    owner = {i: path for path, ids in local.items() for i in ids}
    for path, sid in by_path.items():
        if is_local_id(sid):
            had = owner.get(sid, path)
            if had != path:
                raise MalformedMessageError(f"{where}: local id {sid} was {had!r}'s, now {path!r}'s")
            if sid not in local.setdefault(path, []):
                local[path].append(sid)
    entries: dict[str, Entry] = {}
    for e in previous:
        sid = int(e["id"])
        # an old agent's per-device id that happens to be another path's fleet id is not kept
        if is_local_id(sid) or fleet_catalog.get(str(e["path"])) == sid:
            entries[str(e["path"])] = {k: e[k] for k in ("id", "path", "data_type", "unit")}
    for e in hello:
        entries[str(e["path"])] = {k: e[k] for k in ("id", "path", "data_type", "unit")}
    for path, entry in entries.items():
        fid = fleet_of.get(path)
        if fid is not None:
            entry["id"] = fid
        every = [i for i in dict.fromkeys(local.get(path, ())) if i != entry["id"]]
        aliases = every[-MAX_ALIASES:]
        if on_drop is not None and len(every) > len(aliases):
            on_drop(len(every) - len(aliases))
        if aliases:
            entry["aliases"] = aliases
    return sorted(entries.values(), key=lambda e: int(e["id"]))


def catalog_file_signals(document: Any, where: str) -> list[tuple[str, DataType, str]]:
    """The signals of a catalog file (``fleetloop catalog import``'s output: ``{signals: [{path,
    data_type, unit, ...}]}``), checked; UserError names the entry that is wrong."""
    signals = document.get("signals") if isinstance(document, dict) else None
    if not isinstance(signals, list):
        raise UserError(f"{where}: expected an object with a list 'signals'")
    if len(signals) > MAX_ASSIGNED:
        raise UserError(f"{where}: more than {MAX_ASSIGNED} signals")
    out: list[tuple[str, DataType, str]] = []
    seen: set[str] = set()
    for i, s in enumerate(signals):
        at = f"{where}: signals[{i}]"
        signal = catalog_signal(s, at)
        if signal[0] in seen:
            raise UserError(f"{at}: signal {signal[0]!r} comes twice")
        seen.add(signal[0])
        out.append(signal)
    return out


def catalog_signal(s: Any, at: str) -> tuple[str, DataType, str]:
    """One entry of a catalog file (``at`` names it in the message): path, datatype, unit."""
    if not isinstance(s, dict):
        raise UserError(f"{at}: expected an object with path and data_type")
    path, dtype, unit = s.get("path"), s.get("data_type"), s.get("unit", "")
    if not isinstance(path, str) or not 0 < len(path) <= MAX_PATH_CHARS:
        raise UserError(f"{at}: path must be text of 1 to {MAX_PATH_CHARS} characters")
    data_type = data_type_named(dtype, f"{at}: signal {path!r}: data_type")
    if not isinstance(unit, str):
        raise UserError(f"{at}: unit must be text")
    return path, data_type, unit[:MAX_PATH_CHARS]


def signal_record(s: SignalSpec) -> dict[str, Any]:
    return {"id": s.id, "path": s.path, "data_type": s.data_type.name.lower(), "unit": s.unit}


class FleetCatalogService:
    """Each fleet's catalog, over the one repository that arbitrates its ids."""

    def __init__(self, catalogs: FleetCatalogRepository, access: Access) -> None:
        self._catalogs = catalogs
        self._access = access
        #: Device-local ids no longer kept as aliases (a path's oldest beyond MAX_ALIASES), for metrics.
        self.aliases_dropped = 0

    # -- devices ----------------------------------------------------------------------------------
    def on_hello(
        self, device_id: str, fleet: str, fleet_ids: bool, hello: Sequence[Mapping[str, Any]],
        previous: Sequence[Mapping[str, Any]],
    ) -> tuple[list[Entry], Assignment | None]:  # fmt: skip
        """The device catalog to store for this hello, and the assignment to send (None for a device
        from before fleet ids, whose own ids are stored as they are)."""
        where = f"hello from {device_id}"
        check_unique(((int(e["id"]), str(e["path"])) for e in hello), where)
        known: dict[str, int] = {}
        if fleet_ids:  # a hostile hello is refused before it adds anything to the fleet's catalog
            paths = [str(e["path"]) for e in (*hello, *previous)]
            found = self._catalogs.lookup(fleet, paths)
            known = {s.path: s.id for s in found}  # ids never change: still true after the assignment
            merge_device_catalog(where, hello, previous, Assignment(fleet, tuple(found)), known)
        assignment = self._catalogs.assign(fleet, _declared(hello))
        for path, reason in assignment.refused:
            log.warning("%s: signal %s keeps its device's id: %s", where, path, reason)
        if not fleet_ids:
            return [dict(e) for e in hello], None
        entries = merge_device_catalog(where, hello, previous, assignment, known, self._count_drops)
        return entries, assignment

    def _count_drops(self, n: int) -> None:
        self.aliases_dropped += n

    # -- operators --------------------------------------------------------------------------------
    def list(self, caller: Caller, fleet: str) -> list[dict[str, Any]]:
        self._access.operator(caller, "catalog.list")
        return [signal_record(s) for s in self._catalogs.signals(fleet)]

    def push(self, caller: Caller, fleet: str, document: Any, now: float) -> dict[str, Any]:
        """Pre-register a fleet's signals (a catalog file): each path gets its fleet id now, before any
        device says hello. A path the fleet has with another datatype is refused (the rest go in)."""
        self._access.operator(caller, "catalog.push")
        if not fleet or len(fleet) > 128:
            raise UserError("a fleet name is 1 to 128 characters")
        signals = catalog_file_signals(document, f"catalog for fleet {fleet!r}")
        before = len(self._catalogs.signals(fleet))
        assignment = self._catalogs.assign(fleet, signals)
        after = len(self._catalogs.signals(fleet))
        self._access.record(caller, "catalog.push", fleet, now, before=f"{before} signals",
                            after=f"{after} signals",
                            detail=f"{len(signals)} pushed, {len(assignment.refused)} refused")  # fmt: skip
        return {
            "fleet": fleet,
            "signals": [signal_record(s) for s in assignment.signals],
            "refused": [{"path": p, "reason": r} for p, r in assignment.refused],
            "added": after - before,
        }
