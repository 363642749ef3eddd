"""Signal catalog: VSS-style path → stable integer id, datatype and unit.

Ids are what segments and the wire carry (a path is written once, in the device's hello). By default
they are assigned in registration order, so the same configuration always yields the same ids; an agent
passes ``assign`` instead, which gives the fleet's ids the cloud assigned, or device-local ones
(:mod:`fleetloop_shared.catalog_ids`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from fleetloop_shared.choices import check_choice
from fleetloop_shared.classification import SignalClass, parse_class
from fleetloop_shared.errors import UserError


class DataType(IntEnum):
    """Datatype of a signal's values; the numbers are the wire's ``DataType`` enum values."""

    FLOAT64 = 1
    INT64 = 2
    BOOL = 3
    #: UTF-8 text; numpy arrays of Python ``str`` (dtype object), so any length and ``""`` are exact.
    STRING = 4

    @property
    def numpy_dtype(self) -> str:
        return _NUMPY_DTYPES[self]


#: Each datatype by the name catalog files and requests give it (any case; shown lowercase).
_BY_NAME: dict[str, DataType] = {t.name.lower(): t for t in DataType}


def data_type_named(value: object, what: str, *, error: Callable[[str], Exception] = UserError) -> DataType:
    """The datatype a catalog entry names (``float64``, ``INT64``...); otherwise ``error`` naming
    ``what`` (the entry and where it is), the datatypes there are and the value given."""
    name = value.lower() if isinstance(value, str) else value
    return _BY_NAME[check_choice(name, tuple(_BY_NAME), what, error=error)]


#: The numpy dtype each datatype's values take (looked up per batch: a table, not a dict built per call).
_NUMPY_DTYPES: dict[DataType, str] = {
    DataType.FLOAT64: "float64",
    DataType.INT64: "int64",
    DataType.BOOL: "bool",
    DataType.STRING: "object",
}


@dataclass(frozen=True)
class SignalSpec:
    """One catalog entry."""

    id: int
    path: str
    data_type: DataType
    unit: str = ""
    #: The signal's class as a catalog file declares it (``class:``); None: the cloud's classification
    #: decides (fleetloop_shared.classification). Devices never send it.
    signal_class: SignalClass | None = None


#: Pattern sets whose matches a catalog remembers.
MATCH_CACHE = 256


class Catalog:
    """The signals one device knows, by path and by id."""

    def __init__(
        self, signals: Iterable[SignalSpec] = (), *, assign: Callable[[str, DataType, str], int] | None = None
    ) -> None:
        #: Gives a new path its id (path, datatype, unit → id); None: registration order.
        self._assign = assign
        self._by_path: dict[str, SignalSpec] = {}
        self._by_id: dict[int, SignalSpec] = {}
        self._matches: dict[tuple[tuple[str, ...], int], list[SignalSpec]] = {}
        for spec in signals:
            self._insert(spec)

    def _insert(self, spec: SignalSpec) -> None:
        if spec.path in self._by_path or spec.id in self._by_id:
            raise UserError(f"signal {spec.path!r} (id {spec.id}) is declared twice in the catalog")
        self._by_path[spec.path] = spec
        self._by_id[spec.id] = spec

    def add(self, path: str, data_type: DataType, unit: str = "") -> SignalSpec:
        """Register ``path`` (idempotent for an identical declaration) and return its entry."""
        existing = self._by_path.get(path)
        if existing is not None:
            if existing.data_type != data_type:
                raise UserError(
                    f"signal {path!r} declared as {existing.data_type.name} and as {data_type.name}"
                )
            return existing
        signal_id = self._assign(path, data_type, unit) if self._assign else len(self._by_id) + 1
        spec = SignalSpec(id=signal_id, path=path, data_type=data_type, unit=unit)
        self._insert(spec)
        return spec

    def by_path(self, path: str) -> SignalSpec:
        try:
            return self._by_path[path]
        except KeyError:
            raise UserError(f"unknown signal {path!r}") from None

    def by_id(self, signal_id: int) -> SignalSpec:
        try:
            return self._by_id[signal_id]
        except KeyError:
            raise UserError(f"unknown signal id {signal_id}") from None

    def get(self, path: str) -> SignalSpec | None:
        return self._by_path.get(path)

    def __contains__(self, path: object) -> bool:
        return path in self._by_path

    def __iter__(self) -> Iterator[SignalSpec]:
        return iter(sorted(self._by_id.values(), key=lambda s: s.id))

    def __len__(self) -> int:
        return len(self._by_id)

    def match(self, patterns: Iterable[str]) -> list[SignalSpec]:
        """Signals whose path matches any glob pattern (``Vehicle.Chassis.*``), in id order.

        Remembered per pattern set until a signal is added (entries are only ever added), since every
        capture asks again for its campaign's patterns; at most :data:`MATCH_CACHE` sets are kept."""
        pats = tuple(patterns)
        key = (pats, len(self._by_id))
        hit = self._matches.get(key)
        if hit is None:
            hit = [s for s in self if any(fnmatch.fnmatchcase(s.path, p) for p in pats)]
            if len(self._matches) >= MATCH_CACHE:
                self._matches.clear()
            self._matches[key] = hit
        return list(hit)

    def to_records(self) -> list[dict[str, Any]]:
        return [
            {"id": s.id, "path": s.path, "data_type": s.data_type.name, "unit": s.unit}
            | ({"class": s.signal_class.value} if s.signal_class is not None else {})
            for s in self
        ]

    @classmethod
    def from_records(cls, records: Iterable[dict[str, Any]]) -> Catalog:
        return cls(
            SignalSpec(int(r["id"]), str(r["path"]), DataType[str(r["data_type"])], str(r.get("unit", "")),
                       parse_class(r["class"], f"signal {r['path']!r}") if r.get("class") else None)
            for r in records
        )
