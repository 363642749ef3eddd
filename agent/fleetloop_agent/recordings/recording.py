"""What every reader returns: groups of signals that share a time column, and what was noticed on the way.

Signals sampled together (a CAN message, a row of a wide CSV, an IMU sample) share their timestamps, and
the store keeps such a group with one time column. A CAN frame says which signals those are; a long CSV
does not, so :func:`detect_groups` groups signals whose sample times are identical.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from fleetloop_shared.catalog import DataType
from fleetloop_shared.errors import ConfigError

_DATA_TYPES = {
    "f": DataType.FLOAT64,
    "i": DataType.INT64,
    "u": DataType.INT64,
    "b": DataType.BOOL,
    "O": DataType.STRING,  # text: an object array of str
}


def data_type_of(values: npt.NDArray[Any], where: str) -> DataType:
    """The catalog datatype of a column as the readers build it."""
    dt = _DATA_TYPES.get(values.dtype.kind)
    if dt is None:
        raise ConfigError(f"{where}: unsupported values {values.dtype}")
    return dt


@dataclass(frozen=True)
class Note:
    """Something a reader noticed that is not an error (a typo that made a signal text, a multiplexed
    signal left out); ``signal`` names the signal it is about, if one."""

    text: str
    signal: str | None = None

    def __str__(self) -> str:
        return self.text


@dataclass
class SignalGroup:
    """One group: a shared time column (ns, non-decreasing) and one value column per signal name."""

    name: str
    t_ns: npt.NDArray[np.int64]
    columns: dict[str, npt.NDArray[Any]]

    @property
    def sample_count(self) -> int:
        return int(self.t_ns.shape[0]) * len(self.columns)


@dataclass
class Recording:
    """Groups read from one input. ``qualified``: a signal's path is ``group/signal`` (CAN messages reuse
    signal names); a CSV's names are already unique and are the paths as they stand. ``frames_skipped``:
    CAN frames no DBC describes or that did not decode (counted, never silently dropped). ``time_unit``:
    the unit the input wrote its times in (``ns`` or coarser), for showing times back as written."""

    groups: list[SignalGroup]
    frames_skipped: int = 0
    notes: list[Note] = field(default_factory=list)
    qualified: bool = True
    time_unit: str = "s"

    @property
    def sample_count(self) -> int:
        return sum(g.sample_count for g in self.groups)

    def path(self, group: SignalGroup, name: str) -> str:
        return f"{group.name}/{name}" if self.qualified else name

    def signals(self) -> Iterator[tuple[str, SignalGroup, npt.NDArray[Any]]]:
        """(path, group, values) of every signal."""
        for g in self.groups:
            for name, values in g.columns.items():
                yield self.path(g, name), g, values


def detect_groups(series: dict[str, tuple[npt.NDArray[np.int64], npt.NDArray[Any]]]) -> list[SignalGroup]:
    """Group signals whose time columns are identical (same length, same values, same order).

    Signals sampled together share their timestamps exactly; anything else (different rates, different
    phases) would need a lossy alignment, so it stays a group of its own. Each group's rows are sorted by
    time (stable, so equal times keep file order): a store reads time ranges.
    """
    by_key: dict[bytes, list[str]] = defaultdict(list)
    for name in sorted(series):
        t, values = series[name]
        order = np.argsort(t, kind="stable")
        series[name] = (t[order], values[order])
        by_key[hashlib.blake2b(series[name][0].tobytes(), digest_size=16).digest()].append(name)
    groups = []
    for names in sorted(by_key.values()):
        t = series[names[0]][0]
        label = names[0] if len(names) == 1 else f"{_common_prefix(names) or names[0]}+{len(names) - 1}"
        groups.append(SignalGroup(label, t, {n: series[n][1] for n in names}))
    return groups


def _common_prefix(names: list[str]) -> str:
    first, last = min(names), max(names)
    i = 0
    while i < min(len(first), len(last)) and first[i] == last[i]:
        i += 1
    return first[:i].rstrip("._/ ")
