"""Compiling a trigger expression: a static type check, then a typed operation tree.

The checker runs once, when a rule is validated (in the cloud) or installed (on the device); everything
it can know statically (unknown function, wrong arity, a duration where a value belongs, a string
compared with a number, an unknown signal) is refused there with the exact position. What only run time
knows (a signal has no sample yet, a division by zero, an integer overflow) becomes a missing value,
never an exception.

The result is a tree of :class:`Op` nodes whose *kind* (integer, float, true/false, string) is fixed
statically, so the vectorized evaluator (:mod:`fleetloop_shared.rules.vector`) can give every node one
numpy dtype (strings: ``object`` arrays of Python ``str``). Result kinds: ``+ - * %`` keep integers
when both sides are integers (an overflow of 64 bits is missing); ``/``, ``**``, ``sqrt``, ``avg``,
``prev_avg``, ``rate``, ``age`` and ``model`` give floats; ``floor``/``ceil`` give integers;
``min``/``max`` give integers only when every argument is one.

Strings (``STRING`` signals and quoted literals) only compare with strings: ``==``/``!=`` exactly, and
``< <= > >=`` by Unicode code point (Python's ``str`` order, the same as UTF-8 byte order, so every
implementation agrees without a locale). Arithmetic, numeric functions and numeric windows on a string
are refused statically, as is a string compared with a number or true/false.
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass, field
from enum import Enum

from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.rules.durations import UNIT_NS, format_duration
from fleetloop_shared.rules.location import Locator
from fleetloop_shared.rules.parser import MAX_DEPTH, parse
from fleetloop_shared.rules.syntax import Binary, Boolean, Call, Duration, Node, Number, Signal, String, Unary

#: Longest window a rule may ask for; the ring buffers must hold this much history on small devices.
MAX_WINDOW_NS = UNIT_NS["h"]


class Kind(Enum):
    """The static type of an expression node."""

    INT = "integer"
    FLOAT = "number"
    BOOL = "true/false"
    STRING = "string"
    ANY = "signal value"  # a signal whose type is unknown without a catalog (validation only)


_NUMERIC = frozenset({Kind.INT, Kind.FLOAT, Kind.ANY})
#: The static kind of a signal of each catalog datatype.
_SIGNAL_KINDS = {
    DataType.BOOL: Kind.BOOL,
    DataType.INT64: Kind.INT,
    DataType.FLOAT64: Kind.FLOAT,
    DataType.STRING: Kind.STRING,
}

ARITHMETIC_OPS = frozenset({"+", "-", "*", "/", "%", "**"})
ORDERING_OPS = frozenset({"<", "<=", ">", ">="})
EQUALITY_OPS = frozenset({"==", "!="})
#: Window functions over one signal's samples: name → (previous window?, result kind or None = signal's).
WINDOW_FUNCTIONS: dict[str, tuple[bool, Kind | None]] = {
    "avg": (False, Kind.FLOAT),
    "min_over": (False, None),
    "max_over": (False, None),
    "delta": (False, None),
    "rate": (False, Kind.FLOAT),
    "prev_avg": (True, Kind.FLOAT),
    "prev_min": (True, None),
    "prev_max": (True, None),
}
_MATH_SIGNATURES = {
    "abs": "abs(x)",
    "sqrt": "sqrt(x)",
    "floor": "floor(x)",
    "ceil": "ceil(x)",
    "min": "min(a, b, ...)",
    "max": "max(a, b, ...)",
}
_OTHER_SIGNATURES = {
    "count": "count(condition, window)",
    "held": "held(condition, window)",
    "rising": "rising(condition)",
    "falling": "falling(condition)",
    "changed": "changed(x)",
    "is_null": "is_null(x)",
    "age": "age(signal)",
    "model": 'model("name", window)',
}
FUNCTIONS = frozenset([*_MATH_SIGNATURES, *WINDOW_FUNCTIONS, *_OTHER_SIGNATURES])
#: Functions whose value depends on more than the evaluation time: the state functions (they see the
#: campaign's own earlier evaluation times) and models (scored only at the campaign's own times).
IMPURE_FUNCTIONS = frozenset({"count", "held", "rising", "falling", "changed", "model"})


@dataclass(eq=False)
class Op:
    """One node of a compiled expression.

    ``fn`` names the operation: ``const``, ``signal``, ``neg``, ``not``, an operator (``+``, ``==``,
    ``and``, ...) or a function name. ``nid`` numbers the nodes of one expression (evaluation state is
    kept per node). ``path`` is the signal of ``signal``, window functions and ``age``; ``window_ns`` the
    window of window functions, ``count``, ``held`` and ``model``; ``value`` the constant or model name.

    ``key`` is a digest of the node's whole subtree (operation, kinds, constants, paths, windows), equal
    for equal subtrees of any expression: the engine computes a *pure* node (one whose value at t depends
    on t alone, i.e. no stateful function or model below it) once per batch for every campaign that
    contains it.
    """

    fn: str
    kind: Kind
    args: tuple[Op, ...] = ()
    value: object = None
    path: str = ""
    window_ns: int = 0
    nid: int = field(default=0)
    key: bytes = b""
    pure: bool = True


class Expression:
    """A compiled, type-checked expression. Equal when the text is equal.

    ``signals`` are every signal the expression reads (its evaluation times are their sample times);
    ``max_window_ns`` the history it needs (twice the window for ``prev_*``); ``models`` the
    ``(model name, window ns)`` pairs it calls.
    """

    def __init__(
        self,
        text: str,
        root: Op,
        signals: frozenset[str],
        max_window_ns: int,
        node_count: int,
        models: frozenset[tuple[str, int]] = frozenset(),
    ) -> None:
        self.text = text
        self.root = root
        self.signals = signals
        self.max_window_ns = max_window_ns
        self.node_count = node_count
        self.models = models

    @property
    def kind(self) -> Kind:
        return self.root.kind

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Expression) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return f"Expression({self.text!r})"


def compile_expression(
    text: str,
    *,
    catalog: Catalog | None = None,
    source: str = "",
    line: int = 1,
    col: int = 1,
    require_condition: bool = False,
) -> Expression:
    """Compile ``text`` (which starts at ``line``:``col`` of ``source``); :class:`RuleError` if invalid.

    With a catalog, signal paths must exist in it and get its datatypes; without one, any dotted path
    is accepted as a signal (the cloud validates a rule before it knows every device's catalog).
    ``require_condition`` refuses an expression that visibly computes a number or a string (a trigger
    must be true/false); ``rules eval`` leaves it off, as any value can be printed.
    """
    locator = Locator.standalone(text, source=source, line=line, col=col)
    return compile_located(text, locator, catalog, require_condition=require_condition)


def compile_located(
    text: str, locator: Locator, catalog: Catalog | None, *, require_condition: bool = False
) -> Expression:
    """Compile ``text`` reporting errors through ``locator``.

    ``require_condition`` refuses expressions whose type is known not to be true/false (a trigger).
    """
    tree = parse(text, locator)
    compiler = _Compiler(locator, catalog)
    root = compiler.compile(tree, 0)
    if require_condition and root.kind in (Kind.INT, Kind.FLOAT, Kind.STRING):
        what = "a string" if root.kind is Kind.STRING else "a number"
        raise locator.error(f"condition computes {what}; it must be true/false (compare it)", 0)
    return Expression(
        text,
        root,
        frozenset(compiler.signals),
        compiler.max_window_ns,
        compiler.count,
        frozenset(compiler.models),
    )


def _numeric_result(kinds: list[Kind]) -> Kind:
    if Kind.ANY in kinds:
        return Kind.ANY
    return Kind.INT if all(k is Kind.INT for k in kinds) else Kind.FLOAT


class _Compiler:
    def __init__(self, locator: Locator, catalog: Catalog | None) -> None:
        self._loc = locator
        self._catalog = catalog
        self.signals: set[str] = set()
        self.models: set[tuple[str, int]] = set()
        self.max_window_ns = 0
        self.count = 0

    def _op(self, fn: str, kind: Kind, args: tuple[Op, ...] = (), **extra: object) -> Op:
        op = Op(fn, kind, args, nid=self.count, **extra)  # type: ignore[arg-type]
        self.count += 1
        op.pure = fn not in IMPURE_FUNCTIONS and all(a.pure for a in args)
        digest = hashlib.blake2b(digest_size=16)
        own = (fn, kind.name, type(op.value).__name__, repr(op.value), op.path, op.window_ns, len(args))
        digest.update(repr(own).encode())
        for arg in args:
            digest.update(arg.key)
        op.key = digest.digest()
        return op

    def compile(self, node: Node, depth: int) -> Op:
        if depth > MAX_DEPTH:
            raise self._loc.error(f"expression is nested deeper than {MAX_DEPTH} levels", node.offset)
        match node:
            case Number(value=number):
                return self._op("const", Kind.INT if type(number) is int else Kind.FLOAT, value=number)
            case Boolean(value=flag):
                return self._op("const", Kind.BOOL, value=flag)
            case String(value=string):
                return self._op("const", Kind.STRING, value=string)
            case Duration(text=text, offset=offset):
                raise self._loc.error(
                    f"duration {text} is only allowed as the window argument of a window function, "
                    "e.g. avg(Vehicle.Speed, 1s)",
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

    def _signal_kind(self, node: Signal) -> Kind:
        if self._catalog is None:
            return Kind.ANY
        spec = self._catalog.get(node.path)
        if spec is None:
            paths = [s.path for s in self._catalog]
            hint = difflib.get_close_matches(node.path, paths, n=1)
            suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
            raise self._loc.error(
                f"unknown signal {node.path!r} (not in the catalog){suggestion}", node.offset
            )
        return _SIGNAL_KINDS[spec.data_type]

    def _signal(self, node: Signal) -> Op:
        kind = self._signal_kind(node)
        self.signals.add(node.path)
        return self._op("signal", kind, path=node.path)

    def _unary(self, node: Unary, depth: int) -> Op:
        operand = self.compile(node.operand, depth + 1)
        if node.op == "not":
            self._expect(operand.kind, Kind.BOOL, "'not'", node.offset)
            return self._op("not", Kind.BOOL, (operand,))
        self._expect_number(operand.kind, "unary '-'", node.offset)
        return self._op("neg", operand.kind, (operand,))

    def _binary(self, node: Binary, depth: int) -> Op:
        op = node.op
        left = self.compile(node.left, depth + 1)
        right = self.compile(node.right, depth + 1)
        kinds = [left.kind, right.kind]
        if op in ("and", "or"):
            for kind in kinds:
                self._expect(kind, Kind.BOOL, f"'{op}'", node.op_offset)
            return self._op(op, Kind.BOOL, (left, right))
        if op in ARITHMETIC_OPS:
            if any(k not in _NUMERIC for k in kinds):
                message = f"'{op}' needs numbers, got {_describe(left.kind)} and {_describe(right.kind)}"
                raise self._loc.error(message, node.op_offset)
        elif op in ORDERING_OPS and Kind.BOOL in kinds:
            raise self._loc.error(
                f"cannot compare {_describe(left.kind)} with {_describe(right.kind)} using '{op}'"
                + (" (true/false has no order)" if left.kind is right.kind else ""),
                node.op_offset,
            )
        elif not _comparable(left.kind, right.kind):
            raise self._loc.error(
                f"cannot compare {_describe(left.kind)} with {_describe(right.kind)} using '{op}'",
                node.op_offset,
            )
        if op in ARITHMETIC_OPS:
            kind = Kind.FLOAT if op in ("/", "**") and Kind.ANY not in kinds else _numeric_result(kinds)
            return self._op(op, kind, (left, right))
        return self._op(op, Kind.BOOL, (left, right))

    def _arity(self, node: Call, low: int, high: int | None, signature: str) -> None:
        count = len(node.args)
        if count < low or (high is not None and count > high):
            if high is None:
                wanted = f"at least {low} arguments"
            elif low == high:
                wanted = f"{low} argument" + ("s" if low != 1 else "")
            else:
                wanted = f"{low} to {high} arguments"
            raise self._loc.error(f"{node.name}() takes {wanted}, got {count}: {signature}", node.offset)

    def _window_arg(self, node: Call, arg: Node, signature: str, factor: int = 1) -> int:
        if not isinstance(arg, Duration):
            raise self._loc.error(
                f"the window of {node.name}() must be a duration like 500ms, 1s, 2m or 1h: {signature}",
                arg.offset,
            )
        if arg.ns <= 0:
            raise self._loc.error(f"the window of {node.name}() must be longer than 0", arg.offset)
        if arg.ns > MAX_WINDOW_NS:
            raise self._loc.error(
                f"the window of {node.name}() may be at most {format_duration(MAX_WINDOW_NS)}", arg.offset
            )
        self.max_window_ns = max(self.max_window_ns, factor * arg.ns)
        return arg.ns

    def _call(self, node: Call, depth: int) -> Op:
        name = node.name
        if name in WINDOW_FUNCTIONS:
            return self._window(node)
        if name in _MATH_SIGNATURES:
            return self._math(node, depth)
        signature = _OTHER_SIGNATURES.get(name)
        if signature is None:
            hint = difflib.get_close_matches(name, sorted(FUNCTIONS), n=1)
            suggestion = f"; did you mean {hint[0]}()?" if hint else ""
            raise self._loc.error(
                f"unknown function {name!r}{suggestion} (known: {', '.join(sorted(FUNCTIONS))})", node.offset
            )
        if name in ("count", "held"):
            self._arity(node, 2, 2, signature)
            cond = self.compile(node.args[0], depth + 1)
            self._expect(cond.kind, Kind.BOOL, f"{name}()", node.args[0].offset)
            window = self._window_arg(node, node.args[1], signature)
            return self._op(name, Kind.INT if name == "count" else Kind.BOOL, (cond,), window_ns=window)
        if name in ("rising", "falling"):
            self._arity(node, 1, 1, signature)
            cond = self.compile(node.args[0], depth + 1)
            self._expect(cond.kind, Kind.BOOL, f"{name}()", node.args[0].offset)
            return self._op(name, Kind.BOOL, (cond,))
        if name in ("changed", "is_null"):
            self._arity(node, 1, 1, signature)
            arg = self.compile(node.args[0], depth + 1)
            return self._op(name, Kind.BOOL, (arg,))
        if name == "age":
            self._arity(node, 1, 1, signature)
            series = node.args[0]
            if not isinstance(series, Signal):
                raise self._loc.error(
                    f"the argument of age() must be a signal path: {signature}", series.offset
                )
            signal_kind = self._signal_kind(series)
            self.signals.add(series.path)
            return self._op("age", Kind.FLOAT, path=series.path, value=signal_kind)
        # model("name", window)
        self._arity(node, 2, 2, signature)
        model_name = node.args[0]
        if not isinstance(model_name, String) or not model_name.value:
            raise self._loc.error(
                f"the first argument of model() must be a quoted model name: {signature}", model_name.offset
            )
        window = self._window_arg(node, node.args[1], signature)
        self.models.add((model_name.value, window))
        return self._op("model", Kind.FLOAT, value=model_name.value, window_ns=window)

    def _math(self, node: Call, depth: int) -> Op:
        name = node.name
        signature = _MATH_SIGNATURES[name]
        if name in ("min", "max"):
            self._arity(node, 2, None, signature)
        else:
            self._arity(node, 1, 1, signature)
        args = []
        for arg in node.args:
            op = self.compile(arg, depth + 1)
            self._expect_number(op.kind, f"{name}()", arg.offset)
            args.append(op)
        kinds = [a.kind for a in args]
        if name == "sqrt":
            kind = Kind.ANY if Kind.ANY in kinds else Kind.FLOAT
        elif name in ("floor", "ceil"):
            kind = Kind.ANY if Kind.ANY in kinds else Kind.INT
        else:
            kind = _numeric_result(kinds)
        return self._op(name, kind, tuple(args))

    def _window(self, node: Call) -> Op:
        name = node.name
        signature = f"{name}(signal, window)"
        self._arity(node, 2, 2, signature)
        series, window = node.args
        if not isinstance(series, Signal):
            raise self._loc.error(
                f"the first argument of {name}() must be a signal path: {signature}", series.offset
            )
        previous, result = WINDOW_FUNCTIONS[name]
        window_ns = self._window_arg(node, window, signature, 2 if previous else 1)
        kind = self._signal_kind(series)
        if kind is Kind.STRING:
            raise self._loc.error(
                f"{name}() needs a numeric signal, {series.path} holds strings "
                f'(on strings use changed(), is_null(), age() or count({series.path} == "...", w))',
                series.offset,
            )
        self._expect_number(kind, f"{name}()", series.offset)
        self.signals.add(series.path)
        return self._op(name, result or kind, path=series.path, window_ns=window_ns)

    def _expect(self, kind: Kind, wanted: Kind, where: str, offset: int) -> None:
        if kind is not wanted and kind is not Kind.ANY:
            raise self._loc.error(f"{where} needs {wanted.value}, got {_describe(kind)}", offset)

    def _expect_number(self, kind: Kind, where: str, offset: int) -> None:
        if kind not in _NUMERIC:
            raise self._loc.error(f"{where} needs a number, got {_describe(kind)}", offset)


def _describe(kind: Kind) -> str:
    """The kind as messages name it: integers and floats are both just numbers to an operator."""
    return "number" if kind in (Kind.INT, Kind.FLOAT) else kind.value


def _comparable(a: Kind, b: Kind) -> bool:
    """Whether ``a`` and ``b`` may be compared (ordering also needs neither to be true/false)."""
    if Kind.ANY in (a, b):
        return True  # without a catalog a signal may hold anything, strings too
    if a in _NUMERIC and b in _NUMERIC:
        return True
    return a is b
