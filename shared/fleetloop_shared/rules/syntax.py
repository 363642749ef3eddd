"""Syntax tree of the trigger language.

Every node remembers the offset of its first character (binary operators also the operator's), so the
type checker can point at the exact character that is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Number:
    value: int | float
    offset: int


@dataclass(frozen=True, slots=True)
class Boolean:
    value: bool
    offset: int


@dataclass(frozen=True, slots=True)
class String:
    value: str
    offset: int


@dataclass(frozen=True, slots=True)
class Duration:
    ns: int
    text: str
    offset: int


@dataclass(frozen=True, slots=True)
class Signal:
    path: str
    offset: int


@dataclass(frozen=True, slots=True)
class Unary:
    op: str  # "-" | "not"
    operand: Node
    offset: int


@dataclass(frozen=True, slots=True)
class Binary:
    op: str  # arithmetic, comparison, "and", "or"
    left: Node
    right: Node
    offset: int
    op_offset: int


@dataclass(frozen=True, slots=True)
class Call:
    name: str
    args: tuple[Node, ...]
    offset: int


Node = Number | Boolean | String | Duration | Signal | Unary | Binary | Call
