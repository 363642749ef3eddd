"""Rewrite the ids of segments an older agent left in the store (docs/decisions/0032-fleet-catalog-ids.md).

An agent before fleet catalog ids numbered its signals in registration order (``Catalog()`` without
``assign``: 1 … N, in the order the sources declare them). Those ids look like fleet ids, so segments
still queued when such an agent is upgraded in place would decode as other signals in the cloud. The
first start of this version therefore rewrites them, before the uplink starts, from the legacy numbering
of the same configuration to the ids this agent uses.

Crash safety needs no journal: a rewritten segment carries only the new catalog's ids, which on a first
start are all device-local (``2^31`` and up, never a legacy id), so a segment tells by itself whether it
is done; each is replaced atomically through the store (the old file or the new, never half); a marker
beside the store, written only when every segment is done, ends the rewrite for good. A kill at any point
and a restart redo the rest. The marker lives with the store (not with the id cache) because it
describes the store's segments: losing the cache must not make new segments look legacy.

A segment the legacy catalog cannot explain (an id beyond it, or another datatype: the configuration
changed across the upgrade) is never sent under guessed ids: it is set aside in the store's ``held``
directory, counted and logged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from fleetloop_agent.local_store import LocalStore
from fleetloop_agent.sources.base import SignalSource
from fleetloop_shared.catalog import Catalog, SignalSpec
from fleetloop_shared.catalog_ids import is_fleet_id, remap_segment
from fleetloop_shared.durable import write_atomically
from fleetloop_shared.errors import CorruptSegmentError, NotFoundError
from fleetloop_shared.segment import Segment, decode_segment

log = logging.getLogger("fleetloop.agent")

#: Beside the store's index: present once the store's segments carry this version's ids.
MARKER_FILE = "catalog_ids.upgraded"


@dataclass(frozen=True)
class UpgradeTotals:
    """What one start did to the store: segments rewritten, already rewritten (an earlier, killed start),
    and set aside as unknowable."""

    rewritten: int = 0
    already: int = 0
    held: int = 0


def legacy_catalog(sources: Iterable[SignalSource]) -> Catalog:
    """The catalog an older agent built from this configuration: registration order, 1 … N.

    Declare into it before the agent's own catalog: a source keeps the ids of its last ``declare``."""
    catalog = Catalog()
    for src in sources:
        src.declare(catalog)
    return catalog


def legacy_ids(legacy: Catalog, current: Catalog) -> dict[int, int]:
    """Legacy id → the id ``current`` gives the same path (both built from the same configuration)."""
    return {spec.id: current.by_path(spec.path).id for spec in legacy}


def classify(segment: Segment, legacy: Mapping[int, SignalSpec]) -> str:
    """``"done"`` (no legacy id left), ``"legacy"`` (every id and datatype is the legacy catalog's), or
    ``"unknown"`` (an id beyond it, another datatype, or legacy ids beside new ones); ``legacy`` by id."""
    ids = [(k, t) for g in segment.groups() for k, t in g.data_types.items()]
    old = [(k, t) for k, t in ids if is_fleet_id(k)]
    if not old:
        return "done"
    if len(old) != len(ids):
        return "unknown"
    for signal_id, data_type in old:
        spec = legacy.get(signal_id)
        if spec is None or spec.data_type != data_type:
            return "unknown"
    return "legacy"


def needs_upgrade(store_root: Path) -> bool:
    """Whether the store at ``store_root`` may hold an older agent's segments (no marker yet)."""
    return not (store_root / MARKER_FILE).exists()


def upgrade_store(store: LocalStore, legacy: Catalog | None, current: Catalog) -> UpgradeTotals | None:
    """Rewrite the store's legacy segments to ``current``'s ids, once; None when there was nothing to do.

    ``legacy`` None: not a first start of this version (the id cache exists, so ``current`` may hold fleet
    ids a rewritten segment could not be told from): the store is this version's, only marked so.
    ``current`` must then hold device-local ids only (a first start has no fleet ids yet)."""
    marker = store.root / MARKER_FILE
    if not needs_upgrade(store.root):
        return None
    if legacy is None:
        write_atomically(marker, b"{}")
        return None
    mapping = legacy_ids(legacy, current)
    by_id = {spec.id: spec for spec in legacy}
    rewritten = already = held = 0
    for segment_id in store.pending_ids():
        try:
            segment = decode_segment(store.read(segment_id))
        except NotFoundError:
            continue  # gone meanwhile (nothing else runs yet; kept for safety)
        except CorruptSegmentError as exc:
            log.error("store upgrade: segment %s does not decode, set aside: %s", segment_id.hex(), exc)
            store.hold(segment_id)
            held += 1
            continue
        kind = classify(segment, by_id)
        if kind == "done":
            already += 1
        elif kind == "legacy":
            store.replace(remap_segment(segment, mapping))
            rewritten += 1
        else:
            store.hold(segment_id)
            held += 1
    totals = UpgradeTotals(rewritten, already, held)
    if rewritten or already or held:
        log.info("store upgrade to fleet catalog ids: %d segments rewritten, %d already rewritten",
                 rewritten, already)  # fmt: skip
    if held:
        log.warning(
            "store upgrade: %d segments name signals the configuration no longer declares as the old "
            "agent did (it changed across the upgrade); kept unsent in %s",
            held, store.held_dir,
        )  # fmt: skip
    write_atomically(marker, json.dumps({"rewritten": rewritten, "already": already, "held": held}).encode())
    return totals
