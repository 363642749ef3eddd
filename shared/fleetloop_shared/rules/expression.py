"""Compiling a trigger expression: type check against the catalog, then build an evaluation closure.

The checker runs once, when a rule is validated (in the cloud) or installed (on the device); everything
it can know statically (unknown function, wrong arity, a duration where a value belongs, a string
compared with a number, an unknown signal) is refused there with the exact position. What only run time
knows (a signal has no sample yet, a division by zero) becomes a missing value, never an exception.

The closures are the "first engine": one Python call per node per evaluation. They keep the structure
that a vectorized engine later replaces: a per-campaign :class:`Evaluator` (where stateful functions
such as ``rising()`` will keep their state) and a :class:`WindowSource` that hands out history.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.rules import values as rt
from fleetloop_shared.rules.durations import UNIT_NS, format_duration
from fleetloop_shared.rules.location import Locator
from fleetloop_shared.rules.parser import MAX_DEPTH, parse
from fleetloop_shared.rules.syntax import Binary, Boolean, Call, Duration, Node, Number, Signal, String, Unary

#: Longest window a rule may ask for; the ring buffers must hold this much history on small devices.
MAX_WINDOW_NS = UNIT_NS["h"]


class WindowSource(Protocol):
    """Where window functions read history: the samples of one signal path in a time range."""

    def samples(
        self, path: str, from_ns_exclusive: int, to_ns_inclusive: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[Any]]:
        """``(t_ns, values)`` of ``path`` with ``from_ns_exclusive < t <= to_ns_inclusive``, in time order."""
        ...


_Fn = Callable[[int, Mapping[str, object], WindowSource], rt.Value]


class _Type(Enum):
    NUMBER = "number"
    BOOL = "true/false"
    STRING = "string"
    ANY = "signal value"  # a signal whose type is unknown without a catalog


@dataclass(frozen=True)
class _MathFunction:
    min_args: int
    max_args: int | None
    impl: Callable[[list[rt.Value]], rt.Value]
    signature: str


_MATH: dict[str, _MathFunction] = {
    "abs": _MathFunction(1, 1, rt.absolute, "abs(x)"),
    "min": _MathFunction(2, None, rt.minimum, "min(a, b, ...)"),
    "max": _MathFunction(2, None, rt.maximum, "max(a, b, ...)"),
}

_WINDOW: dict[str, Callable[[npt.NDArray[Any]], rt.Value]] = {
    "avg": rt.window_avg,
    "delta": rt.window_delta,
    "min_over": rt.window_min,
    "max_over": rt.window_max,
}

_ARITHMETIC_OPS = frozenset(rt.ARITHMETIC)
_ORDERING_OPS = frozenset(rt.ORDERING)


class Evaluator:
    """Evaluation of one expression for one campaign; holds the per-campaign state of stateful functions.

    (None of the current functions is stateful; the object exists so that adding ``rising()`` or
    ``held()`` later does not change how the trigger engine drives evaluation.)
    """

    def __init__(self, fn: _Fn) -> None:
        self._fn = fn

    def evaluate(self, t_ns: int, values: Mapping[str, object], history: WindowSource) -> object:
        """The expression's value at ``t_ns`` given the current (sample-and-hold) ``values`` by path.

        ``None`` means missing. Never raises for any input values.
        """
        return self._fn(t_ns, values, history)


class Expression:
    """A compiled, type-checked expression. Equal when the text is equal."""

    def __init__(self, text: str, signals: frozenset[str], max_window_ns: int, fn: _Fn) -> None:
        self.text = text
        self.signals = signals
        self.max_window_ns = max_window_ns
        self._fn = fn

    def evaluator(self) -> Evaluator:
        """A fresh evaluation state (one per running campaign)."""
        return Evaluator(self._fn)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Expression) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return f"Expression({self.text!r})"


def compile_expression(
    text: str, *, catalog: Catalog | None = None, source: str = "", line: int = 1, col: int = 1
) -> Expression:
    """Compile ``text`` (which starts at ``line``:``col`` of ``source``); :class:`RuleError` if invalid.

    With a catalog, signal paths must exist in it and get its datatypes; without one, any dotted path
    is accepted as a signal (the cloud validates a rule before it knows every device's catalog).
    """
    return compile_located(text, Locator.standalone(text, source=source, line=line, col=col), catalog)


def compile_located(
    text: str, locator: Locator, catalog: Catalog | None, *, require_condition: bool = False
) -> Expression:
    """Compile ``text`` reporting errors through ``locator``.

    ``require_condition`` refuses expressions whose type is known not to be true/false (a trigger).
    """
    tree = parse(text, locator)
    compiler = _Compiler(locator, catalog)
    kind, fn = compiler.compile(tree, 0)
    if kind is _Type.STRING:
        raise locator.error("expression computes a string; it must compute a number or true/false", 0)
    if require_condition and kind is _Type.NUMBER:
        raise locator.error("condition computes a number; it must be true/false (compare it)", 0)
    return Expression(text, frozenset(compiler.signals), compiler.max_window_ns, fn)


class _Compiler:
    def __init__(self, locator: Locator, catalog: Catalog | None) -> None:
        self._loc = locator
        self._catalog = catalog
        self.signals: set[str] = set()
        self.max_window_ns = 0

    def compile(self, node: Node, depth: int) -> tuple[_Type, _Fn]:
        if depth > MAX_DEPTH:
            raise self._loc.error(f"expression is nested deeper than {MAX_DEPTH} levels", node.offset)
        match node:
            case Number(value=number):
                return _Type.NUMBER, _constant(number)
            case Boolean(value=flag):
                return _Type.BOOL, _constant(flag)
            case String(value=string):
                return _Type.STRING, _constant(string)
            case Duration(text=text, offset=offset):
                raise self._loc.error(
                    f"duration {text} is only allowed as the window of avg, delta, min_over or max_over",
                    offset,
                )
            case Signal():
                return self._signal(node)
            case Unary():
                return self._unary(node, depth)
            case Binary():
                return self._binary(node, depth)
            case Call():
                return self._call(node, depth)
        raise AssertionError(f"unhandled syntax node {node!r}")  # pragma: no cover

    def _signal_type(self, node: Signal) -> _Type:
        if self._catalog is None:
            return _Type.ANY
        spec = self._catalog.get(node.path)
        if spec is None:
            raise self._loc.error(f"unknown signal {node.path!r} (not in the catalog)", node.offset)
        return _Type.BOOL if spec.data_type is DataType.BOOL else _Type.NUMBER

    def _signal(self, node: Signal) -> tuple[_Type, _Fn]:
        kind = self._signal_type(node)
        self.signals.add(node.path)
        path = node.path
        normalize = rt.normalize

        def read(t_ns: int, values: Mapping[str, object], history: WindowSource) -> rt.Value:
            return normalize(values.get(path))

        return kind, read

    def _unary(self, node: Unary, depth: int) -> tuple[_Type, _Fn]:
        kind, operand = self.compile(node.operand, depth + 1)
        if node.op == "not":
            self._expect(kind, _Type.BOOL, "'not'", node.offset)
            kleene_not = rt.kleene_not

            def negation(t_ns: int, values: Mapping[str, object], history: WindowSource) -> rt.Value:
                return kleene_not(operand(t_ns, values, history))

            return _Type.BOOL, negation
        self._expect(kind, _Type.NUMBER, "unary '-'", node.offset)
        negate = rt.negate

        def minus(t_ns: int, values: Mapping[str, object], history: WindowSource) -> rt.Value:
            return negate(operand(t_ns, values, history))

        return _Type.NUMBER, minus

    def _binary(self, node: Binary, depth: int) -> tuple[_Type, _Fn]:
        op = node.op
        left_kind, left = self.compile(node.left, depth + 1)
        right_kind, right = self.compile(node.right, depth + 1)
        kinds = (left_kind, right_kind)
        if op in ("and", "or"):
            for kind in kinds:
                self._expect(kind, _Type.BOOL, f"'{op}'", node.op_offset)
            combine = rt.kleene_and if op == "and" else rt.kleene_or

            # Both sides are always evaluated (no short circuit) so that stateful functions added
            # later see every tick.
            def logical(t_ns: int, values: Mapping[str, object], history: WindowSource) -> rt.Value:
                return combine(left(t_ns, values, history), right(t_ns, values, history))

            return _Type.BOOL, logical
        if op in _ARITHMETIC_OPS or op in _ORDERING_OPS:
            if any(k not in (_Type.NUMBER, _Type.ANY) for k in kinds):
                message = (
                    f"cannot compare {left_kind.value} with {right_kind.value} using '{op}'"
                    if op in _ORDERING_OPS
                    else f"'{op}' needs numbers, got {left_kind.value} and {right_kind.value}"
                )
                raise self._loc.error(message, node.op_offset)
        elif not _comparable(left_kind, right_kind):
            raise self._loc.error(
                f"cannot compare {left_kind.value} with {right_kind.value} using '{op}'", node.op_offset
            )
        if op in _ARITHMETIC_OPS:
            arithmetic = rt.arithmetic

            def arith(t_ns: int, values: Mapping[str, object], history: WindowSource) -> rt.Value:
                return arithmetic(op, left(t_ns, values, history), right(t_ns, values, history))

            return _Type.NUMBER, arith
        compare = rt.compare

        def comparison(t_ns: int, values: Mapping[str, object], history: WindowSource) -> rt.Value:
            return compare(op, left(t_ns, values, history), right(t_ns, values, history))

        return _Type.BOOL, comparison

    def _call(self, node: Call, depth: int) -> tuple[_Type, _Fn]:
        if node.name in _WINDOW:
            return self._window(node)
        function = _MATH.get(node.name)
        if function is None:
            known = ", ".join(sorted([*_MATH, *_WINDOW]))
            raise self._loc.error(f"unknown function {node.name!r} (known: {known})", node.offset)
        count = len(node.args)
        if count < function.min_args or (function.max_args is not None and count > function.max_args):
            raise self._loc.error(
                f"{node.name}() takes {_arity(function)}, got {count}: {function.signature}", node.offset
            )
        compiled = []
        for arg in node.args:
            kind, fn = self.compile(arg, depth + 1)
            self._expect(kind, _Type.NUMBER, f"{node.name}()", arg.offset)
            compiled.append(fn)
        impl = function.impl

        def call(t_ns: int, values: Mapping[str, object], history: WindowSource) -> rt.Value:
            return impl([fn(t_ns, values, history) for fn in compiled])

        return _Type.NUMBER, call

    def _window(self, node: Call) -> tuple[_Type, _Fn]:
        name = node.name
        signature = f"{name}(signal, window)"
        if len(node.args) != 2:
            raise self._loc.error(
                f"{name}() takes 2 arguments, got {len(node.args)}: {signature}", node.offset
            )
        series, window = node.args
        if not isinstance(series, Signal):
            raise self._loc.error(
                f"the first argument of {name}() must be a signal path: {signature}", series.offset
            )
        if not isinstance(window, Duration):
            raise self._loc.error(
                f"the window of {name}() must be a duration like 500ms, 1s, 2m or 1h", window.offset
            )
        if window.ns <= 0:
            raise self._loc.error(f"the window of {name}() must be longer than 0", window.offset)
        if window.ns > MAX_WINDOW_NS:
            raise self._loc.error(
                f"the window of {name}() may be at most {format_duration(MAX_WINDOW_NS)}", window.offset
            )
        kind = self._signal_type(series)
        self._expect(kind, _Type.NUMBER, f"{name}()", series.offset)
        self.signals.add(series.path)
        self.max_window_ns = max(self.max_window_ns, window.ns)
        path, window_ns, reduce = series.path, window.ns, _WINDOW[name]
        usable = rt.window_values

        def over_window(t_ns: int, values: Mapping[str, object], history: WindowSource) -> rt.Value:
            _, samples = history.samples(path, t_ns - window_ns, t_ns)
            cleaned = usable(np.asarray(samples))
            return None if cleaned is None else reduce(cleaned)

        return _Type.NUMBER, over_window

    def _expect(self, kind: _Type, wanted: _Type, where: str, offset: int) -> None:
        if kind is not wanted and kind is not _Type.ANY:
            raise self._loc.error(f"{where} needs {wanted.value}, got {kind.value}", offset)


def _comparable(a: _Type, b: _Type) -> bool:
    if _Type.STRING in (a, b):
        return a is b
    return a is b or _Type.ANY in (a, b)


def _arity(function: _MathFunction) -> str:
    if function.max_args is None:
        return f"at least {function.min_args} arguments"
    if function.min_args == function.max_args:
        return f"{function.min_args} argument" + ("s" if function.min_args != 1 else "")
    return f"{function.min_args} to {function.max_args} arguments"


def _constant(value: rt.Value) -> _Fn:
    def constant(t_ns: int, values: Mapping[str, object], history: WindowSource) -> rt.Value:
        return value

    return constant
