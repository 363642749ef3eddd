"""Run-time value semantics of the trigger language: missing data, exact numbers, Kleene logic.

Values are ``None`` (missing), ``bool``, ``int`` (exact, never rounded through a float) or ``float``.
Every operation here is total: a missing or ill-typed operand, a division by zero or an overflow gives
``None`` instead of an exception, because a rule running on a device must never take the agent down.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

Value = bool | int | float | str | None

_NUMBER_TYPES = (int, float)


def is_number(value: object) -> bool:
    """True for int and float, false for bool (which is an int subclass in Python) and everything else."""
    return type(value) in _NUMBER_TYPES


def normalize(value: object) -> Value:
    """A signal value as the language sees it: numpy scalars unwrapped, NaN and unknown types → missing."""
    if value is None:
        return None
    kind = type(value)
    if kind is bool or kind is int:
        return value  # type: ignore[return-value]
    if kind is float:
        return None if value != value else value  # type: ignore[return-value]
    if isinstance(value, np.generic):
        return normalize(value.item())
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return normalize(float(value))
    return None


def _clean(result: int | float) -> Value:
    if type(result) is float and result != result:
        return None
    return result


def _divide(a: int | float, b: int | float) -> Value:
    if b == 0:
        return None
    if type(a) is int and type(b) is int:
        # Integers stay integers when the division is exact; otherwise Python's int/int true division,
        # which is correctly rounded even beyond 2**53.
        return a // b if a % b == 0 else a / b
    return _clean(a / b)


def _modulo(a: int | float, b: int | float) -> Value:
    if b == 0:
        return None
    return _clean(a % b)


ARITHMETIC: dict[str, Callable[[Any, Any], Value]] = {
    "+": lambda a, b: _clean(a + b),
    "-": lambda a, b: _clean(a - b),
    "*": lambda a, b: _clean(a * b),
    "/": _divide,
    "%": _modulo,
}

ORDERING: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


def arithmetic(op: str, a: Value, b: Value) -> Value:
    """``a op b`` for numbers; missing for anything else, on division by zero and on overflow."""
    if not (is_number(a) and is_number(b)):
        return None
    try:
        return ARITHMETIC[op](a, b)
    except (OverflowError, ZeroDivisionError):
        return None


def compare(op: str, a: Value, b: Value) -> Value:
    """Exact comparison (Python compares int with float exactly); missing unless the types match."""
    if a is None or b is None:
        return None
    if op in ORDERING:
        if not (is_number(a) and is_number(b)):
            return None
        return ORDERING[op](a, b)
    same_kind = (is_number(a) and is_number(b)) or type(a) is type(b)
    if not same_kind:
        return None
    return (a == b) if op == "==" else (a != b)


def kleene_and(a: Value, b: Value) -> Value:
    if a is False or b is False:
        return False
    if a is True and b is True:
        return True
    return None


def kleene_or(a: Value, b: Value) -> Value:
    if a is True or b is True:
        return True
    if a is False and b is False:
        return False
    return None


def kleene_not(a: Value) -> Value:
    if a is True:
        return False
    if a is False:
        return True
    return None


def negate(a: Value) -> Value:
    return -a if is_number(a) else None  # type: ignore[operator]


def absolute(args: list[Value]) -> Value:
    a = args[0]
    return abs(a) if is_number(a) else None  # type: ignore[arg-type]


def minimum(args: list[Value]) -> Value:
    return min(args) if all(is_number(a) for a in args) else None  # type: ignore[type-var]


def maximum(args: list[Value]) -> Value:
    return max(args) if all(is_number(a) for a in args) else None  # type: ignore[type-var]


# --- windows: each takes the window's values (non-empty, NaN-free, numeric dtype) ---------------------

_SMALL_INT = 2**31


def _exact_sum(values: npt.NDArray[Any]) -> int | float:
    if values.dtype.kind == "f":
        return float(np.sum(values))
    # int64 sums cannot overflow while every |value| < 2**31 and there are fewer than 2**32 of them
    if int(np.max(np.abs(values, dtype=np.float64))) < _SMALL_INT:
        return int(np.sum(values, dtype=np.int64))
    return sum(int(v) for v in values.tolist())


def window_avg(values: npt.NDArray[Any]) -> Value:
    return _divide(_exact_sum(values), int(values.shape[0]))


def window_delta(values: npt.NDArray[Any]) -> Value:
    last, first = values[-1].item(), values[0].item()
    return arithmetic("-", last, first)


def window_min(values: npt.NDArray[Any]) -> Value:
    return normalize(values.min().item())


def window_max(values: npt.NDArray[Any]) -> Value:
    return normalize(values.max().item())


def window_values(values: npt.NDArray[Any]) -> npt.NDArray[Any] | None:
    """The usable part of a window: booleans as 0/1, NaNs dropped; None when nothing usable is left."""
    if values.ndim != 1 or values.shape[0] == 0:
        return None
    kind = values.dtype.kind
    if kind == "b":
        values = values.astype(np.int64)
    elif kind in "iu":
        values = values.astype(np.int64, copy=False)
    elif kind == "f":
        values = values[~np.isnan(values)]
        if values.shape[0] == 0:
            return None
    else:
        return None
    return values
