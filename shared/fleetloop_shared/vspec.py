"""A reader of COVESA VSS ``.vspec`` files: the signals of a vehicle signal specification as catalog
entries (path, datatype, unit), every mistake named with FILE:LINE:COL.

A vspec is YAML whose keys are dotted paths relative to where the file is included; ``#include FILE
[PREFIX]`` lines (YAML comments to a YAML parser) pull other files in under ``PREFIX``. Branches have
``type: branch``; signals are ``sensor``, ``actuator`` or ``attribute`` with a ``datatype``. Struct
types, ``property`` nodes and arrays have no catalog equivalent and are refused, saying where.

vss-tools is the reference implementation; it is not used here because it needs the specification's own
unit and quantity files to read anything and rejects units outside them, and brings twenty packages with
it. This reader checks what a catalog needs and nothing else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import yaml

from fleetloop_shared.catalog import DataType
from fleetloop_shared.choices import check_choice
from fleetloop_shared.errors import ConfigError

#: VSS datatypes → the catalog's.
DATATYPES: Final = {
    "boolean": DataType.BOOL,
    "string": DataType.STRING,
    "float": DataType.FLOAT64,
    "double": DataType.FLOAT64,
    **{f"{sign}int{bits}": DataType.INT64 for sign in ("", "u") for bits in (8, 16, 32, 64)},
}
SIGNAL_TYPES: Final = ("sensor", "actuator", "attribute")
#: What a refusal shows for a key the file leaves out (never a valid type or datatype).
MISSING: Final = "(missing)"
_KEYS: Final = frozenset(
    {"type", "datatype", "unit", "description", "comment", "min", "max", "allowed", "default", "deprecation"}
    | {"arraysize", "pattern", "delete", "instances", "aggregate", "fka", "const", "$file_name$"}
)
_INCLUDE: Final = re.compile(r"^#include\s+(\S+)(?:\s+(\S+))?\s*$")
#: Includes nested deeper than this are a loop.
MAX_DEPTH: Final = 16


@dataclass(frozen=True)
class VssSignal:
    """One signal of the specification."""

    path: str
    data_type: DataType
    unit: str
    kind: str
    description: str
    #: FILE:LINE:COL of its definition.
    where: str


def _where(path: Path, mark: yaml.Mark) -> str:
    return f"{path}:{mark.line + 1}:{mark.column + 1}"


def read_vspec(path: Path) -> list[VssSignal]:
    """The signals of the vspec at ``path`` (and the files it includes), in file order."""
    out: dict[str, VssSignal] = {}
    _read(Path(path), "", out, 0, None)
    return list(out.values())


def _read(path: Path, prefix: str, out: dict[str, VssSignal], depth: int, included_at: str | None) -> None:
    if depth > MAX_DEPTH:
        raise ConfigError(f"{included_at}: includes nested deeper than {MAX_DEPTH} (a loop?)")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{included_at + ': ' if included_at else ''}{path}: no such vspec file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    # includes first, where they stand relative to the definitions does not change the tree
    for number, line in enumerate(text.splitlines(), 1):
        match = _INCLUDE.match(line.strip())
        if match:
            child_prefix = ".".join(p for p in (prefix, match.group(2) or "") if p)
            _read(path.parent / match.group(1), child_prefix, out, depth + 1, f"{path}:{number}:1")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = _where(path, mark) if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML: {exc.problem}") from None
    if node is None:
        return
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{_where(path, node.start_mark)}: a vspec is a mapping of path: node")
    for key_node, value_node in node.value:
        _node(path, prefix, key_node, value_node, out)


def _node(path: Path, prefix: str, key_node: yaml.Node, value: yaml.Node, out: dict[str, VssSignal]) -> None:
    name = str(key_node.value)
    at = _where(path, key_node.start_mark)
    full = ".".join(p for p in (prefix, name) if p)
    if not isinstance(value, yaml.MappingNode):
        raise ConfigError(f"{at}: {full}: expected a mapping of type, datatype, unit, ...")
    fields: dict[str, tuple[str, str]] = {}
    for k, v in value.value:
        key = str(k.value)
        if key not in _KEYS:
            raise ConfigError(f"{_where(path, k.start_mark)}: {full}: unknown key {key!r}")
        text = str(v.value) if isinstance(v, yaml.ScalarNode) else ""
        fields[key] = (text, _where(path, v.start_mark))
    kind, kind_at = fields.get("type", ("", at))
    if kind == "branch":
        return
    hint = " (struct types have no catalog equivalent)" if kind in ("struct", "property") else ""
    check_choice(
        kind or MISSING,
        ("branch", *SIGNAL_TYPES),
        f"{kind_at}: {full}: type",
        error=lambda m: ConfigError(m + hint),
    )
    datatype, datatype_at = fields.get("datatype", ("", at))
    if datatype.endswith("[]"):
        raise ConfigError(f"{datatype_at}: {full}: array datatype {datatype!r} has no catalog equivalent")
    check_choice(datatype or MISSING, DATATYPES, f"{datatype_at}: {full}: datatype")
    if full in out:
        raise ConfigError(f"{at}: {full}: defined twice (first at {out[full].where})")
    description = fields.get("description", ("", ""))[0]
    out[full] = VssSignal(full, DATATYPES[datatype], fields.get("unit", ("", ""))[0], kind, description, at)
