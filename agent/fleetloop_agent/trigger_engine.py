"""Trigger engine: decides, sample by sample, when a campaign fires. Pure: no I/O, no clock.

Semantics (DESIGN.md "Rules"): every signal holds its last value between samples; a campaign is
evaluated at every distinct timestamp at which a signal its condition reads has a sample, in time order;
``rising`` fires on a false→true change (the state before the first evaluation counts as true, so a
condition already true when the campaign starts fires only after it was false once; a missing result
leaves that state unchanged), ``always`` fires at every true evaluation; ``min_interval`` drops fires
closer than that to the previous fire of the same campaign.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt

from fleetloop_shared.catalog import Catalog
from fleetloop_shared.errors import FleetloopError
from fleetloop_shared.rules import CampaignSpec, Evaluator, WindowSource, check_against_catalog
from fleetloop_shared.samples import GroupBatch

#: Extra history kept beyond what campaigns ask for, so a capture polled a little after its post-window
#: still finds its pre-window in the ring buffers.
HORIZON_MARGIN_NS = 2_000_000_000

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Fire:
    """A campaign's condition fired at ``t_ns``; capture ``[from_ns, to_ns]`` (both ends included)."""

    campaign: str
    t_ns: int
    from_ns: int
    to_ns: int
    priority: int


@dataclass
class _Running:
    """A campaign with its evaluation state."""

    spec: CampaignSpec
    evaluator: Evaluator
    reads: frozenset[int]
    was_true: bool = True
    last_fire_ns: int | None = None
    last_eval_ns: int | None = None


def expires_ns(spec: CampaignSpec) -> int | None:
    """The campaign's expiry as ns since the Unix epoch (exact), or None when it never expires."""
    if spec.expires is None:
        return None
    delta = spec.expires - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000


class TriggerEngine:
    """Evaluates the active campaigns over incoming batches and reports fires."""

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog
        self._running: dict[str, _Running] = {}
        self._held: dict[str, object] = {}  # path → last value (sample-and-hold), shared by campaigns

    @property
    def active(self) -> list[str]:
        """Names of the running campaigns, in the order they were given."""
        return list(self._running)

    def set_campaigns(self, specs: Sequence[CampaignSpec], now_ns: int) -> dict[str, str]:
        """Make ``specs`` the running set; returns the refused ones as ``{name: reason}``.

        A campaign whose (name, version) is already running keeps its evaluation state (edge memory,
        last fire); a new or changed one starts fresh. Refused: expired at ``now_ns`` (wall clock, ns
        since the epoch), not compilable against this device's catalog, or a duplicate name.
        """
        refused: dict[str, str] = {}
        running: dict[str, _Running] = {}
        for spec in specs:
            if spec.name in running or spec.name in refused:
                refused.setdefault(spec.name, f"campaign {spec.name!r} is given more than once")
                running.pop(spec.name, None)
                continue
            expiry = expires_ns(spec)
            if expiry is not None and expiry <= now_ns:
                refused[spec.name] = f"expired at {spec.expires.isoformat() if spec.expires else ''}"
                continue
            try:
                check_against_catalog(spec, self._catalog)
            except FleetloopError as exc:
                refused[spec.name] = str(exc)
                continue
            previous = self._running.get(spec.name)
            if previous is not None and previous.spec.version == spec.version:
                running[spec.name] = previous
                continue
            reads = frozenset(self._catalog.by_path(path).id for path in spec.expression.signals)
            running[spec.name] = _Running(spec, spec.expression.evaluator(), reads)
        self._running = running
        return refused

    def required_horizon_ns(self) -> int:
        """History the ring buffers must keep for windows and capture pre/post windows."""
        need = 0
        for run in self._running.values():
            need = max(need, run.spec.pre_ns + run.spec.post_ns, run.spec.expression.max_window_ns)
        return need + HORIZON_MARGIN_NS

    def process(self, batches: Sequence[GroupBatch], history: WindowSource) -> list[Fire]:
        """Evaluate the campaigns over ``batches`` (already appended to ``history``); fires in time order.

        Timestamps earlier than a campaign's last evaluation (a source that went back in time) are not
        evaluated again for it.
        """
        if not self._running:
            return []
        wanted: set[int] = set()
        for run in self._running.values():
            wanted |= run.reads
        # Per batch: the columns that some campaign reads, as Python lists (one conversion per batch).
        columns: list[list[tuple[int, str, list[object]]]] = []
        stamps: list[npt.NDArray[np.int64]] = []
        for batch in batches:
            cols: list[tuple[int, str, list[object]]] = []
            for sid, values in batch.values.items():
                if sid in wanted:
                    path = self._catalog.by_id(sid).path
                    cols.append((sid, path, np.asarray(values).tolist()))
            if cols and len(batch):
                columns.append(cols)
                stamps.append(np.asarray(batch.t_ns, dtype=np.int64))
        if not columns:
            return []
        all_t = np.concatenate(stamps)
        origin = np.repeat(np.arange(len(stamps)), [s.shape[0] for s in stamps])
        row = np.concatenate([np.arange(s.shape[0]) for s in stamps])
        order = np.argsort(all_t, kind="stable")
        all_t, origin, row = all_t[order].tolist(), origin[order].tolist(), row[order].tolist()

        fires: list[Fire] = []
        held = self._held
        runs = list(self._running.values())
        i, n = 0, len(all_t)
        while i < n:
            t = all_t[i]
            touched: set[int] = set()
            while i < n and all_t[i] == t:
                for sid, path, values in columns[origin[i]]:
                    held[path] = values[row[i]]
                    touched.add(sid)
                i += 1
            for run in runs:
                if run.reads.isdisjoint(touched):
                    continue
                fire = self._evaluate(run, t, history)
                if fire is not None:
                    fires.append(fire)
        return fires

    def _evaluate(self, run: _Running, t: int, history: WindowSource) -> Fire | None:
        if run.last_eval_ns is not None and t < run.last_eval_ns:
            return None
        run.last_eval_ns = t
        result = run.evaluator.evaluate(t, self._held, history)
        if result is False:
            run.was_true = False
            return None
        if result is not True:
            return None  # missing: no fire, edge memory unchanged
        spec = run.spec
        edge = spec.mode == "always" or not run.was_true
        run.was_true = True
        if not edge:
            return None
        if run.last_fire_ns is not None and t - run.last_fire_ns < spec.min_interval_ns:
            return None
        run.last_fire_ns = t
        return Fire(spec.name, t, t - spec.pre_ns, t + spec.post_ns, spec.priority)
