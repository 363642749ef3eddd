"""Enumerated settings: one test and one wording for "this value must be one of those".

A network, a log level, a register type, a device kind: every reader of configuration or command
arguments refuses a value outside its fixed set, and every refusal names the setting, the values it
takes and the value given, in the same words wherever it is raised. The error class stays the
caller's (a ConfigError from a configuration file, a UserError from a request, a reader's own error
that adds FILE:LINE:COL), so only the test and the words live here.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Final, TypeVar

from fleetloop_shared.errors import ConfigError

T = TypeVar("T")

#: Most characters of the refused value a message repeats (its ``repr``, cut with ``...``).
MAX_SHOWN: Final = 60


def _refusal(value: object, choices: Collection[object]) -> str:
    """``must be one of a, b, got 'c'``, the value's ``repr`` cut to :data:`MAX_SHOWN` characters."""
    shown = repr(value)
    if len(shown) > MAX_SHOWN:  # a request body's value: the refusal stays one readable line
        shown = shown[: MAX_SHOWN - 3] + "..."
    return f"must be one of {', '.join(map(str, choices))}, got {shown}"


def check_choice(
    value: object, choices: Collection[T], what: str = "", *, error: Callable[[str], Exception] = ConfigError
) -> T:
    """The choice ``value`` is (typed as the choices are, whatever a YAML or JSON reader made of it);
    otherwise ``error`` naming ``what`` (the setting, with where it was written when the caller
    knows), the values it takes and the value given. Without ``what`` the message starts at ``must
    be``: for an ``error`` that names the setting itself."""
    for choice in choices:  # a value read from YAML or JSON may be of any type: see _same
        if _same(value, choice):
            return choice
    problem = _refusal(value, choices)
    raise error(f"{what} {problem}" if what else problem)


def _same(value: object, choice: object) -> bool:
    """``value`` is ``choice``: equal, and of its kind (``true`` is not 1, ``4.0`` is not 4; a str
    subclass such as an enum's value counts), so a list or a mapping is simply no choice."""
    if isinstance(value, bool) != isinstance(choice, bool):
        return False
    return (isinstance(value, type(choice)) or isinstance(choice, type(value))) and value == choice
