"""Enumerated settings: one test and one wording for "this value must be one of those".

A network, a log level, a register type, a device kind: every reader of configuration or command
arguments refuses a value outside its fixed set, and every refusal names the setting, the values it
takes and the value given, in the same words wherever it is raised. The error class stays the
caller's (a ConfigError from a configuration file, a UserError from a request, a reader's own error
that adds FILE:LINE:COL), so only the test and the words live here.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import TypeVar

from fleetloop_shared.errors import ConfigError

T = TypeVar("T")


def choice_problem(value: object, choices: Collection[object]) -> str | None:
    """None when ``value`` is one of ``choices``; otherwise what is wrong with it, for a reader that
    frames its own errors (``must be one of a, b, got 'c'``). A value read from YAML or JSON may be
    of any type: it matches only a choice of its own kind (``true`` is not 1, ``4.0`` is not 4) and
    a list or a mapping is simply not a choice."""
    if any(_same(value, choice) for choice in choices):
        return None
    return f"must be one of {', '.join(map(str, choices))}, got {value!r}"


def check_choice(
    value: T, choices: Collection[T], what: str, *, error: Callable[[str], Exception] = ConfigError
) -> T:
    """``value`` when it is one of ``choices``; otherwise ``error`` naming ``what`` (the setting, with
    where it was written when the caller knows), the values it takes and the value given."""
    problem = choice_problem(value, choices)
    if problem is not None:
        raise error(f"{what} {problem}")
    return value


def _same(value: object, choice: object) -> bool:
    """``value`` is ``choice``: equal, and of its kind (a str subclass such as an enum's value counts)."""
    if isinstance(value, bool) != isinstance(choice, bool):
        return False
    return (isinstance(value, type(choice)) or isinstance(choice, type(value))) and value == choice
