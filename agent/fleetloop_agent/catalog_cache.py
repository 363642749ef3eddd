"""The device's cache of its fleet's catalog ids, and the local ids it gives signals the fleet has not
assigned yet (docs/decisions/0032-fleet-catalog-ids.md).

The cloud assigns each signal path one id per fleet; the agent learns its signals' ids from the
``CatalogAssignment`` after its welcome and keeps them in ``<state>/catalog_ids.json`` (written
atomically), so an agent that starts offline writes the same ids as the last time it was online. A
signal with no fleet id yet gets a device-local id (upper half of the uint32 space) derived from a hash
of its path, kept in the same file, and never given to another path; the cloud keeps it as an alias, so
segments written under it still decode after the fleet's id arrives.

The ids of a running agent's catalog do not change while it runs (ring buffers and compiled campaigns
hold them); what changes is what a segment carries: :meth:`CatalogIds.segment_ids` maps each local id
that has since got its fleet id, and the runtime rewrites segments through it as it stores them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from fleetloop_shared.catalog import Catalog, DataType, SignalSpec
from fleetloop_shared.catalog_ids import (
    LOCAL_ID_MAX,
    LOCAL_ID_MIN,
    Assignment,
    check_consistent,
    check_unique,
    is_fleet_id,
    is_local_id,
)
from fleetloop_shared.durable import write_atomically
from fleetloop_shared.errors import MalformedMessageError

log = logging.getLogger("fleetloop.agent")

#: Local ids the cache keeps (one per signal the device ever declared without a fleet id).
MAX_LOCAL_IDS = 100_000


def local_id_for(path: str, taken: set[int]) -> int:
    """The local id of ``path``: from a hash of it, so a device whose cache was lost gives a signal the
    same local id again (the next free one on the rare collision)."""
    span = LOCAL_ID_MAX - LOCAL_ID_MIN + 1
    digest = int.from_bytes(hashlib.sha256(path.encode()).digest()[:4], "big")
    candidate = LOCAL_ID_MIN + digest % span
    while candidate in taken:
        candidate = LOCAL_ID_MIN + (candidate - LOCAL_ID_MIN + 1) % span
    return candidate


class CatalogIds:
    """Fleet ids (from the cloud) and local ids (given here), by path, for one fleet."""

    def __init__(self, path: Path, fleet: str) -> None:
        self.path = path
        self.fleet = fleet
        self.fleet_ids: dict[str, SignalSpec] = {}
        self.local_ids: dict[str, int] = {}
        self._dirty = False
        #: Local ids dropped at MAX_LOCAL_IDS (drop-oldest), for metrics.
        self.local_ids_dropped = 0
        self._load()

    def _load(self) -> None:
        if not self.path.is_file():
            return
        try:
            doc = json.loads(self.path.read_text())
            if doc.get("fleet") != self.fleet:
                log.info("catalog ids in %s are fleet %r's, not %r's: starting afresh",
                         self.path, doc.get("fleet"), self.fleet)  # fmt: skip
                return
            fleet_ids = {
                str(p): SignalSpec(int(i), str(p), DataType[str(t)], str(u))
                for p, (i, t, u) in doc["fleet_ids"].items()
            }
            local_ids = {str(p): int(i) for p, i in doc["local_ids"].items()}
            check_unique(((s.id, p) for p, s in fleet_ids.items()), str(self.path))
            check_unique(((i, p) for p, i in local_ids.items()), str(self.path))
            if not all(is_fleet_id(s.id) for s in fleet_ids.values()) or not all(
                is_local_id(i) for i in local_ids.values()
            ):
                raise ValueError("an id outside its range")
        except (OSError, ValueError, KeyError, TypeError, AttributeError, MalformedMessageError) as exc:
            # ids from hashes come back the same; fleet ids come back with the next welcome
            log.warning("ignoring unreadable %s: %s", self.path, exc)
            return
        self.fleet_ids, self.local_ids = fleet_ids, local_ids

    def save(self, *, force: bool = False) -> None:
        """Write the cache if it changed, or ``force``: its existence ends a first start (the store's
        upgrade, :mod:`fleetloop_agent.catalog_upgrade`). Atomically: the old file or the new."""
        if not (self._dirty or force):
            return
        doc: dict[str, Any] = {
            "fleet": self.fleet,
            "fleet_ids": {p: [s.id, s.data_type.name, s.unit] for p, s in sorted(self.fleet_ids.items())},
            "local_ids": dict(sorted(self.local_ids.items())),
        }
        write_atomically(self.path, json.dumps(doc, indent=1).encode())
        self._dirty = False

    def assign(self, path: str, data_type: DataType, unit: str = "") -> int:
        """A new catalog entry's id (the :class:`~fleetloop_shared.catalog.Catalog`'s ``assign``): the
        fleet's when cached with this datatype, else the path's local id (given now if it has none)."""
        known = self.fleet_ids.get(path)
        if known is not None and known.data_type == data_type:
            return known.id
        local = self.local_ids.get(path)
        if local is None:
            if len(self.local_ids) >= MAX_LOCAL_IDS:  # drop-oldest: a path long gone loses its id
                self.local_ids.pop(next(iter(self.local_ids)))
                self.local_ids_dropped += 1
            local = local_id_for(path, set(self.local_ids.values()))
            self.local_ids[path] = local
            self._dirty = True
        return local

    def apply(self, assignment: Assignment) -> None:
        """Take the cloud's assignment into the cache and save it. MalformedMessageError (the cache is
        left as it was) for another fleet's, or one that gives a cached path another id or a cached id
        to another path."""
        where = f"catalog assignment for fleet {assignment.fleet!r}"
        if assignment.fleet != self.fleet:
            raise MalformedMessageError(f"{where}: this device is in fleet {self.fleet!r}")
        new = {s.path: s.id for s in assignment.signals}
        check_consistent({p: s.id for p, s in self.fleet_ids.items()}, new, where)
        changed = False
        for s in assignment.signals:
            if self.fleet_ids.get(s.path) != s:
                self.fleet_ids[s.path] = s
                changed = True
        for path, reason in assignment.refused:
            log.warning("signal %s keeps its local id: %s", path, reason)
        self._dirty |= changed
        self.save()

    def segment_ids(self, catalog: Catalog) -> dict[int, int]:
        """Each id of ``catalog`` that new segments should carry differently: a local id whose path has
        since got its fleet id (with the same datatype)."""
        out = {}
        for spec in catalog:
            known = self.fleet_ids.get(spec.path)
            if known is not None and known.id != spec.id and known.data_type == spec.data_type:
                out[spec.id] = known.id
        return out
