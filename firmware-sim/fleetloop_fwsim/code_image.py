"""Executable-like images made from a seed alone, and the releases a toolchain makes of them.

Delta sizes depend entirely on the bytes, and the bytes of :func:`fleetloop_fwsim.firmware.build_image`
come from the machine's own binaries, so a size measured on them holds on one machine only. The images
here depend on nothing but their arguments, and change between releases the way linked code does:

- a **program** is functions of instructions (a fixed, skewed vocabulary of opcode byte strings) with
  4-byte operands: relative calls (``target - next instruction``, as x86 ``call rel32``), absolute
  pointers (``base + target offset``), and immediates; plus a data section of pointer tables and strings;
- **linking** lays the functions out from a base address and fills in every operand, so moving,
  inserting or removing one function changes call and pointer bytes all over the image — the scattered
  small differences a real rebuild has;
- **releases** of a program: functions edited, sections reordered, blocks inserted, the program grown
  or shrunk, the base address relocated (:func:`release`).

Used by tests that compare delta sizes and by ``benchmarks/delta.py`` (its 1 GiB generated image).
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, replace

#: Operand kinds of an instruction.
NONE, CALL, POINTER, IMMEDIATE = 0, 1, 2, 3
_VOCABULARY = 256
_WORDS = 400


@dataclass(frozen=True)
class Program:
    """A program before linking: functions (each a tuple of ``(template, kind, argument)``), pointer
    tables (function indices) and strings, to be laid out from ``base``."""

    seed: int
    functions: tuple[tuple[tuple[int, int, int], ...], ...]
    tables: tuple[tuple[int, ...], ...]
    strings: tuple[bytes, ...]
    base: int = 0x400000


def _templates(seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.choice((1, 1, 2, 2, 2, 3, 3, 4, 5, 6))) for _ in range(_VOCABULARY)]


def _vocabulary(seed: int) -> list[bytes]:
    rng = random.Random(seed ^ 0x5EED)
    letters = b"etaoinshrdlucmfwypvbgkqjxz_"
    return [bytes(rng.choice(letters) for _ in range(rng.randint(3, 12))) for _ in range(_WORDS)]


def _function(rng: random.Random, count: int) -> tuple[tuple[int, int, int], ...]:
    ops = []
    for _ in range(rng.randint(8, 240)):
        template = min(int(rng.paretovariate(1.2)) - 1, _VOCABULARY - 1)  # a few opcodes dominate
        roll = rng.random()
        if roll < 0.08:
            ops.append((template, CALL, rng.randrange(count)))
        elif roll < 0.12:
            ops.append((template, POINTER, rng.randrange(count)))
        elif roll < 0.22:
            ops.append((template, IMMEDIATE, rng.choice((0, 1, 8, 16, 0xFF, rng.getrandbits(32)))))
        else:
            ops.append((template, NONE, 0))
    return tuple(ops)


def _strings(rng: random.Random, words: list[bytes], n: int) -> tuple[bytes, ...]:
    return tuple(b" ".join(rng.choice(words) for _ in range(rng.randint(1, 8))) + b"\0" for _ in range(n))


def program(seed: int, size: int) -> Program:
    """A program that links to about ``size`` bytes (about 80 % code, 20 % data)."""
    rng = random.Random(seed)
    count = max(4, size // 400)  # a function links to ~400 bytes on average
    functions = tuple(_function(rng, count) for _ in range(count))
    tables = tuple(
        tuple(rng.randrange(count) for _ in range(rng.randint(4, 64))) for _ in range(count // 20 + 1)
    )
    strings = _strings(rng, _vocabulary(seed), count // 2 + 1)
    return Program(seed, functions, tables, strings)


def link(p: Program) -> bytes:
    """The image of ``p``: its functions, then its tables, then its strings, every operand resolved."""
    templates = _templates(p.seed)
    sizes = [sum(len(templates[t]) + (4 if kind else 0) for t, kind, _ in f) for f in p.functions]
    starts = []
    at = 0
    for n in sizes:
        starts.append(at)
        at += n
    out = bytearray()
    pack = struct.Struct("<I").pack
    for f in p.functions:
        for template, kind, arg in f:
            out += templates[template]
            if kind == CALL:
                out += pack((starts[arg] - (len(out) + 4)) & 0xFFFFFFFF)
            elif kind == POINTER:
                out += pack((p.base + starts[arg]) & 0xFFFFFFFF)
            elif kind == IMMEDIATE:
                out += pack(arg & 0xFFFFFFFF)
    for table in p.tables:
        for target in table:
            out += pack((p.base + starts[target]) & 0xFFFFFFFF)
    for s in p.strings:
        out += s
    return bytes(out)


def _retarget(
    functions: list[tuple[tuple[int, int, int], ...]], mapping: list[int]
) -> list[tuple[tuple[int, int, int], ...]]:
    return [tuple((t, k, mapping[a] if k in (CALL, POINTER) else a) for t, k, a in f) for f in functions]


def release(p: Program, change: str, seed: int, amount: float = 0.4) -> Program:
    """The next release of ``p``, changed the way ``change`` says (``amount``: how much, where it applies):

    - ``"patch"``: 2 % of the functions edited in place (a few instructions each);
    - ``"reorder"``: the functions cut into 8 sections and the sections shuffled;
    - ``"insert"``: new functions inserted at 16 places (``amount`` of the code in all);
    - ``"grow"``: ``amount`` more functions, spread through the program, some called from old code;
    - ``"shrink"``: ``amount`` of the functions removed (their callers retargeted);
    - ``"relocate"``: the base address moved (every absolute pointer changes), plus a patch.
    """
    rng = random.Random(seed)
    functions = list(p.functions)
    count = len(functions)
    if change in ("patch", "relocate"):
        for i in rng.sample(range(count), max(1, count // 50)):
            ops = list(functions[i])
            for _ in range(rng.randint(1, 6)):
                at = rng.randrange(len(ops))
                ops[at : at + rng.randint(0, 2)] = _function(rng, count)[: rng.randint(0, 3)]
            functions[i] = tuple(ops) or functions[i]
        if change == "relocate":
            return replace(p, functions=tuple(functions), base=p.base + 0x10000 * rng.randint(1, 255))
        return replace(p, functions=tuple(functions))
    if change == "reorder":
        cuts = sorted(rng.sample(range(1, count), 7))
        sections = [list(range(a, b)) for a, b in zip([0, *cuts], [*cuts, count], strict=True)]
        rng.shuffle(sections)
        order = [i for s in sections for i in s]
        position = [0] * count
        for new_index, old_index in enumerate(order):
            position[old_index] = new_index
        moved = _retarget([functions[i] for i in order], position)
        tables = tuple(tuple(position[t] for t in table) for table in p.tables)
        return replace(p, functions=tuple(moved), tables=tables)
    if change in ("insert", "grow"):
        added = int(count * amount)
        if change == "insert":
            places = rng.sample(range(count + 1), 16)
            where = [places[k % 16] for k in range(added)]
        else:
            where = [rng.randrange(count + 1) for _ in range(added)]
        before = [0] * (count + 1)
        for w in where:
            before[w] += 1
        slots: list[int | None] = []  # an old function's index, or None for a new one
        for i in range(count + 1):
            slots += [None] * before[i]
            if i < count:
                slots.append(i)
        position = [0] * count
        for index, slot in enumerate(slots):
            if slot is not None:
                position[slot] = index
        total = len(slots)
        fresh = [index for index, slot in enumerate(slots) if slot is None]
        kept = _retarget([functions[slot] if slot is not None else () for slot in slots], position)
        grown = [_function(rng, total) if slot is None else f for slot, f in zip(slots, kept, strict=True)]
        for index in rng.sample(range(total), max(1, total // 40)):  # some old code calls the new
            ops = list(grown[index])
            if ops and fresh:
                ops[rng.randrange(len(ops))] = (rng.randrange(8), CALL, rng.choice(fresh))
            grown[index] = tuple(ops)
        tables = tuple(tuple(position[t] for t in table) for table in p.tables)
        return replace(p, functions=tuple(grown), tables=tables)
    if change == "shrink":
        removed = set(rng.sample(range(count), int(count * amount)))
        survivors = [i for i in range(count) if i not in removed]
        position = [0] * count
        for new_index, old_index in enumerate(survivors):
            position[old_index] = new_index
        for old_index in removed:  # callers of a removed function call a surviving one instead
            position[old_index] = rng.randrange(len(survivors))
        smaller = _retarget([functions[i] for i in survivors], position)
        tables = tuple(tuple(position[t] for t in table) for table in p.tables[: len(p.tables) * 3 // 5 + 1])
        return replace(
            p, functions=tuple(smaller), tables=tables, strings=p.strings[: len(p.strings) * 3 // 5 + 1]
        )
    raise ValueError(f"unknown change {change!r}")


CHANGES = ("patch", "reorder", "insert", "grow", "shrink", "relocate")


def image_pair(change: str, *, size: int = 1 << 20, seed: int = 1) -> tuple[bytes, bytes]:
    """(old image, new image) of one release ``change`` of a program of about ``size`` bytes."""
    p = program(seed, size)
    return link(p), link(release(p, change, seed + 1))
