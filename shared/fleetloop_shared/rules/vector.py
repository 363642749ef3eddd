"""Vectorized evaluation of a compiled expression over many evaluation times at once.

The agent's trigger engine hands an :class:`Evaluator` a sorted array of evaluation times and the new
samples of the signals the expression reads; every node of the expression is computed for all those
times with a few numpy operations, as a pair ``(data, valid)`` (``valid`` false = missing). Per-node
state that must survive between calls (``rising``, ``held``, ``count``, ``changed``, the held value of
each signal) lives in the evaluator, so splitting the same samples into different batches gives the
same values: the contract in ``docs/rules.md`` is what this module and the slow reference interpreter
in the tests both implement.

Strings are ``object`` arrays of Python ``str`` (a missing entry holds ``""``, never a number, so
comparisons of the whole array never mix types); a string sample is never missing by itself (only
before a signal's first sample), and strings compare exactly, ordered by code point.

Exactness: integers stay ``int64`` end to end (overflow of 64 bits is missing, detected without ever
converting to float); an integer compared with a float is compared by exact value; integer averages sum
exactly and divide with one rounding, like Python's ``int / int``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from fleetloop_shared.rules.expression import Expression, Kind, Op
from fleetloop_shared.rules.operators import (
    DTYPES,
    FLIPPED,
    INT64_MIN,
    NOT_CONSTANT,
    NUMBER_KINDS,
    Array,
    Vec,
    Window,
    all_true,
    any_true,
    arith_values,
    average,
    blank,
    compare_constant,
    compare_values,
    empty_of,
    logic_values,
    math_values,
    number_constant,
    scalar_vec,
    scrub,
    true_flags,
)

Feed = tuple[npt.NDArray[np.int64], Array]

_NS_PER_S = 1e9
_EMPTY_T = np.empty(0, np.int64)


class WindowSource(Protocol):
    """Where window functions read history: the samples of one signal path in a time range."""

    def samples(
        self, path: str, from_ns_exclusive: int, to_ns_inclusive: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[Any]]:
        """``(t_ns, values)`` of ``path`` with ``from_ns_exclusive < t <= to_ns_inclusive``, in time order."""
        ...


class ModelScorer(Protocol):
    """Computes ``model("name", w)`` at each evaluation time (see the agent's model packs)."""

    def inputs(self, name: str, window_ns: int) -> Sequence[str]:
        """The signal paths model ``name`` reads; a FleetloopError says why it cannot run with that window."""
        ...

    def score(self, name: str, t_ns: npt.NDArray[np.int64], window_ns: int, history: WindowSource) -> Vec:
        """``(float64 scores, valid)`` for every time in ``t_ns``."""
        ...


class Evaluator:
    """The evaluation state of one expression for one campaign.

    Call :meth:`evaluate` with strictly increasing evaluation times across calls; the held values and
    the state of stateful functions carry over from one call to the next.
    """

    def __init__(self, expression: Expression, models: ModelScorer | None = None) -> None:
        if _has_any(expression.root):
            raise ValueError("an expression compiled without a catalog cannot be evaluated")
        self.expression = expression
        self._models = models
        #: Signals holding strings: their feeds are turned into ``object`` arrays of ``str`` on entry
        #: (a numpy ``<U`` array would hand out ``numpy.str_`` scalars and pad nothing, but compare the
        #: same; one representation keeps held values, caches and outputs plain ``str``).
        self._string_paths = frozenset(_string_signals(expression.root, set()))
        self._hold: dict[str, tuple[int, object]] = {}
        self._state: dict[int, Any] = {}
        self._evaluated = False

    def evaluate(
        self,
        t_ns: npt.NDArray[np.int64],
        feeds: Mapping[str, Feed],
        history: WindowSource,
        seed: Mapping[str, tuple[int, object]] | None = None,
        grid: BatchGrid | None = None,
    ) -> Vec:
        """The expression's value at every time of ``t_ns`` (sorted, distinct, later than any earlier call).

        ``feeds`` hold the new samples (time order) of the signals read; ``seed`` the latest sample of a
        signal from before this evaluator existed (so a campaign started mid-stream sees held values).
        ``grid`` (the engine's) holds the batch's pure nodes, computed once for every campaign evaluated
        at the same times: they are taken from its shared context of ``t_ns`` (the caller keeps that
        array alive), and held values are the grid's (the device's latest samples), so ``seed`` and
        this evaluator's own held values are not used. Only the state functions and models run here.
        """
        if grid is not None:
            if not t_ns.shape[0]:
                return empty_of(self.expression.kind)
            context = _Context(self, t_ns, grid.feeds, history, grid.context(t_ns))
            result = context.eval(self.expression.root)  # the grid's user holds np.errstate
            self._evaluated = True
            return result
        if seed:
            for path, sample in seed.items():
                if path in self.expression.signals and path not in self._hold:
                    self._hold[path] = sample
        if self._string_paths:
            feeds = _as_text_feeds(feeds, self._string_paths)
        context = _Context(self, np.asarray(t_ns, np.int64), feeds, history)
        with np.errstate(all="ignore"):
            result = context.eval(self.expression.root) if t_ns.shape[0] else empty_of(self.expression.kind)
        for path in self.expression.signals:
            feed = feeds.get(path)
            if feed is None or feed[0].shape[0] == 0:
                continue
            last_t = int(feed[0][-1])
            held = self._hold.get(path)
            if held is None or last_t >= held[0]:
                self._hold[path] = (last_t, feed[1][-1])
        if t_ns.shape[0]:
            self._evaluated = True
        return result


class _Holder:
    """What a grid's context reads from its owner: the held values and the models (no state)."""

    def __init__(self, hold: Mapping[str, tuple[int, object]], models: ModelScorer | None) -> None:
        self._hold = hold
        self._models = models
        self._state: dict[int, Any] = {}


class BatchGrid:
    """The pure nodes of every running expression in one engine call, each computed once per set of
    evaluation times.

    A pure node's value at a time t depends on t alone: held values are the device's latest samples
    (the same for every campaign: a campaign started mid-stream is seeded with them), windows read the
    same history, and the operators are pointwise. So campaigns evaluated at the same times (those that
    read the same signals with new samples) share every pure subtree (by ``Op.key``): a window, a
    comparison, a whole condition is computed once for all of them. Only the state functions and models
    run per campaign, and a campaign whose whole condition is pure and true nowhere in the batch is
    settled without array work (:meth:`truth`). Use it (and evaluators given it) inside
    ``np.errstate(all="ignore")``: overflow and division by zero are missing values, not warnings.
    """

    def __init__(
        self,
        feeds: Mapping[str, Feed],
        history: WindowSource,
        hold: Mapping[str, tuple[int, object]],
        models: ModelScorer | None = None,
        string_paths: frozenset[str] = frozenset(),
        spans: Mapping[str, int] | None = None,
    ) -> None:
        """``spans`` (see :func:`window_spans`): the widest history each signal's windows read, so
        each signal's history is fetched once per batch however many window widths read it."""
        self._spans = spans or {}
        self.feeds = _as_text_feeds(feeds, string_paths) if string_paths else feeds
        self._history = history
        self._holder = _Holder(hold, models)
        #: id(times) → (times, its shared context); the caller keeps every times array alive.
        self._contexts: dict[int, tuple[npt.NDArray[np.int64], _SharedContext]] = {}
        self._feed_cache: dict[str, Any] = {}
        #: path → its history over the whole batch (see ``_Context._samples``), and the batch's range.
        self._fetched: dict[str, tuple[int, npt.NDArray[np.int64], Array]] = {}
        self._range: tuple[int, int] | None = None

    def context(self, times: npt.NDArray[np.int64]) -> _SharedContext:
        """The shared context of the evaluation times ``times`` (sorted, distinct)."""
        found = self._contexts.get(id(times))
        if found is not None and found[0] is times:
            return found[1]
        if self._range is None:
            ends = [(int(t[0]), int(t[-1])) for t, _ in self.feeds.values() if t.shape[0]]
            self._range = (min(e[0] for e in ends), max(e[1] for e in ends)) if ends else (0, 0)
        context = _SharedContext(
            self, times, (min(self._range[0], int(times[0])), max(self._range[1], int(times[-1])))
        )
        self._contexts[id(times)] = (times, context)
        return context

    def truth(self, op: Op, times: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_] | None:
        """Where the pure condition ``op`` is true at ``times``; None when it is true at none of them."""
        return self.context(times).truth(op)


def window_spans(op: Op, out: dict[str, int]) -> dict[str, int]:
    """Add to ``out`` (path → span) the history each window function below ``op`` reads before an
    evaluation time: its window, twice for ``prev_*``; the widest per path is kept."""
    if op.fn in _WINDOW_FNS:
        span = 2 * op.window_ns if op.fn.startswith("prev_") else op.window_ns
        if span > out.get(op.path, -1):
            out[op.path] = span
    for arg in op.args:
        window_spans(arg, out)
    return out


_WINDOW_FNS = frozenset(("avg", "min_over", "max_over", "delta", "rate", "prev_avg", "prev_min", "prev_max"))


def _string_signals(op: Op, out: set[str]) -> set[str]:
    """Paths of the string signals ``op`` reads as values (``age`` only reads their timestamps)."""
    if op.fn == "signal" and op.kind is Kind.STRING:
        out.add(op.path)
    for arg in op.args:
        _string_signals(arg, out)
    return out


def _as_text_feeds(feeds: Mapping[str, Feed], paths: frozenset[str]) -> Mapping[str, Feed]:
    """``feeds`` with the values of ``paths`` as ``object`` arrays of ``str`` (a copy only if needed)."""
    if all(feeds[p][1].dtype == object for p in paths if p in feeds):
        return feeds
    out = dict(feeds)
    for path in paths:
        feed = out.get(path)
        if feed is not None and feed[1].dtype != object:
            out[path] = (feed[0], np.asarray(feed[1].tolist(), dtype=object))
    return out


def _has_any(op: Op) -> bool:
    return op.kind is Kind.ANY or any(_has_any(a) for a in op.args)


class _Context:
    """One :meth:`Evaluator.evaluate` call: the evaluation times and the memo of signal lookups."""

    def __init__(
        self,
        owner: Evaluator,
        t: npt.NDArray[np.int64],
        feeds: Mapping[str, Feed],
        history: WindowSource,
        shared: _SharedContext | None = None,
        feed_cache: dict[str, Any] | None = None,
    ) -> None:
        self.owner = owner
        self.t = t
        self.n = int(t.shape[0])
        self.feeds = feeds
        self.history = history
        self._signals: dict[str, tuple[Array, npt.NDArray[np.bool_], npt.NDArray[np.int64]]] = {}
        self._ones: npt.NDArray[np.bool_] | None = None
        self._fetched: dict[str, tuple[int, npt.NDArray[np.int64], Array]] = {}
        self._window_bounds: dict[tuple[str, int, bool, int], Window] = {}
        #: id(history values) → (them, them padded by one element): see :meth:`Window.segments`.
        self._pads: dict[int, tuple[Array, Array]] = {}
        #: Where pure nodes come from when a :class:`BatchGrid` is in use (same times, shared memo).
        self.shared = shared
        #: What is derived from the feeds once per batch (a grid shares it between its contexts): path →
        #: whether its values are all finite; "held+" path → the held sample and the new ones.
        self.feed_cache: dict[str, Any] = {} if feed_cache is None else feed_cache
        #: ``(first, last)`` time the history fetches cover when wider than ``t`` (a grid's batch).
        self.fetch_range: tuple[int, int] | None = None
        #: path → the widest window span read on it (fetched at once; see :func:`window_spans`).
        self.spans: Mapping[str, int] = {}

    # --- signals -------------------------------------------------------------------------------------

    def signal(self, path: str, kind: Kind) -> tuple[Array, npt.NDArray[np.bool_], npt.NDArray[np.int64]]:
        """Held value, validity and the time of the held sample, at every evaluation time."""
        cached = self._signals.get(path)
        if cached is None:
            cached = self._fetch(path, kind, self.owner._hold.get(path))
            self._signals[path] = cached
        return cached

    def _finite_feed(self, path: str, values: Array) -> bool:
        """Whether every new sample of the float signal ``path`` is finite (then so is every value
        picked from them): checked once per batch, not once per set of evaluation times."""
        found = self.feed_cache.get(path)
        if found is None:
            found = self.feed_cache[path] = all_true(np.isfinite(values))
        return bool(found)

    def _extended(
        self, path: str, kind: Kind, feed_t: npt.NDArray[np.int64], feed_v: Array, held: tuple[int, object]
    ) -> tuple[npt.NDArray[np.int64], Array] | None:
        """The held sample followed by the new samples of ``path`` (built once per batch), or None
        when that is not a plain array of valid values (a float that is not finite)."""
        key = "held+" + path
        found: tuple[npt.NDArray[np.int64], Array] | bool | None = self.feed_cache.get(key, False)
        if found is False:
            found = None
            values = np.asarray(feed_v)
            if values.dtype == DTYPES[kind]:
                first = np.empty(1, values.dtype)
                first[0] = held[1]
                if kind is not Kind.FLOAT or (
                    self._finite_feed(path, feed_v) and bool(np.isfinite(first[0]))
                ):
                    found = (
                        np.concatenate([np.array([held[0]], np.int64), feed_t]),
                        np.concatenate([first, values]),
                    )
            self.feed_cache[key] = found
        return found  # type: ignore[return-value]

    def _fetch(
        self, path: str, kind: Kind, held: tuple[int, object] | None
    ) -> tuple[Array, npt.NDArray[np.bool_], npt.NDArray[np.int64]]:
        n, t = self.n, self.t
        feed = self.feeds.get(path)
        feed_t, feed_v = (_EMPTY_T, blank(0, kind)) if feed is None else feed
        if feed_t.shape[0] and feed_t[0] <= t[0] and (held is None or held[0] <= feed_t[0]):
            # Fast path (the usual case): the new samples cover every evaluation time by themselves.
            if feed_t is t or (feed_t.shape[0] == n and np.array_equal(feed_t, t)):
                data, stamp = np.asarray(feed_v), feed_t
            else:
                idx = feed_t.searchsorted(t, side="right") - 1
                data, stamp = np.asarray(feed_v)[idx], feed_t[idx]
            if kind is Kind.FLOAT and not self._finite_feed(path, feed_v):
                finite = np.isfinite(data)
                return (*scrub(data.copy(), finite), stamp)
            return data, self.ones(), stamp
        if feed_t.shape[0] and held is not None and held[0] <= feed_t[0] and held[0] <= t[0]:
            # The usual case at times that start before this signal's first new sample (another
            # signal's): the held sample, then the new ones, cover every time.
            extended = self._extended(path, kind, feed_t, feed_v, held)
            if extended is not None:
                ext_t, ext_v = extended
                idx = ext_t.searchsorted(t, side="right") - 1
                return ext_v[idx], self.ones(), ext_t[idx]
        idx = feed_t.searchsorted(t, side="right") - 1
        have = idx >= 0
        data = blank(n, kind)
        stamp = np.full(n, INT64_MIN, np.int64)
        if feed_t.shape[0]:
            picked = np.maximum(idx, 0)
            data[have] = np.asarray(feed_v)[picked[have]]
            stamp[have] = feed_t[picked[have]]
        if held is not None:
            # a held sample newer than a late feed sample still wins (both are "at or before t")
            use_held = ~have | (stamp < held[0])
            data[use_held] = held[1]
            stamp[use_held] = held[0]
            present = np.ones(n, np.bool_)
        else:
            present = have
        valid = present.copy()
        if kind is Kind.FLOAT:
            valid &= np.isfinite(data)
        return (*scrub(data, valid), np.where(present, stamp, INT64_MIN))

    # --- dispatch ------------------------------------------------------------------------------------

    def ones(self) -> npt.NDArray[np.bool_]:
        """An all-true validity array, shared (no operation writes into its inputs)."""
        if self._ones is None:
            self._ones = true_flags(self.n)
        return self._ones

    def eval(self, op: Op) -> Vec:
        shared = self.shared
        if shared is not None and op.pure:
            return shared.eval(op)
        if op.fn == "signal":
            data, valid, _ = self.signal(op.path, op.kind)
            return data, valid
        result: Vec = _HANDLERS[op.fn](self, op)
        return result

    def const(self, op: Op) -> Vec:
        return np.full(self.n, op.value, DTYPES[op.kind]), self.ones()

    def logic(self, op: Op) -> Vec:
        a, b = op.args
        left = self.eval(a)
        if b.pure:  # a pure right side may be skipped when the left decides (it has no state to advance)
            data, valid = left  # data is False wherever valid is (missing is scrubbed to False)
            if op.fn == "or" and all_true(data):
                return left  # true everywhere: true or anything is true
            if op.fn == "and" and not any_true(data) and all_true(valid):
                return left  # false everywhere: false and anything is false
        return logic_values(op.fn, left, self.eval(b))

    def negation(self, op: Op) -> Vec:
        d, v = self.eval(op.args[0])
        return scrub(~d, v)  # validity arrays are never written into: share it

    def minus(self, op: Op) -> Vec:
        d, v = self.eval(op.args[0])
        if op.kind is Kind.INT:
            return scrub(-d, v & (d != INT64_MIN))
        return -d, v

    def arith(self, op: Op) -> Vec:
        a, b = op.args
        fn = op.fn
        if fn != "**" and not (fn == "/" and a.kind is Kind.INT and b.kind is Kind.INT):
            # One constant operand (``x - 2.5``, ``x * -1``) enters as a one-element array that numpy
            # broadcasts: the same element operations as with a full array of it, none allocated.
            # (``**`` and exact ``int / int`` work element by element on equal lengths.)
            ca, cb = number_constant(a), number_constant(b)
            if cb is not NOT_CONSTANT and ca is NOT_CONSTANT:
                return arith_values(fn, op.kind, self.eval(a), a.kind, scalar_vec(cb, b.kind), b.kind)
            if ca is not NOT_CONSTANT and cb is NOT_CONSTANT:
                return arith_values(fn, op.kind, scalar_vec(ca, a.kind), a.kind, self.eval(b), b.kind)
        return arith_values(fn, op.kind, self.eval(a), a.kind, self.eval(b), b.kind)

    def compare(self, op: Op) -> Vec:
        a, b = op.args
        fn = op.fn
        if a.kind in NUMBER_KINDS and b.kind in NUMBER_KINDS:
            constant = number_constant(b)  # a negative literal is ``neg(const)``: a constant too
            if constant is not NOT_CONSTANT:
                return compare_constant(fn, self.eval(a), a.kind, constant)
            constant = number_constant(a)
            if constant is not NOT_CONSTANT:
                return compare_constant(FLIPPED[fn], self.eval(b), b.kind, constant)
        return compare_values(fn, self.eval(a), a.kind, self.eval(b), b.kind)

    def math(self, op: Op) -> Vec:
        return math_values(op.fn, op.kind, [(self.eval(a), a.kind) for a in op.args])

    def is_null(self, op: Op) -> Vec:
        _, v = self.eval(op.args[0])
        return ~v, self.ones()

    def age(self, op: Op) -> Vec:
        signal_kind = op.value if isinstance(op.value, Kind) else Kind.FLOAT
        _, _, stamp = self.signal(op.path, signal_kind)
        present = stamp != INT64_MIN
        return (self.t - np.where(present, stamp, self.t)) / _NS_PER_S, present

    def model(self, op: Op) -> Vec:
        n = self.n
        if self.owner._models is None:
            return np.zeros(n), np.zeros(n, np.bool_)
        d, v = self.owner._models.score(str(op.value), self.t, op.window_ns, self.history)
        return scrub(np.asarray(d, np.float64).copy(), np.asarray(v, np.bool_) & np.isfinite(d))

    # --- windows ---------------------------------------------------------------------------------------

    def _samples(self, path: str, span: int) -> tuple[int, npt.NDArray[np.int64], Array]:
        """``(fetched span, t, values)`` of ``path`` over ``(t[0] - span, t[-1]]`` without NaN samples,
        true/false as 0/1, integers as int64; fetched once per context for every window on ``path``
        (a wider window refetches). In a :class:`BatchGrid`, ``fetch_range`` is the whole batch's time
        range and the fetch is shared by all its contexts: more samples than one context's windows
        reach change nothing, as window bounds are searched by time in what was fetched."""
        found = self._fetched.get(path)
        if found is not None and found[0] >= span:
            return found
        first, last = self.fetch_range if self.fetch_range is not None else (int(self.t[0]), int(self.t[-1]))
        span = max(span, self.spans.get(path, 0))
        ht_raw, hv_raw = self.history.samples(path, first - span, last)
        ht = np.asarray(ht_raw, np.int64)
        hv = np.asarray(hv_raw)
        if hv.dtype.kind == "f":
            keep = np.isfinite(hv)
            if not all_true(keep):
                ht, hv = ht[keep], hv[keep]
        elif hv.dtype.kind == "b":
            hv = hv.astype(np.int64)
        elif hv.dtype.kind in "iu":
            hv = hv.astype(np.int64, copy=False)
        found = (span, ht, hv)
        self._fetched[path] = found
        return found

    def _bounds(self, path: str, w: int, previous: bool) -> Window:
        """The samples of ``path`` in each evaluation time's window (``hv[lo:hi]``), shared by every
        window function of the same signal and width (``avg``, ``min_over`` and ``max_over`` of one
        window search the history once and build one segment index)."""
        fetched, ht, hv = self._samples(path, 2 * w if previous else w)
        key = (path, w, previous, fetched)
        found = self._window_bounds.get(key)
        if found is None:
            t = self.t
            if previous:
                lo = ht.searchsorted(t - 2 * w, side="right")
                hi = ht.searchsorted(t - w, side="right")
            else:
                lo = ht.searchsorted(t - w, side="right")
                hi = ht.searchsorted(t, side="right")
            found = Window(ht, hv, lo, hi, self._pads)
            self._window_bounds[key] = found
        return found

    def window(self, op: Op) -> Vec:
        n = self.n
        previous = op.fn.startswith("prev_")
        win = self._bounds(op.path, op.window_ns, previous)
        valid = win.valid
        fn = op.fn
        if not win.some:
            return np.zeros(n, DTYPES[op.kind]), valid
        if fn in ("min_over", "prev_min", "max_over", "prev_max"):
            ufunc = np.minimum if fn in ("min_over", "prev_min") else np.maximum
            result = win.segments(ufunc)
            return (result, valid) if win.every else scrub(result, valid)
        hv = win.hv
        integer = hv.dtype.kind == "i"
        if fn in ("avg", "prev_avg"):
            return scrub(*average(win, integer))
        # delta and rate
        first, last = win.ends()
        if integer:
            a, b = hv[last], hv[first]
            diff = a - b
            ok = valid & ~(((a ^ b) & (a ^ diff)) < 0)
        else:
            diff = hv[last] - hv[first]
            finite = np.isfinite(diff)
            ok = valid if win.every and all_true(finite) else valid & finite
        if fn == "delta":
            return scrub(diff, ok)
        ht, count = win.ht, win.count
        dt = ht[last] - ht[first]
        ok = ok & (count >= 2) & (dt != 0)
        rate = diff.astype(np.float64) / (np.where(dt != 0, dt, 1) / _NS_PER_S)
        return scrub(rate, ok & np.isfinite(rate))

    # --- stateful functions ----------------------------------------------------------------------------

    def count(self, op: Op) -> Vec:
        d, _ = self.eval(op.args[0])
        true = d  # scrubbed: true exactly where the condition is true (not missing)
        past: npt.NDArray[np.int64] = self.owner._state.get(op.nid, _EMPTY_T)
        trues = int(np.count_nonzero(true))
        if not trues and not past.shape[0]:  # the usual case: never true in the window
            return np.zeros(self.n, np.int64), self.ones()
        times = np.concatenate([past, self.t[true]]) if trues else past
        w = op.window_ns
        result = times.searchsorted(self.t, side="right") - times.searchsorted(self.t - w, side="right")
        self.owner._state[op.nid] = times[times > self.t[-1] - w]
        return result.astype(np.int64, copy=False), self.ones()

    def held(self, op: Op) -> Vec:
        d, _ = self.eval(op.args[0])
        true = d  # scrubbed: true exactly where the condition is true (not missing)
        carry: int | None = self.owner._state.get(op.nid)
        trues = int(np.count_nonzero(true))
        if trues == 0:  # no run: nothing is held, and no run continues into the next call
            self.owner._state[op.nid] = None
            return np.zeros(self.n, np.bool_), self.ones()
        if trues == self.n:  # one run through the whole call, started before it (carry) or at t[0]
            start = carry if carry is not None else int(self.t[0])
            self.owner._state[op.nid] = start
            return self.t - start >= op.window_ns, self.ones()
        before = np.empty(self.n, np.bool_)
        before[0] = carry is not None
        before[1:] = true[:-1]
        starts = true & ~before
        index = np.where(starts, np.arange(self.n), -1)
        start_index = np.maximum.accumulate(index)
        run_start = np.where(
            start_index >= 0, self.t[np.maximum(start_index, 0)], carry if carry is not None else 0
        )
        result = true & (self.t - run_start >= op.window_ns)
        self.owner._state[op.nid] = int(run_start[-1]) if bool(true[-1]) else None
        return result, self.ones()

    def edge(self, op: Op) -> Vec:
        d, v = self.eval(op.args[0])
        true = d  # scrubbed: true exactly where the condition is true (not missing)
        previous: bool | None = self.owner._state.get(op.nid)
        before = np.empty(self.n, np.bool_)
        before[1:] = true[:-1]
        if op.fn == "rising":
            before[0] = True if previous is None else previous
            result = true & ~before
        else:
            before[0] = False if previous is None else previous
            result = (v & ~d) & before
        self.owner._state[op.nid] = bool(true[-1])
        return result, self.ones()

    def changed(self, op: Op) -> Vec:
        d, v = self.eval(op.args[0])
        state = self.owner._state.get(op.nid)
        prev_d = np.empty_like(d)
        prev_v = np.empty(self.n, np.bool_)
        prev_d[1:] = d[:-1]
        prev_v[1:] = v[:-1]
        if state is None:
            prev_d[0] = d[0]
            prev_v[0] = v[0]
        else:
            prev_v[0], prev_d[0] = state
        result = v & (~prev_v | (d != prev_d))
        if state is None:
            result[0] = False
        self.owner._state[op.nid] = (bool(v[-1]), d[-1])
        return np.asarray(result, np.bool_), self.ones()


class _SharedContext(_Context):
    """The context of one set of evaluation times in a :class:`BatchGrid`: pure nodes are memoized by
    ``Op.key``, so every campaign evaluated at these times computes each shared subtree once."""

    def __init__(self, grid: BatchGrid, t: npt.NDArray[np.int64], fetch_range: tuple[int, int]) -> None:
        """The context of ``t`` in ``grid``: its feeds, history, held values and per-batch caches."""
        owner = grid._holder  # held values and models; no state (a grid's context runs no state function)
        super().__init__(owner, t, grid.feeds, grid._history, feed_cache=grid._feed_cache)  # type: ignore[arg-type]
        self._fetched = grid._fetched  # one history fetch per signal for the whole batch
        self.fetch_range = fetch_range
        self.spans = grid._spans
        self._memo: dict[bytes, Vec] = {}
        self._truth: dict[bytes, npt.NDArray[np.bool_] | None] = {}

    def eval(self, op: Op) -> Vec:
        found = self._memo.get(op.key)
        if found is None:
            found = _Context.eval(self, op)
            self._memo[op.key] = found
        return found

    def truth(self, op: Op) -> npt.NDArray[np.bool_] | None:
        if op.key in self._truth:
            return self._truth[op.key]
        true, _ = self.eval(op)  # scrubbed: the data is true exactly where the condition is true
        found = true if any_true(true) else None
        self._truth[op.key] = found
        return found


_HANDLERS: dict[str, Any] = {
    "const": _Context.const,
    "and": _Context.logic,
    "or": _Context.logic,
    "not": _Context.negation,
    "neg": _Context.minus,
    **dict.fromkeys(("+", "-", "*", "/", "%", "**"), _Context.arith),
    **dict.fromkeys(("==", "!=", "<", "<=", ">", ">="), _Context.compare),
    **dict.fromkeys(("abs", "sqrt", "floor", "ceil", "min", "max"), _Context.math),
    **dict.fromkeys(
        ("avg", "min_over", "max_over", "delta", "rate", "prev_avg", "prev_min", "prev_max"), _Context.window
    ),
    "count": _Context.count,
    "held": _Context.held,
    "rising": _Context.edge,
    "falling": _Context.edge,
    "changed": _Context.changed,
    "is_null": _Context.is_null,
    "age": _Context.age,
    "model": _Context.model,
}
