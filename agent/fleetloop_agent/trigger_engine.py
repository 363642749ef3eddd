"""Trigger engine: decides, batch by batch, when a campaign fires. Pure: no I/O, no clock.

Semantics (``docs/rules.md``): every signal holds its last value between samples; a campaign is
evaluated at every distinct timestamp at which a signal its condition reads has a sample, in time
order, all samples sharing a timestamp applied first. ``rising`` fires where the condition is true and
was not true at the previous evaluation (the state before the first evaluation counts as true, so a
condition already true when the campaign starts fires only after it has been false; a missing result
counts as not true); ``always`` fires at every true evaluation; ``min_interval`` drops a fire closer
than that to the previous kept fire of the same campaign.

Evaluation is vectorized: for each campaign, all its evaluation times in the given batches are computed
at once by :class:`fleetloop_shared.rules.Evaluator` (numpy), which keeps the per-campaign state
(held values, ``rising``/``held``/``count``/``changed`` memory) between calls. Timestamps not later
than a campaign's last evaluation (a source that went back in time, or a timestamp split across two
``process`` calls) are not evaluated again for it (policy ``skip-late``, counted in
``late_evaluations_total``).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.errors import FleetloopError
from fleetloop_shared.rules import CampaignSpec, Evaluator, ModelScorer, WindowSource, check_against_catalog
from fleetloop_shared.rules.expression import compile_expression
from fleetloop_shared.rules.vector import BatchGrid, window_spans
from fleetloop_shared.samples import GroupBatch

#: Most campaigns one device runs; beyond it the lowest priorities are refused (policy
#: ``refuse-lowest-priority``), so an operator's mistake cannot eat the device's CPU.
MAX_CAMPAIGNS = 1000
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
    #: The campaign's ``upload.max_per_hour`` (the capture assembler enforces it), None = unlimited.
    max_per_hour: int | None = None
    #: The campaign's per-signal minimum sample periods ``(glob, ns)`` for the capture.
    min_periods: tuple[tuple[str, int], ...] = ()


@dataclass
class _Running:
    """A campaign with its evaluation state."""

    spec: CampaignSpec
    evaluator: Evaluator
    reads: frozenset[int]
    paths: frozenset[str]
    was_true: bool = True
    last_fire_ns: int | None = None
    last_eval_ns: int | None = None
    order: int = 0

    def __post_init__(self) -> None:
        # Read once per campaign per tick: kept at hand rather than behind three attribute lookups.
        self.root = self.evaluator.expression.root
        self.pure = self.root.pure


class _Latest(Mapping[str, tuple[int, object]]):
    """path → ``(t_ns, value)`` of the newest sample seen: the held values every campaign starts from.

    Updated once per batch per signal (the agent sees hundreds of signals per tick), it keeps the
    newest *column* of each signal id and takes its last element only when a campaign reads the
    path (a few per tick), instead of converting every signal's last value on every tick.
    """

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog
        #: signal id → (t_ns of the column's last sample, column)
        self.columns: dict[int, tuple[int, npt.NDArray[Any]]] = {}
        self._ids: dict[str, int | None] = {}

    def _id(self, path: str) -> int | None:
        try:
            return self._ids[path]
        except KeyError:
            spec = self._catalog.get(path)
            found = self._ids[path] = None if spec is None else spec.id
            return found

    def get(self, path: str, default: Any = None) -> Any:
        sid = self._id(path)
        held = None if sid is None else self.columns.get(sid)
        if held is None:
            return default
        last = held[1][-1]
        if isinstance(last, str) and type(last) is not str:
            last = str(last)  # numpy.str_ from a text array: held values are plain str
        return held[0], last

    def __getitem__(self, path: str) -> tuple[int, object]:
        found: tuple[int, object] | None = self.get(path)
        if found is None:
            raise KeyError(path)
        return found

    def __iter__(self) -> Iterator[str]:
        return (self._catalog.by_id(sid).path for sid in self.columns)

    def __len__(self) -> int:
        return len(self.columns)


def _distinct_sorted(t: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """The distinct values of the non-decreasing ``t`` (itself when already strictly increasing)."""
    if t.shape[0] < 2:
        return t
    step = t[1:] != t[:-1]
    if int(np.count_nonzero(step)) == step.shape[0]:  # ndarray.all costs 4x more on short arrays
        return t
    return t[np.concatenate(([True], step))]


def expires_ns(spec: CampaignSpec) -> int | None:
    """The campaign's expiry as ns since the Unix epoch (exact), or None when it never expires."""
    if spec.expires is None:
        return None
    delta = spec.expires - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000


class TriggerEngine:
    """Evaluates the active campaigns over incoming batches and reports fires."""

    def __init__(
        self, catalog: Catalog, models: ModelScorer | None = None, *, max_campaigns: int = MAX_CAMPAIGNS
    ) -> None:
        self._catalog = catalog
        self._max_campaigns = max_campaigns
        self._models = models
        self._running: dict[str, _Running] = {}
        #: path → (t_ns, value) of the newest sample seen, so a campaign started mid-stream holds values.
        self._latest = _Latest(catalog)
        #: Evaluation times skipped because they were not later than the campaign's last one.
        self.late_evaluations_total = 0
        #: Evaluations performed (campaign × evaluation time), for the metrics.
        self.evaluations_total = 0
        #: id → (path, holds strings?), memoized: the catalog only grows and ids never change.
        self._paths: dict[int, tuple[str, bool]] = {}
        #: path → the widest history the running campaigns' windows read on it (one fetch per batch).
        self._spans: dict[str, int] = {}

    @property
    def active(self) -> list[str]:
        """Names of the running campaigns, in the order they were given."""
        return list(self._running)

    def set_campaigns(
        self, specs: Sequence[CampaignSpec], now_ns: int, *, refresh_models: Collection[str] = ()
    ) -> dict[str, str]:
        """Make ``specs`` the running set; returns the refused ones as ``{name: reason}``.

        A campaign whose (name, version) is already running keeps its evaluation state (edge memory,
        last fire, window state); a new or changed one starts fresh, and so does one that calls a model
        named in ``refresh_models`` (a model pack replaced under it: its inputs, window and scores may
        differ, so its edge memory no longer describes the same condition). Refused: expired at
        ``now_ns`` (wall clock, ns since the epoch), not compilable against this device's catalog, a
        model it calls that is not installed, or a duplicate name.
        """
        refused: dict[str, str] = {}
        running: dict[str, _Running] = {}
        # Campaigns started together with the same condition (equal compiled trees) see the same
        # evaluation times from now on, so their evaluation states stay equal: they share one evaluator,
        # evaluated once per batch (their modes, min_interval and fires stay their own).
        fresh: dict[bytes, Evaluator] = {}
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
                expression = compile_expression(
                    spec.when, catalog=self._catalog, source=spec.source, require_condition=True
                )
            except FleetloopError as exc:
                refused[spec.name] = str(exc)
                continue
            inputs: set[str] = set()
            model_problem = None
            for name, window_ns in sorted(expression.models):
                if self._models is None:
                    model_problem = f"model {name!r} is not installed on this device"
                    break
                try:
                    inputs.update(self._models.inputs(name, window_ns))
                except FleetloopError as exc:
                    model_problem = str(exc)
                    break
            if model_problem is not None:
                refused[spec.name] = model_problem
                continue
            unknown = sorted(p for p in inputs if p not in self._catalog)
            if unknown:
                refused[spec.name] = f"model input signal {unknown[0]!r} is not in the catalog"
                continue
            text = sorted(p for p in inputs if self._catalog.by_path(p).data_type is DataType.STRING)
            if text:
                refused[spec.name] = f"model input signal {text[0]!r} holds strings; models read numbers"
                continue
            previous = self._running.get(spec.name)
            model_changed = any(name in refresh_models for name, _ in expression.models)
            if previous is not None and previous.spec.version == spec.version and not model_changed:
                running[spec.name] = previous
                continue
            paths = frozenset(expression.signals | inputs)
            reads = frozenset(self._catalog.by_path(path).id for path in paths)
            evaluator = fresh.get(expression.root.key)
            if evaluator is None:
                evaluator = fresh[expression.root.key] = Evaluator(expression, self._models)
            running[spec.name] = _Running(spec, evaluator, reads, paths)
        if len(running) > self._max_campaigns:
            ranked = sorted(enumerate(running.values()), key=lambda item: (-item[1].spec.priority, item[0]))
            for _, run in ranked[self._max_campaigns :]:
                refused[run.spec.name] = (
                    f"more than {self._max_campaigns} campaigns; priority {run.spec.priority} is below "
                    "every running one"
                )
                del running[run.spec.name]
        spans: dict[str, int] = {}
        for order, run in enumerate(running.values()):
            run.order = order
            window_spans(run.root, spans)
        self._running = running
        self._spans = spans
        return refused

    def expire(self, now_ns: int) -> list[str]:
        """Stop the running campaigns whose ``spec.expires`` is at or before ``now_ns`` (wall clock);
        returns their names. Fires already made stay with the capture assembler."""
        gone = []
        for name, run in list(self._running.items()):
            expiry = expires_ns(run.spec)
            if expiry is not None and expiry <= now_ns:
                gone.append(name)
                del self._running[name]
        return gone

    def required_horizon_ns(self) -> int:
        """History the ring buffers must keep for windows and capture pre/post windows."""
        need = 0
        for run in self._running.values():
            need = max(need, run.spec.pre_ns + run.spec.post_ns, run.evaluator.expression.max_window_ns)
        return need + HORIZON_MARGIN_NS

    def process(self, batches: Sequence[GroupBatch], history: WindowSource) -> list[Fire]:
        """Evaluate the campaigns over ``batches`` (already appended to ``history``); fires in time order."""
        runs = list(self._running.values())
        wanted: set[int] = set()
        for run in runs:
            wanted |= run.reads
        parts: dict[int, list[tuple[npt.NDArray[np.int64], npt.NDArray[Any]]]] = {}
        for batch in batches:
            if not len(batch):
                continue
            t = np.asarray(batch.t_ns, dtype=np.int64)
            columns = batch.values
            for sid in wanted.intersection(columns):  # a batch holds many signals, campaigns read few
                parts.setdefault(sid, []).append((t, np.asarray(columns[sid])))
        feeds: dict[str, tuple[npt.NDArray[np.int64], npt.NDArray[Any]]] = {}
        text: set[str] = set()  # paths of string signals (their feeds become object arrays of str)
        for sid, pieces in parts.items():
            path, is_text = self._signal(sid)
            if is_text:
                text.add(path)
            if len(pieces) == 1:
                feeds[path] = pieces[0]
                continue
            t_all = np.concatenate([p[0] for p in pieces])
            v_all = np.concatenate([p[1] for p in pieces])
            order = np.argsort(t_all, kind="stable")
            feeds[path] = (t_all[order], v_all[order])
        fires: list[tuple[int, int, Fire]] = []
        if feeds:
            with np.errstate(all="ignore"):  # overflow, division by zero: missing values, not warnings
                self._evaluate(runs, feeds, history, fires, frozenset(text))
        newest = self._latest.columns
        for batch in batches:
            if not len(batch):
                continue
            last_t = int(batch.t_ns[-1])
            for sid, values in batch.values.items():
                held = newest.get(sid)
                if held is None or last_t >= held[0]:
                    newest[sid] = (last_t, values)
        fires.sort(key=lambda item: (item[0], item[1]))
        return [fire for _, _, fire in fires]

    def _signal(self, sid: int) -> tuple[str, bool]:
        """The catalog path of ``sid`` and whether it holds strings."""
        found = self._paths.get(sid)
        if found is None:
            spec = self._catalog.by_id(sid)
            found = self._paths[sid] = (spec.path, spec.data_type is DataType.STRING)
        return found

    def _evaluate(
        self,
        runs: list[_Running],
        feeds: dict[str, tuple[npt.NDArray[np.int64], npt.NDArray[Any]]],
        history: WindowSource,
        fires: list[tuple[int, int, Fire]],
        text: frozenset[str],
    ) -> None:
        """Evaluate every campaign that reads a signal with new samples; append its fires to ``fires``.

        All campaigns share one :class:`BatchGrid`: the pure parts of their conditions are computed once
        per set of evaluation times, and a campaign whose condition is pure and true nowhere in the
        batch is settled without further array work (the usual case for most campaigns).
        """
        grid = BatchGrid(feeds, history, self._latest, self._models, text, self._spans)
        # present signals → (times, first, last): campaigns reading the same signals share one array
        times_cache: dict[frozenset[str], tuple[npt.NDArray[np.int64], int, int]] = {}
        # a campaign's signals → its present signals' entry (None: none has new samples), so the
        # campaigns reading the same signals (the usual case) look the batch up once
        by_paths: dict[frozenset[str], tuple[npt.NDArray[np.int64], int, int] | None] = {}
        alive: list[npt.NDArray[np.int64]] = []  # times arrays whose ids key the grid's contexts
        keys = feeds.keys()
        evaluations = 0
        # id(evaluator) → (first time, count, true): a shared evaluator runs once per batch
        results: dict[int, tuple[int, int, npt.NDArray[np.bool_]]] = {}
        for run in runs:
            try:
                cached = by_paths[run.paths]
            except KeyError:
                cached = by_paths[run.paths] = self._times(run.paths, keys, feeds, times_cache)
            if cached is None:  # none of its signals has new samples (or it reads none: `true`)
                continue
            times, first, last = cached
            last_eval = run.last_eval_ns
            if last_eval is not None and first <= last_eval:
                if last <= last_eval:
                    self.late_evaluations_total += int(times.shape[0])
                    continue
                keep = times > last_eval
                self.late_evaluations_total += int(times.shape[0] - np.count_nonzero(keep))
                times = times[keep]
                alive.append(times)
            root = run.root
            if run.pure:
                true = grid.truth(root, times)  # None: false or missing at every time, nothing fires
            else:
                done = results.get(id(run.evaluator))
                if done is not None and done[0] == int(times[0]) and done[1] == times.shape[0]:
                    true = done[2]
                else:
                    data, valid = run.evaluator.evaluate(times, feeds, history, grid=grid)
                    true = data & valid
                    results[id(run.evaluator)] = (int(times[0]), int(times.shape[0]), true)
            evaluations += times.shape[0]
            run.last_eval_ns = last
            if true is None:
                run.was_true = False
                continue
            for fire in self._fires(run, times, true):
                fires.append((fire.t_ns, run.order, fire))
        self.evaluations_total += int(evaluations)

    @staticmethod
    def _times(
        paths: frozenset[str],
        keys: Collection[str],
        feeds: Mapping[str, tuple[npt.NDArray[np.int64], npt.NDArray[Any]]],
        cache: dict[frozenset[str], tuple[npt.NDArray[np.int64], int, int]],
    ) -> tuple[npt.NDArray[np.int64], int, int] | None:
        """``(times, first, last)``: the distinct sample times of ``paths`` in this batch, or None."""
        present = paths if all(p in keys for p in paths) else frozenset(p for p in paths if p in keys)
        if not present:
            return None
        cached = cache.get(present)
        if cached is None:
            if len(present) == 1:
                (path,) = present
                times = _distinct_sorted(feeds[path][0])
            else:
                merged = np.concatenate([feeds[p][0] for p in present])
                merged.sort()  # np.unique, without its dispatch overhead (a tick holds few samples)
                times = _distinct_sorted(merged)
            cached = cache[present] = (times, int(times[0]), int(times[-1]))
        return cached

    def _fires(self, run: _Running, times: npt.NDArray[np.int64], true: npt.NDArray[np.bool_]) -> list[Fire]:
        spec = run.spec
        if not np.count_nonzero(true):  # the usual case: nothing to fire, and the edge memory is "not true"
            run.was_true = False
            return []
        if spec.mode == "always":
            candidates = times[true]
        else:
            before = np.empty(true.shape[0], np.bool_)
            before[0] = run.was_true
            before[1:] = true[:-1]
            candidates = times[true & ~before]
            run.was_true = bool(true[-1])
        if not candidates.shape[0]:
            return []
        kept: list[int] = []
        last = run.last_fire_ns
        gap = spec.min_interval_ns
        if gap == 0:
            kept = candidates.tolist()
            last = kept[-1]
        else:
            for t in candidates.tolist():
                if last is None or t - last >= gap:
                    kept.append(t)
                    last = t
        run.last_fire_ns = last
        return [
            Fire(
                spec.name,
                t,
                t - spec.pre_ns,
                t + spec.post_ns,
                spec.priority,
                spec.max_per_hour,
                spec.collect_min_periods,
            )
            for t in kept
        ]
