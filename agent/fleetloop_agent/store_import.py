"""Turn a recording (read by :mod:`fleetloop_agent.recordings`) into the segments a local store holds.

Operators import recordings into a store to inspect them (``fleetloop store import``); the store
benchmark and the segment tests cut the real corpus through the same function, so what is measured is
what operators get.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy.typing as npt

from fleetloop_agent.recordings import Recording, data_type_of
from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.segment import Segment, new_segment_id

#: Rows per segment when a group is cut into segments (bounded decode memory on the device and cloud).
DEFAULT_SEGMENT_ROWS = 65_536


def to_segments(
    result: Recording, catalog: Catalog, *, rows_per_segment: int = DEFAULT_SEGMENT_ROWS
) -> Iterator[Segment]:
    """Register every signal in ``catalog`` (``group/signal`` paths for a qualified recording) and cut
    groups into segments of at most ``rows_per_segment`` rows."""
    for g in result.groups:
        ids: dict[int, npt.NDArray[Any]] = {}
        types: dict[int, DataType] = {}
        for name, values in g.columns.items():
            path = result.path(g, name)
            spec = catalog.add(path, data_type_of(values, f"group {g.name!r}: signal {name!r}"))
            ids[spec.id] = values
            types[spec.id] = spec.data_type
        rows = int(g.t_ns.shape[0])
        for lo in range(0, max(rows, 1), rows_per_segment):
            hi = min(rows, lo + rows_per_segment)
            yield Segment(
                new_segment_id(), g.name, g.t_ns[lo:hi], {k: v[lo:hi] for k, v in ids.items()}, types
            )
