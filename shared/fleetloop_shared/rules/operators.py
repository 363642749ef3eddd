"""The operators of the rule language over whole arrays: pure functions of ``(data, valid)`` pairs.

:mod:`.vector`'s contexts walk an expression and keep what must survive between calls (held values,
the state of stateful functions, memos); everything here is a pointwise or per-window computation with
no state, shared by every context: the Kleene logic, exact integer and mixed arithmetic and comparison,
the math functions, and one window of one signal with the reductions over it. The value semantics
(missing data, 64-bit overflow as missing, exact int/float comparison) are ``docs/rules.md``'s.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from fleetloop_shared.rules.expression import Kind, Op

Array = npt.NDArray[Any]
#: A node's value at every evaluation time: ``(data, valid)``, data scrubbed where not valid.
Vec = tuple[Array, npt.NDArray[np.bool_]]

INT64_MIN = -(2**63)
EXACT_FLOAT_INT = 2**53

DTYPES: dict[Kind, Any] = {
    Kind.INT: np.int64,
    Kind.FLOAT: np.float64,
    Kind.BOOL: np.bool_,
    Kind.STRING: object,
}


def all_true(flags: npt.NDArray[np.bool_]) -> bool:
    """Whether every element of the 1-D ``flags`` is true (``count_nonzero`` costs a quarter of
    ``ndarray.all``'s Python-level dispatch, which dominates on the short arrays of one tick)."""
    return int(np.count_nonzero(flags)) == int(flags.shape[0])


def any_true(flags: npt.NDArray[np.bool_]) -> bool:
    """Whether some element of the 1-D ``flags`` is true (see :func:`all_true`)."""
    return int(np.count_nonzero(flags)) != 0


def blank(n: int, kind: Kind) -> Array:
    """``n`` placeholder values of ``kind`` (``""`` for strings, zero otherwise), to be masked."""
    if kind is Kind.STRING:
        return np.full(n, "", dtype=object)
    return np.zeros(n, DTYPES[kind])


def empty_of(kind: Kind) -> Vec:
    return np.empty(0, DTYPES.get(kind, np.float64)), np.empty(0, np.bool_)


#: Every all-true validity array of up to 65,536 elements is a view of this read-only one, so that
#: "valid everywhere" is known by looking at ``.base`` instead of counting (see :func:`scrub`).
_TRUE = np.ones(1 << 16, np.bool_)
_TRUE.flags.writeable = False


def true_flags(n: int) -> npt.NDArray[np.bool_]:
    """``n`` true flags, read-only (a view of ``_TRUE`` when it is long enough)."""
    if n <= _TRUE.shape[0]:
        return _TRUE[:n]
    flags = np.ones(n, np.bool_)
    flags.flags.writeable = False
    return flags


def scrub(data: Array, valid: npt.NDArray[np.bool_]) -> Vec:
    """Zero the data where missing, so later operations never see garbage (or NaN) there."""
    if valid.base is not _TRUE and not all_true(valid):
        data = data.copy() if data.flags.writeable is False else data
        data[~valid] = False if data.dtype == np.bool_ else (0 if data.dtype != object else "")
    return data, valid


def logic_values(fn: str, a: Vec, b: Vec) -> Vec:
    """Kleene ``and``/``or``. Every true/false operand is scrubbed (its data is false wherever it is
    missing), so its data is exactly "true" and ``valid ^ data`` exactly "false"."""
    ad, av = a
    bd, bv = b
    if fn == "and":
        true = ad & bd
        return true, true | (av ^ ad) | (bv ^ bd)  # true, or false on either side
    true = ad | bd
    return true, true | (av & bv)  # true on either side, or known on both (then false on both)


def as_float(data: Array) -> npt.NDArray[np.float64]:
    return data.astype(np.float64, copy=False)


def arith_values(fn: str, kind: Kind, a: Vec, a_kind: Kind, b: Vec, b_kind: Kind) -> Vec:
    ad, av = a
    bd, bv = b
    valid = av & bv
    if kind is Kind.INT:
        if fn == "+":
            r = ad + bd
            valid &= ~(((ad ^ r) & (bd ^ r)) < 0)
        elif fn == "-":
            r = ad - bd
            valid &= ~(((ad ^ bd) & (ad ^ r)) < 0)
        elif fn == "*":
            r = ad * bd
            divisor = np.where(ad == 0, 1, ad)
            wrong = (ad != 0) & ((r // divisor != bd) | ((ad == -1) & (bd == INT64_MIN)))
            valid &= ~wrong
        else:  # "%"
            zero = bd == 0
            r = np.remainder(ad, np.where(zero, 1, bd))
            valid &= ~zero
        return scrub(r, valid)
    af, bf = as_float(ad), as_float(bd)
    if fn == "+":
        r = af + bf
    elif fn == "-":
        r = af - bf
    elif fn == "*":
        r = af * bf
    elif fn == "/":
        zero = bf == 0
        r = af / np.where(zero, 1.0, bf)
        valid &= ~zero
        if a_kind is Kind.INT and b_kind is Kind.INT:
            big = valid & ((np.abs(af) > EXACT_FLOAT_INT) | (np.abs(bf) > EXACT_FLOAT_INT))
            for i in np.flatnonzero(big).tolist():
                r[i] = int(ad[i]) / int(bd[i])  # Python's int / int rounds once, exactly
    elif fn == "%":
        zero = bf == 0
        r = np.remainder(af, np.where(zero, 1.0, bf))
        valid &= ~zero
    else:  # "**": C's pow() per element (numpy's vector power may round differently on some CPUs)
        r = np.zeros(af.shape[0])
        for i, (x, y) in enumerate(zip(af.tolist(), bf.tolist(), strict=True)):
            try:
                r[i] = math.pow(x, y)
            except (OverflowError, ValueError):
                valid[i] = False
    valid &= np.isfinite(r)
    return scrub(r, valid)


def _cmp_int_float(i: npt.NDArray[np.int64], f: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    """Sign of ``i - f`` computed exactly (no rounding of ``i`` to a float)."""
    inside = (f >= -(2.0**63)) & (f < 2.0**63)
    floor = np.floor(np.where(inside, f, 0.0))
    whole = floor.astype(np.int64)
    fraction = np.where(inside, f, 0.0) - floor > 0
    sign = np.where(i < whole, -1, np.where(i > whole, 1, np.where(fraction, -1, 0)))
    sign = np.where(inside, sign, np.where(f >= 0, -1, 1))
    return sign.astype(np.int64)


def compare_values(fn: str, a: Vec, a_kind: Kind, b: Vec, b_kind: Kind) -> Vec:
    ad, av = a
    bd, bv = b
    valid = av & bv
    if a_kind is Kind.INT and b_kind is Kind.FLOAT:
        left, right = _cmp_int_float(ad, bd), np.zeros(1, np.int64)
    elif a_kind is Kind.FLOAT and b_kind is Kind.INT:
        left, right = -_cmp_int_float(bd, ad), np.zeros(1, np.int64)
    else:
        left, right = ad, bd
    if fn == "==":
        r = left == right
    elif fn == "!=":
        r = left != right
    elif fn == "<":
        r = left < right
    elif fn == "<=":
        r = left <= right
    elif fn == ">":
        r = left > right
    else:
        r = left >= right
    return scrub(np.asarray(r, np.bool_), valid)


NUMBER_KINDS = (Kind.INT, Kind.FLOAT)
NOT_CONSTANT: Any = object()
#: The validity of a one-element constant operand; read-only (no operation writes into its inputs).
_ONE_VALID = true_flags(1)


def number_constant(op: Op) -> Any:
    """The value of ``op`` when it is a numeric constant (a literal, or ``-`` of one: ``-2.5`` parses
    as ``neg(2.5)``), else ``NOT_CONSTANT``. Exact: an integer negation that would leave 64 bits is
    not folded (the node computes it as missing)."""
    if op.kind not in NUMBER_KINDS:
        return NOT_CONSTANT
    if op.fn == "const":
        return op.value
    if op.fn == "neg":
        inner = number_constant(op.args[0])
        if inner is NOT_CONSTANT or (op.kind is Kind.INT and inner == INT64_MIN):
            return NOT_CONSTANT
        return -inner
    return NOT_CONSTANT


def scalar_vec(value: object, kind: Kind) -> Vec:
    """A constant as a one-element operand (broadcast by numpy against the other operand)."""
    data = np.array([value], DTYPES[kind])
    return data, _ONE_VALID


FLIPPED = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}
_COMPARE_UFUNCS: dict[str, Any] = {
    "==": np.equal,
    "!=": np.not_equal,
    "<": np.less,
    "<=": np.less_equal,
    ">": np.greater,
    ">=": np.greater_equal,
}
_INT64_MAX = 2**63 - 1


def compare_constant(fn: str, a: Vec, a_kind: Kind, constant: object) -> Vec:
    """``a fn constant`` against a scalar (no array of the constant), exactly as :func:`compare_values`.

    An integer compared with a float constant c becomes an integer comparison with a whole bound
    (``i < 2.5`` is ``i < 3``, ``i <= 2.5`` is ``i <= 2``, ``i == 2.5`` is never true); a float compared
    with an integer constant uses the constant as a float when that is exact (|k| <= 2**53).
    """
    data, valid = a
    if a_kind is Kind.FLOAT:
        if type(constant) is int:
            if abs(constant) > EXACT_FLOAT_INT:
                n = data.shape[0]
                return compare_values(fn, a, a_kind, (np.full(n, constant, np.int64), valid), Kind.INT)
            constant = float(constant)
        result = _COMPARE_UFUNCS[fn](data, constant)
        return scrub(result, valid)
    if type(constant) is float:
        whole = math.floor(constant)
        if whole != constant:  # strictly between two integers
            if fn in ("==", "!="):
                return scrub(np.full(data.shape[0], fn == "!="), valid)
            # i < c  <=>  i <= floor(c);  i > c  <=>  i > floor(c)
            fn = {"<": "<=", "<=": "<=", ">": ">", ">=": ">"}[fn]
        constant = whole
    bound = int(constant)  # type: ignore[call-overload]
    if bound > _INT64_MAX or bound < INT64_MIN:  # every int64 is on one side of it
        below = bound > _INT64_MAX  # every value is below the bound
        truth = {"==": False, "!=": True, "<": below, "<=": below, ">": not below, ">=": not below}[fn]
        return scrub(np.full(data.shape[0], truth), valid)
    return scrub(_COMPARE_UFUNCS[fn](data, bound), valid)


def math_values(fn: str, kind: Kind, args: list[tuple[Vec, Kind]]) -> Vec:
    (d, v), arg_kind = args[0]
    if fn == "abs":
        if arg_kind is Kind.INT:
            return scrub(np.abs(d), v & (d != INT64_MIN))
        return np.abs(d), v
    if fn == "sqrt":
        f = as_float(d)
        ok = v & (f >= 0)
        return scrub(np.sqrt(np.where(ok, f, 0.0)), ok)
    if fn in ("floor", "ceil"):
        if arg_kind is Kind.INT:
            return d.copy(), v.copy()
        rounded = np.floor(d) if fn == "floor" else np.ceil(d)
        ok = v & (rounded >= -(2.0**63)) & (rounded < 2.0**63)
        return scrub(np.where(ok, rounded, 0.0).astype(np.int64), ok)
    valid = v.copy()
    for (_, other_v), _ in args[1:]:
        valid &= other_v
    columns = [a[0][0] if kind is Kind.INT else as_float(a[0][0]) for a in args]
    ufunc = np.minimum if fn == "min" else np.maximum
    result = columns[0]
    for column in columns[1:]:
        result = ufunc(result, column)
    return scrub(np.array(result), valid)


class Window:
    """One window of one signal at every evaluation time: ``hv[lo[i]:hi[i]]`` (``ht`` their times),
    with what every window function over it needs, each computed once: the segment index of
    :meth:`segments`, the first and last sample, whether any (``some``) or every (``every``) window
    holds a sample (then results need no scrubbing)."""

    __slots__ = (
        "_ends",
        "_index",
        "_padded",
        "_pads",
        "count",
        "every",
        "hi",
        "ht",
        "hv",
        "lo",
        "some",
        "valid",
    )

    def __init__(
        self, ht: Array, hv: Array, lo: Array, hi: Array, pads: dict[int, tuple[Array, Array]]
    ) -> None:
        self.ht, self.hv, self.lo, self.hi = ht, hv, lo, hi
        self._pads = pads
        self.count = hi - lo
        self.valid: npt.NDArray[np.bool_] = self.count > 0
        self.every = all_true(self.valid)
        self.some = self.every or any_true(self.valid)
        self._index: npt.NDArray[np.intp] | None = None
        self._padded: Array | None = None
        self._ends: tuple[Array, Array] | None = None

    def segments(self, ufunc: Any) -> Array:
        """``ufunc.reduce(hv[lo[i]:hi[i]])`` for every i (empty segments give an arbitrary value)."""
        if self._index is None:
            # windows of every width over one fetched history share its padded copy
            pad = self._pads.get(id(self.hv))
            if pad is None or pad[0] is not self.hv:
                pad = self._pads[id(self.hv)] = (self.hv, np.concatenate([self.hv, self.hv[:1]]))
            self._padded = pad[1]
            index = np.empty(2 * self.lo.shape[0], np.intp)
            index[0::2] = self.lo
            index[1::2] = self.hi
            self._index = index
        return np.asarray(ufunc.reduceat(self._padded, self._index)[0::2])

    def ends(self) -> tuple[Array, Array]:
        """Indices of the first and last sample of each window (clamped into ``hv`` when empty)."""
        if self._ends is None:
            self._ends = (np.minimum(self.lo, self.hv.shape[0] - 1), np.maximum(self.hi - 1, 0))
        return self._ends


_SMALL_INT = 2**31


def average(win: Window, integer: bool) -> Vec:
    values, lo, count, valid = win.hv, win.lo, win.count, win.valid
    safe = count if win.every else np.where(count > 0, count, 1)
    if not integer:
        return win.segments(np.add) / safe, valid
    # Exact integer sums: int64 cannot overflow while every |value| < 2**31 and windows are < 2**32.
    small = values.shape[0] == 0 or int(np.max(np.abs(values.astype(np.float64)))) < _SMALL_INT
    if small:
        sums = win.segments(np.add)
        big = valid & (np.abs(sums) > EXACT_FLOAT_INT)
        result = sums.astype(np.float64) / safe
        for i in np.flatnonzero(big).tolist():
            result[i] = int(sums[i]) / int(count[i])
        return result, valid
    result = np.zeros(lo.shape[0])
    as_list = values.tolist()
    hi = win.hi
    for i in np.flatnonzero(valid).tolist():
        result[i] = sum(as_list[int(lo[i]) : int(hi[i])]) / int(count[i])
    return result, valid
