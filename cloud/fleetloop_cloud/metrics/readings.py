"""Values read when Prometheus scrapes rather than counted as they happen: gauges of state the parts
already hold and running totals the pure cores keep as plain integers. A :class:`Reading` is one such
metric family; whoever keeps the metrics (:class:`Watcher`) calls ``read()`` at each scrape.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

Kind = Literal["gauge", "counter"]
Labels = tuple[str, ...]


@dataclass(frozen=True)
class Reading:
    """One metric family read at scrape time: ``read()`` maps label values to the value."""

    name: str
    help_text: str
    kind: Kind
    labels: Labels
    read: Callable[[], Mapping[Labels, float]]


class Watcher(Protocol):
    """Takes readings to serve at each scrape."""

    def watch(
        self, name: str, help_text: str, kind: Kind, labels: Sequence[str],
        read: Callable[[], Mapping[Labels, float]],
    ) -> None: ...  # fmt: skip
