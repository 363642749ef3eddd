"""The language contract (docs/rules.md), checked three ways:

* a table of hand-computed expectations covering every operator, function and rule;
* a slow reference interpreter written here straight from the contract (one evaluation time at a
  time, recomputing windows and state from the whole history, no numpy in the semantics), compared with
  the vectorized evaluator on random expressions over random data split into random batches;
* the same for fires (modes, ``min_interval``) through the real trigger engine and ring buffers.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetloop_agent.ring_buffer import RingBuffers
from fleetloop_agent.trigger_engine import TriggerEngine
from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.rules import Evaluator, compile_expression, parse_campaign
from fleetloop_shared.rules.location import Locator
from fleetloop_shared.rules.parser import parse
from fleetloop_shared.rules.syntax import Binary, Boolean, Call, Duration, Node, Number, Signal, String, Unary
from fleetloop_shared.samples import GroupBatch

S = 1_000_000_000
MS = 1_000_000
BIG = 2**62 + 1  # not representable as a float64
I64 = (-(2**63), 2**63 - 1)

Sample = tuple[int, str, Any]  # (t_ns, path, value)

KINDS = {"a": DataType.INT64, "b": DataType.INT64, "x": DataType.FLOAT64, "y": DataType.FLOAT64}
KINDS |= {"p": DataType.BOOL, "q": DataType.BOOL, "s": DataType.STRING, "u": DataType.STRING}


def make_catalog() -> Catalog:
    catalog = Catalog()
    for path, kind in KINDS.items():
        catalog.add(path, kind)
    return catalog


CATALOG = make_catalog()


# --- the reference interpreter ------------------------------------------------------------------------


def _i64(v: int) -> int | None:
    return v if I64[0] <= v <= I64[1] else None


def _fin(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _is_num(v: object) -> bool:
    return type(v) in (int, float)


def _arith(op: str, a: Any, b: Any) -> Any:
    if a is None or b is None:
        return None
    both_int = type(a) is int and type(b) is int
    if op in "+-*":
        if both_int:
            return _i64(a + b if op == "+" else a - b if op == "-" else a * b)
        fa, fb = float(a), float(b)
        return _fin(fa + fb if op == "+" else fa - fb if op == "-" else fa * fb)
    if op == "/":
        if b == 0:
            return None
        return _fin(a / b) if both_int else _fin(float(a) / float(b))
    if op == "%":
        if b == 0:
            return None
        return _i64(a % b) if both_int else _fin(float(a) % float(b))
    try:  # "**"
        result = float(a) ** float(b)
    except (OverflowError, ZeroDivisionError):
        return None
    return _fin(result) if isinstance(result, float) else None


def _compare(op: str, a: Any, b: Any) -> Any:
    if a is None or b is None:
        return None
    return {
        "==": a == b,
        "!=": a != b,
        "<": a < b,
        "<=": a <= b,
        ">": a > b,
        ">=": a >= b,
    }[op]


def _reads(node: Node, out: set[str]) -> set[str]:
    if isinstance(node, Signal):
        out.add(node.path)
    elif isinstance(node, Unary):
        _reads(node.operand, out)
    elif isinstance(node, Binary):
        _reads(node.left, out)
        _reads(node.right, out)
    elif isinstance(node, Call):
        for arg in node.args:
            _reads(arg, out)
    return out


class Reference:
    """Evaluates the syntax tree at each evaluation time directly from the contract's definitions."""

    def __init__(self, text: str, samples: Sequence[Sample]) -> None:
        self.tree = parse(text, Locator.standalone(text))
        reads = _reads(self.tree, set())
        ordered = sorted(samples, key=lambda s: s[0])  # stable: file order among equal times
        self.series: dict[str, list[tuple[int, Any]]] = {}
        for t, path, value in ordered:
            self.series.setdefault(path, []).append((t, value))
        self.times = sorted({t for t, path, _ in samples if path in reads})
        self.memo: dict[tuple[int, int], Any] = {}

    def values(self) -> list[Any]:
        return [self.value(self.tree, i) for i in range(len(self.times))]

    def held(self, path: str, t: int) -> tuple[int, Any] | None:
        found = None
        for sample in self.series.get(path, []):
            if sample[0] <= t:
                found = sample
        return found

    def window(self, path: str, lo: int, hi: int) -> list[tuple[int, Any]]:
        out = []
        for ts, v in self.series.get(path, []):
            if lo < ts <= hi and not (isinstance(v, float) and not math.isfinite(v)):
                out.append((ts, v))
        return out

    def value(self, node: Node, i: int) -> Any:
        key = (id(node), i)
        if key not in self.memo:
            self.memo[key] = self._value(node, i)
        return self.memo[key]

    def _value(self, node: Node, i: int) -> Any:
        t = self.times[i]
        if isinstance(node, Number | Boolean | String):
            return node.value
        if isinstance(node, Signal):
            sample = self.held(node.path, t)
            if sample is None:
                return None
            v = sample[1]
            return None if isinstance(v, float) and not math.isfinite(v) else v
        if isinstance(node, Unary):
            v = self.value(node.operand, i)
            if node.op == "not":
                return None if v is None else not v
            if v is None:
                return None
            return _i64(-v) if type(v) is int else -v
        if isinstance(node, Binary):
            a = self.value(node.left, i)
            b = self.value(node.right, i)
            if node.op == "and":
                return False if False in (a, b) else (True if a is True and b is True else None)
            if node.op == "or":
                return True if True in (a, b) else (False if a is False and b is False else None)
            if node.op in ("==", "!=", "<", "<=", ">", ">="):
                return _compare(node.op, a, b)
            return _arith(node.op, a, b)
        assert isinstance(node, Call)
        name, args = node.name, node.args
        if name in ("avg", "min_over", "max_over", "delta", "rate", "prev_avg", "prev_min", "prev_max"):
            assert isinstance(args[0], Signal) and isinstance(args[1], Duration)
            w = args[1].ns
            lo, hi = (t - 2 * w, t - w) if name.startswith("prev_") else (t - w, t)
            window = self.window(args[0].path, lo, hi)
            if not window:
                return None
            vs = [v for _, v in window]
            if name in ("avg", "prev_avg"):
                if all(type(v) is int for v in vs):
                    return sum(vs) / len(vs)
                return float(np.add.reduce(np.asarray(vs, np.float64))) / len(vs)
            if name in ("min_over", "prev_min"):
                return min(vs)
            if name in ("max_over", "prev_max"):
                return max(vs)
            diff = _arith("-", vs[-1], vs[0])
            if name == "delta":
                return diff
            dt = window[-1][0] - window[0][0]
            if len(vs) < 2 or dt == 0 or diff is None:
                return None
            return _fin(float(diff) / (dt / 1e9))
        if name == "count":
            assert isinstance(args[1], Duration)
            return sum(
                1 for j in range(i + 1) if self.times[j] > t - args[1].ns and self.value(args[0], j) is True
            )
        if name == "held":
            assert isinstance(args[1], Duration)
            if self.value(args[0], i) is not True:
                return False
            j = i
            while j > 0 and self.value(args[0], j - 1) is True:
                j -= 1
            return t - self.times[j] >= args[1].ns
        if name == "rising":
            return i > 0 and self.value(args[0], i) is True and self.value(args[0], i - 1) is not True
        if name == "falling":
            return i > 0 and self.value(args[0], i) is False and self.value(args[0], i - 1) is True
        if name == "changed":
            now = self.value(args[0], i)
            if i == 0 or now is None:
                return False
            before = self.value(args[0], i - 1)
            return before is None or now != before
        if name == "is_null":
            return self.value(args[0], i) is None
        if name == "age":
            assert isinstance(args[0], Signal)
            sample = self.held(args[0].path, t)
            return None if sample is None else (t - sample[0]) / 1e9
        vals = [self.value(a, i) for a in args]
        if any(v is None for v in vals):
            return None
        if name == "abs":
            return _i64(abs(vals[0])) if type(vals[0]) is int else abs(vals[0])
        if name == "sqrt":
            return None if vals[0] < 0 else math.sqrt(vals[0])
        if name in ("floor", "ceil"):
            if type(vals[0]) is int:
                return vals[0]
            return _i64(math.floor(vals[0]) if name == "floor" else math.ceil(vals[0]))
        if name in ("min", "max"):
            if not all(type(v) is int for v in vals):
                vals = [float(v) for v in vals]
            return min(vals) if name == "min" else max(vals)
        raise AssertionError(name)


def reference_fires(values: Sequence[Any], times: Sequence[int], mode: str, min_interval: int) -> list[int]:
    fires: list[int] = []
    before, last = True, None
    for t, v in zip(times, values, strict=True):
        true = v is True
        edge = true and (mode == "always" or not before)
        before = true
        if edge and (last is None or t - last >= min_interval):
            fires.append(t)
            last = t
    return fires


# --- the engine side ------------------------------------------------------------------------------------


class ArrayHistory:
    """A WindowSource over fixed arrays: the simplest real implementation of the rules' own protocol."""

    def __init__(self, samples: Sequence[Sample]) -> None:
        ordered = sorted(samples, key=lambda s: s[0])
        self._series: dict[str, tuple[npt.NDArray[np.int64], npt.NDArray[Any]]] = {}
        for path, kind in KINDS.items():
            rows = [(t, v) for t, p, v in ordered if p == path]
            self._series[path] = (
                np.asarray([t for t, _ in rows], np.int64),
                np.asarray([v for _, v in rows], kind.numpy_dtype),
            )

    def samples(
        self, path: str, from_ns_exclusive: int, to_ns_inclusive: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[Any]]:
        t, v = self._series[path]
        mask = (t > from_ns_exclusive) & (t <= to_ns_inclusive)
        return t[mask], v[mask]


def engine_values(text: str, samples: Sequence[Sample], cuts: Sequence[int] = ()) -> list[Any]:
    """The evaluator's values at every evaluation time, feeding the samples in batches split at ``cuts``."""
    expression = compile_expression(text, catalog=CATALOG)
    evaluator = Evaluator(expression)
    history = ArrayHistory(samples)
    ordered = sorted(samples, key=lambda s: s[0])
    bounds = [-(2**62), *sorted(set(cuts)), 2**62]
    out: list[Any] = []
    for lo, hi in itertools.pairwise(bounds):
        part = [s for s in ordered if lo < s[0] <= hi]
        feeds = {}
        for path in expression.signals:
            rows = [(t, v) for t, p, v in part if p == path]
            feeds[path] = (
                np.asarray([t for t, _ in rows], np.int64),
                np.asarray([v for _, v in rows], KINDS[path].numpy_dtype),
            )
        times = np.unique(np.asarray([t for t, p, _ in part if p in expression.signals], np.int64))
        data, valid = evaluator.evaluate(times, feeds, history)
        out += [d if ok else None for d, ok in zip(data.tolist(), valid.tolist(), strict=True)]
    return out


def same(got: Sequence[Any], want: Sequence[Any]) -> bool:
    return len(got) == len(want) and all(
        type(g) is type(w) and g == w for g, w in zip(got, want, strict=True)
    )


def series(**signals: Sequence[tuple[float, Any]]) -> list[Sample]:
    return [(round(t * S), path, v) for path, rows in signals.items() for t, v in rows]


# --- the table ------------------------------------------------------------------------------------------

A3 = series(a=[(1, 3)])
X = series(x=[(1, 10.0), (2, 20.0), (3, 40.0), (4, 30.0), (5, 35.0)])
NEG = series(x=[(1, -5.0), (2, -7.0), (3, -6.0)])
N = None
GEARS = series(s=[(1, "P"), (2, "D"), (3, "R")])
XS = series(s=[(1, "x"), (2, "y"), (3, "x"), (4, "x")])

TABLE: list[tuple[str, list[Sample], list[Any]]] = [
    # arithmetic, integer exactness, precedence
    ("a + 2", A3, [5]),
    ("a - 5", A3, [-2]),
    ("a * 7", A3, [21]),
    ("a / 2", A3, [1.5]),
    ("a / 3", A3, [1.0]),
    ("a % 2", A3, [1]),
    ("-a % 2", A3, [1]),
    ("a ** 2", A3, [9.0]),
    ("-a ** 2", A3, [-9.0]),
    ("2 ** -1 + a", A3, [3.5]),
    ("2 ** 3 ** 2 + a", A3, [515.0]),
    ("a + 2 * 3", A3, [9]),
    ("(a + 2) * 3", A3, [15]),
    ("a - 1 - 1", A3, [1]),
    ("a * 2.5", A3, [7.5]),
    ("a / 0", A3, [N]),
    ("a % 0", A3, [N]),
    ("a / 0.0", A3, [N]),
    ("a * 4611686018427387904", A3, [N]),
    ("a + 9223372036854775807", A3, [N]),
    ("-a - 9223372036854775807 - 1", A3, [N]),
    ("a - 3 - 9223372036854775807 - 1", A3, [-(2**63)]),
    ("a * 1e308", A3, [N]),
    ("(0 - a) ** 0.5", A3, [N]),
    ("0.0 ** -1 + a", A3, [N]),
    ("a + 4611686018427387902", A3, [BIG]),
    ("a + 4611686018427387902 > 4611686018427387904.0", A3, [True]),
    ("a + 4611686018427387902 == 4611686018427387904.0", A3, [False]),
    ("a + 4611686018427387901 == 4611686018427387904.0", A3, [True]),
    ("(a + 4611686018427387902) / 1", A3, [float(BIG)]),
    # comparisons: exact, int vs float by value, no tolerance
    ("a == 3.0", A3, [True]),
    ("a != 3", A3, [False]),
    ("a < 3.0000000000000004", A3, [True]),
    ("0.1 + 0.2 == 0.3 or a < 0", A3, [False]),
    ("a <= 3 and a >= 3 and not (a > 3)", A3, [True]),
    ("p == true", series(p=[(1, True)]), [True]),
    # math functions
    ("abs(-a)", A3, [3]),
    ("abs(x)", NEG[:1], [5.0]),
    ("sqrt(a + 6)", A3, [3.0]),
    ("sqrt(-a)", A3, [N]),
    ("floor(x)", series(x=[(1, -2.5)]), [-3]),
    ("ceil(x)", series(x=[(1, -2.5)]), [-2]),
    ("floor(a)", A3, [3]),
    ("floor(x * 1e300)", series(x=[(1, 1e10)]), [N]),
    ("min(a, 2, 5)", A3, [2]),
    ("max(a, 2.5)", A3, [3.0]),
    ("min(a, b)", A3, [N]),
    # missing data and Kleene logic
    ("a + b", A3, [N]),
    ("b > 1 or a > 1", A3, [True]),
    ("b > 1 and a > 5", A3, [False]),
    ("b > 1 and a > 1", A3, [N]),
    ("not (b > 1) or a < 0", A3, [N]),
    ("is_null(b) and a > 0", A3, [True]),
    ("is_null(b)", A3, []),  # b has no sample: no evaluation time at all
    ("is_null(a)", A3, [False]),
    ("is_null(a / 0)", A3, [True]),
    ("x > 1", series(x=[(1, 5.0), (2, math.nan)]), [True, N]),
    # sample and hold, evaluation times, equal timestamps
    ("a + b", series(a=[(1, 1), (3, 3)], b=[(2, 10)]), [N, 11, 13]),
    ("a", series(a=[(1, 1), (1, 2), (2, 5), (2, 4)]), [2, 4]),
    # windows: (t - w, t], prev: (t - 2w, t - w]
    ("avg(x, 2s)", X, [10.0, 15.0, 30.0, 35.0, 32.5]),
    ("min_over(x, 3s)", X, [10.0, 10.0, 10.0, 20.0, 30.0]),
    ("max_over(x, 2s)", NEG, [-5.0, -5.0, -6.0]),
    ("min_over(x, 2s)", NEG, [-5.0, -7.0, -7.0]),
    ("delta(x, 3s)", X, [0.0, 10.0, 30.0, 10.0, -5.0]),
    ("rate(x, 3s)", X, [N, 10.0, 15.0, 5.0, -2.5]),
    ("prev_avg(x, 2s)", X, [N, N, 10.0, 15.0, 30.0]),
    ("prev_min(x, 1s)", X, [N, 10.0, 20.0, 40.0, 30.0]),
    ("prev_max(x, 2s)", X, [N, N, 10.0, 20.0, 40.0]),
    (
        "avg(a, 1h)",
        series(a=[(1, BIG - 1), (2, BIG), (3, BIG + 1)]),
        [float(BIG - 1), (2 * BIG - 1) / 2, float(BIG)],
    ),
    ("delta(a, 1h)", series(a=[(1, BIG - 1), (2, BIG + 1)]), [0, 2]),
    ("avg(x, 500ms) > 0 or age(a) > 100", series(x=[(1, 1.0), (3, 2.0)], a=[(2, 0)]), [True, N, True]),
    ("avg(x, 1s)", series(x=[(1, 1.0), (2, math.nan), (3, 3.0)]), [1.0, N, 3.0]),
    # state functions
    ("count(x > 15, 2s)", X, [0, 1, 2, 2, 2]),
    ("held(x > 15, 2s)", X, [False, False, False, True, True]),
    ("held(x > 15, 1s)", X, [False, False, True, True, True]),
    ("rising(x > 25)", X, [False, False, True, False, False]),
    ("falling(x > 35)", X, [False, False, False, True, False]),
    ("rising(x > 5)", X, [False, False, False, False, False]),
    ("changed(a)", series(a=[(1, 1), (2, 1), (3, 2)], b=[(4, 0)]), [False, False, True]),
    ("changed(b) or a > 5", series(a=[(1, 1), (3, 2)], b=[(2, 5)]), [False, True, False]),
    ("age(a) < 1 and age(b) < 1", series(a=[(1, 1)], b=[(2.5, 0)]), [N, False]),
    ("age(a) + age(b)", series(a=[(1, 1)], b=[(2.5, 0)]), [N, 1.5]),
    # strings: exact equality, code-point order, sample and hold, missing only before the first sample
    ('s == "D"', GEARS, [False, True, False]),
    ('s != "D"', GEARS, [True, False, True]),
    ('s < "Q"', GEARS, [True, True, False]),
    ('s >= "R"', GEARS, [False, False, True]),
    ('"Q" > s', GEARS, [True, True, False]),
    ("s", GEARS, ["P", "D", "R"]),
    ('s < "a"', series(s=[(1, "Z"), (2, "é"), (3, "B"), (4, "")]), [True, False, True, True]),
    ('s == "é"', series(s=[(1, "e\u0301"), (2, "\u00e9"), (3, "é ")]), [False, True, False]),
    ('s == ""', series(s=[(1, "")]), [True]),
    ("s == u", series(s=[(1, "a")], u=[(2, "a"), (3, "b")]), [N, True, False]),
    ("s < u", series(s=[(1, "ab")], u=[(2, "b"), (3, "a")]), [N, True, False]),
    ('s == "a" and a == 0', series(s=[(1, "a")], a=[(2, 0)]), [N, True]),
    ('s == "x" or a > 0', series(a=[(1, 3)], s=[(2, "y")]), [True, True]),
    ("s", series(s=[(1, "a"), (1, "b"), (2, "c")]), ["b", "c"]),
    ("is_null(s) and a > 0", series(a=[(1, 3)], s=[(2, "x")]), [True, False]),
    ("is_null(s)", series(s=[(1, "")]), [False]),
    (
        "changed(s)",
        series(s=[(1, "a"), (2, "a"), (3, "b"), (4, "b"), (5, "")]),
        [False, False, True, False, True],
    ),
    ("changed(s) or a > 5", series(s=[(1, "a"), (3, "b")], a=[(2, 0), (4, 0)]), [N, False, True, False]),
    ("age(s) + a", series(s=[(1, "a")], a=[(2.5, 0)]), [N, 1.5]),
    ('count(s == "x", 2s)', XS, [1, 1, 1, 2]),
    ('held(s == "x", 1s)', XS, [False, False, False, True]),
    ('rising(s == "x")', XS, [False, False, True, False]),
    ('falling(s == "x")', XS, [False, True, False, False]),
]


@pytest.mark.parametrize(("text", "samples", "expected"), TABLE, ids=[row[0] for row in TABLE])
def test_conformance_table(text: str, samples: list[Sample], expected: list[Any]) -> None:
    got = engine_values(text, samples)
    assert same(got, expected), f"engine: {got!r}"
    want = Reference(text, samples).values()
    assert same(want, expected), f"reference: {want!r}"
    # the same through batches cut at every sample
    cut = engine_values(text, samples, cuts=[t for t, _, _ in samples])
    assert same(cut, expected), f"batched: {cut!r}"


MODE_SAMPLES = series(x=[(0, 9.0), (1, 1.0), (2, 9.0), (3, math.nan), (4, 9.0), (5, 9.0), (6, 1.0), (7, 9.0)])

MODES = [
    ("rising", "0", [2, 4, 7]),  # 0 is true at start (counts as true before), nan counts as not true
    ("always", "0", [0, 2, 4, 5, 7]),
    ("always", "3s", [0, 4, 7]),
    ("rising", "3s", [2, 7]),  # the edge at 4 is lost
]


@pytest.mark.parametrize(("mode", "gap", "expected"), MODES)
def test_modes_and_min_interval(mode: str, gap: str, expected: list[int]) -> None:
    assert fires_through_engine("x > 5", mode, gap, MODE_SAMPLES) == [t * S for t in expected]


def fires_through_engine(
    text: str, mode: str, gap: str, samples: Sequence[Sample], chunk: int = 0
) -> list[int]:
    return campaigns_through_engine([(text, mode, gap)], samples, chunk)[0]


def campaigns_through_engine(
    campaigns: Sequence[tuple[str, str, str]], samples: Sequence[Sample], chunk: int = 0
) -> list[list[int]]:
    """Fires of each ``(condition, mode, min_interval)`` campaign, all running in one engine (so they
    share its per-batch work), the samples fed in batches of ``chunk`` timestamps (0: one batch)."""
    specs = []
    for k, (text, mode, gap) in enumerate(campaigns):
        doc = (
            f"apiVersion: fleetloop/v1\nkind: Campaign\nmetadata: {{name: c{k}, version: 1}}\n"
            f"spec:\n  trigger:\n    when: '{text}'\n    mode: {mode}\n    min_interval: {gap}\n"
        )
        specs.append(parse_campaign(doc))
    engine = TriggerEngine(CATALOG)
    assert engine.set_campaigns(specs, 0) == {}
    buffers = RingBuffers(CATALOG, horizon_ns=10**15)
    ordered = sorted(samples, key=lambda s: s[0])
    times = sorted({t for t, _, _ in ordered})
    fires: list[list[int]] = [[] for _ in campaigns]
    if not times:
        return fires
    groups = [times] if not chunk else [times[i : i + chunk] for i in range(0, len(times), chunk)]
    for group in groups:
        lo, hi = group[0], group[-1]
        batches = []
        for path, kind in KINDS.items():
            rows = [(t, v) for t, p, v in ordered if p == path and lo <= t <= hi]
            if rows:
                spec = CATALOG.by_path(path)
                batches.append(
                    GroupBatch(
                        path,
                        np.asarray([t for t, _ in rows], np.int64),
                        {spec.id: np.asarray([v for _, v in rows], kind.numpy_dtype)},
                    )
                )
        for batch in batches:
            buffers.append(batch)
        for fire in engine.process(batches, buffers):
            fires[int(fire.campaign[1:])].append(fire.t_ns)
    return fires


# --- hypothesis: random expressions over random data -------------------------------------------------

WINDOWS = ["500ms", "1s", "2s", "3s"]
INT_LEAVES = st.sampled_from(["a", "b", "3", "0", "4611686018427387905", "2"])
FLOAT_LEAVES = st.sampled_from(["x", "y", "2.5", "0.5", "1e300"])


def _num(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    binary = st.tuples(children, st.sampled_from(["+", "-", "*", "/", "%", "**"]), children)
    return st.one_of(
        binary.map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        children.map(lambda c: f"(-{c})"),
        st.tuples(st.sampled_from(["abs", "sqrt", "floor", "ceil"]), children).map(
            lambda t: f"{t[0]}({t[1]})"
        ),
        st.tuples(st.sampled_from(["min", "max"]), children, children).map(
            lambda t: f"{t[0]}({t[1]}, {t[2]})"
        ),
    )


WINDOW_CALLS = st.tuples(
    st.sampled_from(["avg", "min_over", "max_over", "delta", "rate", "prev_avg", "prev_min", "prev_max"]),
    st.sampled_from(["a", "b", "x", "y"]),
    st.sampled_from(WINDOWS),
).map(lambda t: f"{t[0]}({t[1]}, {t[2]})")
NUM_LEAVES = st.one_of(
    INT_LEAVES, FLOAT_LEAVES, WINDOW_CALLS, st.sampled_from(["age(x)", "age(a)", "age(s)"])
)
NUMBERS = st.recursive(NUM_LEAVES, _num, max_leaves=4)


def _cond(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.tuples(children, st.sampled_from(["and", "or"]), children).map(
            lambda t: f"({t[0]} {t[1]} {t[2]})"
        ),
        children.map(lambda c: f"(not {c})"),
        st.tuples(st.sampled_from(["rising", "falling"]), children).map(lambda t: f"{t[0]}({t[1]})"),
        st.tuples(st.sampled_from(["held"]), children, st.sampled_from(WINDOWS)).map(
            lambda t: f"held({t[1]}, {t[2]})"
        ),
        st.tuples(children, st.sampled_from(WINDOWS)).map(lambda t: f"(count({t[0]}, {t[1]}) >= 2)"),
    )


COMPARISONS = st.tuples(NUMBERS, st.sampled_from(["==", "!=", "<", "<=", ">", ">="]), NUMBERS).map(
    lambda t: f"({t[0]} {t[1]} {t[2]})"
)
STR_LEAVES = st.sampled_from(["s", "u", '""', '"a"', '"ab"', '"B"', '"é"', '"10"'])
STR_COMPARISONS = st.tuples(STR_LEAVES, st.sampled_from(["==", "!=", "<", "<=", ">", ">="]), STR_LEAVES).map(
    lambda t: f"({t[0]} {t[1]} {t[2]})"
)
COND_LEAVES = st.one_of(
    st.sampled_from(["p", "q", "true", "false"]),
    COMPARISONS,
    STR_COMPARISONS,
    st.sampled_from(["changed(s)", "is_null(u)", "changed(u)", "is_null(s)"]),
    NUMBERS.map(lambda n: f"is_null({n})"),
    NUMBERS.map(lambda n: f"changed({n})"),
    st.sampled_from(["changed(p)", "is_null(q)"]),
)
CONDITIONS = st.recursive(COND_LEAVES, _cond, max_leaves=4)

INT_VALUES = st.one_of(st.integers(-5, 5), st.sampled_from([BIG, -BIG, 2**63 - 1, -(2**63)]))
STRING_VALUES = st.one_of(
    st.sampled_from(["", "a", "ab", "b", "B", "é", "e\u0301", "10", "9", "a\x00"]),
    st.text(max_size=3),
)
FLOAT_VALUES = st.one_of(
    st.sampled_from([0.0, -0.0, 0.5, 2.5, -3.0, 1e300, math.nan, 4.611686018427388e18]),
    st.floats(-100, 100, allow_nan=False),
)


@st.composite
def sample_sets(draw: st.DrawFn) -> list[Sample]:
    samples: list[Sample] = []
    for path, kind in KINDS.items():
        count = draw(st.integers(0, 6))
        for _ in range(count):
            t = draw(st.integers(0, 16)) * 250 * MS
            if kind is DataType.INT64:
                value: Any = draw(INT_VALUES)
            elif kind is DataType.FLOAT64:
                value = draw(FLOAT_VALUES)
            elif kind is DataType.STRING:
                value = draw(STRING_VALUES)
            else:
                value = draw(st.booleans())
            samples.append((t, path, value))
    return samples


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=st.one_of(NUMBERS, CONDITIONS, st.sampled_from(["s", "u"])),
    samples=sample_sets(),
    cuts=st.lists(st.integers(0, 16), max_size=3),
)
def test_evaluator_matches_the_reference(text: str, samples: list[Sample], cuts: list[int]) -> None:
    want = Reference(text, samples).values()
    got = engine_values(text, samples, cuts=[c * 250 * MS for c in cuts])
    assert same(got, want), f"{text}\n engine:    {got!r}\n reference: {want!r}"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=CONDITIONS,
    samples=sample_sets(),
    mode=st.sampled_from(["rising", "always"]),
    gap=st.sampled_from(["0", "500ms", "1s", "2s"]),
    chunk=st.integers(0, 4),
)
def test_engine_fires_match_the_reference(
    text: str, samples: list[Sample], mode: str, gap: str, chunk: int
) -> None:
    reference = Reference(text, samples)
    gap_ns = 0 if gap == "0" else int(float(gap.rstrip("ms").rstrip("s")) * (MS if gap.endswith("ms") else S))
    want = reference_fires(reference.values(), reference.times, mode, gap_ns)
    assert fires_through_engine(text, mode, gap, samples, chunk) == want, text


def _gap_ns(gap: str) -> int:
    return 0 if gap == "0" else int(float(gap.rstrip("ms").rstrip("s")) * (MS if gap.endswith("ms") else S))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    texts=st.lists(CONDITIONS, min_size=2, max_size=4),
    samples=sample_sets(),
    modes=st.lists(st.sampled_from(["rising", "always"]), min_size=4, max_size=4),
    gap=st.sampled_from(["0", "500ms", "1s"]),
    chunk=st.integers(0, 4),
)
def test_campaigns_sharing_one_engine_match_the_reference(
    texts: list[str], samples: list[Sample], modes: list[str], gap: str, chunk: int
) -> None:
    # the same condition twice (one evaluation state shared), and conditions sharing sub-expressions
    campaigns = [(text, modes[k], gap) for k, text in enumerate(texts)] + [(texts[0], "always", "0")]
    got = campaigns_through_engine(campaigns, samples, chunk)
    for (text, mode, gap_text), fires in zip(campaigns, got, strict=True):
        reference = Reference(text, samples)
        want = reference_fires(reference.values(), reference.times, mode, _gap_ns(gap_text))
        assert fires == want, (text, mode, gap_text)


def test_reference_agrees_on_a_mapping_of_kinds() -> None:
    # guard: the catalog kinds the random data uses are what the engine compiles against
    assert isinstance(KINDS, Mapping) and {s.path for s in CATALOG} == set(KINDS)
