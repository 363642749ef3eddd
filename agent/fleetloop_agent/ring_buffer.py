"""Bounded in-memory history of every signal: what window functions read and captures are cut from.

One ring per group (the signals that share a timestamp column), numpy-backed, so a capture's pre-window
comes out as the same column layout the store writes. Two bounds apply:

* **horizon** — per group, only the last ``horizon_ns`` of *data* time is kept (measured from the
  group's newest sample). The trigger engine says how much it needs (``required_horizon_ns``).
* **max_bytes** — across all groups; above it the globally oldest samples are dropped (policy
  ``drop-oldest``) and counted in ``dropped_samples_total``, so a burst can never exhaust memory.

``STRING`` signals are ``object`` columns of Python ``str``; the byte budget counts each string sample as
its 8-byte reference (the text is shared with whoever produced it and not counted), and rows dropped
from the front release their strings at once.

Samples older than the newest one already held for their group (a source that went back in time) are
not inserted (policy ``drop-late``) and counted in ``late_samples_total``: windows and captures assume
time order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.errors import ConfigError, MalformedMessageError, UserError
from fleetloop_shared.samples import GroupBatch

_INITIAL_ROWS = 256


def _text_column(values: npt.NDArray[Any], where: str) -> npt.NDArray[Any]:
    """``values`` as an ``object`` array of plain ``str``; refuses anything that is not text."""
    if values.dtype.kind == "U":
        return values.astype(object)  # elements become plain str
    if values.dtype != object:
        raise MalformedMessageError(f"{where} has {values.dtype} values, the catalog declares STRING")
    items = values.tolist()
    if all(type(v) is str for v in items):
        return values
    for v in items:
        if not isinstance(v, str):
            kind = type(v).__name__
            raise MalformedMessageError(f"{where} has a {kind} value, the catalog declares STRING")
    return np.asarray([str(v) for v in items], dtype=object)  # str subclasses (numpy.str_) made plain


class _GroupRing:
    """The live rows ``[start, end)`` of one group's columns; grows by doubling, compacts in place."""

    def __init__(self, group: str, dtypes: dict[int, np.dtype[Any]]) -> None:
        self.group = group
        self.ids = tuple(dtypes)
        self._dtypes = dtypes
        self.row_bytes = 8 + sum(dt.itemsize for dt in dtypes.values())
        self.t: npt.NDArray[np.int64] = np.empty(0, np.int64)
        self.cols: dict[int, npt.NDArray[Any]] = {i: np.empty(0, dt) for i, dt in dtypes.items()}
        self.start = 0
        self.end = 0

    def __len__(self) -> int:
        return self.end - self.start

    @property
    def oldest(self) -> int:
        return int(self.t[self.start])

    @property
    def newest(self) -> int:
        return int(self.t[self.end - 1])

    def append(self, t_ns: npt.NDArray[np.int64], columns: dict[int, npt.NDArray[Any]]) -> None:
        n = int(t_ns.shape[0])
        needed = len(self) + n
        capacity = int(self.t.shape[0])
        if needed > capacity or (capacity > 4 * needed and capacity > _INITIAL_ROWS):
            self._reallocate(max(2 * needed, _INITIAL_ROWS))
        elif self.end + n > capacity:
            self._reallocate(capacity)
        self.t[self.end : self.end + n] = t_ns
        for sid, column in self.cols.items():
            column[self.end : self.end + n] = columns[sid]
        self.end += n

    def _reallocate(self, capacity: int) -> None:
        """Move the live rows to the front of arrays of ``capacity`` rows (new arrays only if it changes)."""
        live = len(self)
        if capacity != self.t.shape[0]:
            new_t = np.empty(capacity, np.int64)
            new_t[:live] = self.t[self.start : self.end]
            self.t = new_t
            for sid in self.ids:
                new_col = np.empty(capacity, self._dtypes[sid])
                new_col[:live] = self.cols[sid][self.start : self.end]
                self.cols[sid] = new_col
        elif self.start:
            self.t[:live] = self.t[self.start : self.end]
            for column in self.cols.values():
                column[:live] = column[self.start : self.end]
        self.start, self.end = 0, live

    def drop_front(self, rows: int) -> None:
        stop = min(self.end, self.start + rows)
        for column in self.cols.values():
            if column.dtype == object:  # let the dropped strings go now, not when the slot is reused
                column[self.start : stop] = None
        self.start = stop
        if self.start == self.end:
            self.start = self.end = 0

    def rows_before(self, t_ns: int) -> int:
        """How many live rows have ``t < t_ns``."""
        return int(np.searchsorted(self.t[self.start : self.end], t_ns, side="left"))

    def bounds(self, from_ns: int, to_ns: int, *, from_inclusive: bool) -> tuple[int, int]:
        live_t = self.t[self.start : self.end]
        lo = int(np.searchsorted(live_t, from_ns, side="left" if from_inclusive else "right"))
        hi = int(np.searchsorted(live_t, to_ns, side="right"))
        return self.start + lo, self.start + max(lo, hi)


@dataclass(frozen=True)
class _Key:
    group: str
    ids: tuple[int, ...]


class RingBuffers:
    """Per-group ring buffers over the catalog's signals; also the :class:`WindowSource` of the rules."""

    def __init__(self, catalog: Catalog, *, horizon_ns: int, max_bytes: int = 64 * 1024 * 1024) -> None:
        if max_bytes <= 0:
            raise ConfigError(f"ring buffer max_bytes must be positive, got {max_bytes}")
        self._catalog = catalog
        self._max_bytes = max_bytes
        self._rings: dict[_Key, _GroupRing] = {}
        self._rings_by_signal: dict[int, list[_GroupRing]] = {}
        self._bytes_used = 0
        self._horizon_ns = 0
        #: Samples dropped by the byte budget (policy drop-oldest), counted as rows × columns.
        self.dropped_samples_total = 0
        #: Samples refused because they were older than their group's newest (policy drop-late).
        self.late_samples_total = 0
        self.set_horizon(horizon_ns)

    @property
    def bytes_used(self) -> int:
        """Bytes of samples held (8 per timestamp plus each value's size); what ``max_bytes`` bounds.

        Allocated arrays may be up to about four times this (they grow by doubling and shrink lazily).
        """
        return self._bytes_used

    @property
    def horizon_ns(self) -> int:
        return self._horizon_ns

    def set_horizon(self, horizon_ns: int) -> None:
        """Keep ``horizon_ns`` of data time per group from now on (trims immediately when it shrinks)."""
        if horizon_ns < 0:
            raise ConfigError(f"ring buffer horizon must not be negative, got {horizon_ns} ns")
        self._horizon_ns = horizon_ns
        for ring in self._rings.values():
            self._trim_horizon(ring)

    # --- writing -----------------------------------------------------------------------------------

    def append(self, batch: GroupBatch) -> None:
        """Add ``batch``; then apply the horizon of its group and the global byte budget."""
        t_ns, columns = self._validated(batch)
        if t_ns.shape[0] == 0 or not columns:
            return
        key = _Key(batch.group, tuple(sorted(columns)))
        ring = self._rings.get(key)
        if ring is None:
            ring = _GroupRing(batch.group, {sid: columns[sid].dtype for sid in key.ids})
            self._rings[key] = ring
            for sid in key.ids:
                self._rings_by_signal.setdefault(sid, []).append(ring)
        width = len(key.ids)
        first = 0
        if len(ring) and t_ns[0] < (newest := ring.newest):  # rows before what the ring holds: late
            first = int(np.searchsorted(t_ns, newest, side="left"))
            self.late_samples_total += first * width
        budget_rows = self._max_bytes // ring.row_bytes
        if t_ns.shape[0] - first > budget_rows:
            skipped = t_ns.shape[0] - first - budget_rows
            self.dropped_samples_total += skipped * width
            first += skipped
        if first >= t_ns.shape[0]:
            return
        ring.append(t_ns[first:], {sid: column[first:] for sid, column in columns.items()})
        self._bytes_used += (t_ns.shape[0] - first) * ring.row_bytes
        self._trim_horizon(ring)
        self._enforce_budget()

    def _validated(self, batch: GroupBatch) -> tuple[npt.NDArray[np.int64], dict[int, npt.NDArray[Any]]]:
        """The batch's arrays in catalog dtypes; refuses inconsistent batches with what is wrong."""
        where = f"batch of group {batch.group!r}"
        t_ns = np.asarray(batch.t_ns)
        if t_ns.ndim != 1 or t_ns.dtype.kind not in "iu":
            raise MalformedMessageError(f"{where}: timestamps must be a 1-D integer array")
        t_ns = t_ns.astype(np.int64, copy=False)
        n = t_ns.shape[0]
        if n > 1 and bool(np.any(t_ns[1:] < t_ns[:-1])):
            raise MalformedMessageError(f"{where}: timestamps go backwards")
        columns: dict[int, npt.NDArray[Any]] = {}
        for sid, raw in batch.values.items():
            try:
                spec = self._catalog.by_id(sid)
            except UserError:
                raise UserError(f"{where}: signal id {sid} is not in the catalog") from None
            values = np.asarray(raw)
            if values.ndim != 1 or values.shape[0] != n:
                raise MalformedMessageError(
                    f"{where}: signal {spec.path!r} has shape {values.shape}, timestamps have {n} rows"
                )
            if spec.data_type is DataType.STRING:
                columns[sid] = _text_column(values, f"{where}: signal {spec.path!r}")
                continue
            try:
                columns[sid] = values.astype(spec.data_type.numpy_dtype, casting="same_kind", copy=False)
            except TypeError:
                raise MalformedMessageError(
                    f"{where}: signal {spec.path!r} has {values.dtype} values, "
                    f"the catalog declares {spec.data_type.name}"
                ) from None
        return t_ns, columns

    def _trim_horizon(self, ring: _GroupRing) -> None:
        if not len(ring):
            return
        cut = ring.newest - self._horizon_ns
        if ring.oldest >= cut:  # the common case: nothing aged out yet (two reads, no search)
            return
        rows = ring.rows_before(cut)
        if rows:
            ring.drop_front(rows)
            self._bytes_used -= rows * ring.row_bytes

    def _enforce_budget(self) -> None:
        """Drop the globally oldest rows until the held bytes fit ``max_bytes`` (policy drop-oldest).

        Finds, by bisection over data time, the earliest cut ``T`` such that dropping every row with
        ``t < T`` frees enough; rows sharing the last dropped timestamp go together.
        """
        excess = self._bytes_used - self._max_bytes
        if excess <= 0:
            return
        live = [ring for ring in self._rings.values() if len(ring)]

        def freed(cut: int) -> int:
            return sum(ring.rows_before(cut) * ring.row_bytes for ring in live)

        lo = min(ring.oldest for ring in live)
        hi = max(ring.newest for ring in live) + 1
        while lo < hi:
            mid = (lo + hi) // 2
            if freed(mid) >= excess:
                hi = mid
            else:
                lo = mid + 1
        for ring in live:
            rows = ring.rows_before(lo)
            if rows:
                ring.drop_front(rows)
                self._bytes_used -= rows * ring.row_bytes
                self.dropped_samples_total += rows * len(ring.ids)

    # --- reading -----------------------------------------------------------------------------------

    def window(self, signal_ids: set[int], from_ns: int, to_ns: int) -> list[GroupBatch]:
        """Copies of the samples with ``from_ns <= t <= to_ns`` of ``signal_ids``, one batch per group
        that has any of them (only those columns; groups without samples in the range are left out)."""
        out: list[GroupBatch] = []
        for key, ring in self._rings.items():
            wanted = [sid for sid in key.ids if sid in signal_ids]
            if not wanted or not len(ring):
                continue
            lo, hi = ring.bounds(from_ns, to_ns, from_inclusive=True)
            if hi <= lo:
                continue
            out.append(
                GroupBatch(
                    key.group, ring.t[lo:hi].copy(), {sid: ring.cols[sid][lo:hi].copy() for sid in wanted}
                )
            )
        return out

    def samples(
        self, path: str, from_ns_exclusive: int, to_ns_inclusive: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.generic]]:
        """``(t_ns, values)`` of ``path`` with ``from < t <= to`` in time order (read-only views, valid
        until the next ``append``); empty arrays for a signal without samples or not in the catalog."""
        spec = self._catalog.get(path)
        if spec is None:
            return np.empty(0, np.int64), np.empty(0, np.float64)
        parts: list[tuple[npt.NDArray[np.int64], npt.NDArray[Any]]] = []
        for ring in self._rings_by_signal.get(spec.id, []):
            if not len(ring):
                continue
            lo, hi = ring.bounds(from_ns_exclusive, to_ns_inclusive, from_inclusive=False)
            if hi > lo:
                parts.append((ring.t[lo:hi], ring.cols[spec.id][lo:hi]))
        if not parts:
            return np.empty(0, np.int64), np.empty(0, spec.data_type.numpy_dtype)
        if len(parts) == 1:
            t_view, v_view = parts[0]
            t_view = t_view.view()
            v_view = v_view.view()
            t_view.flags.writeable = False
            v_view.flags.writeable = False
            return t_view, v_view
        t_all = np.concatenate([t for t, _ in parts])
        v_all = np.concatenate([v for _, v in parts])
        order = np.argsort(t_all, kind="stable")
        return t_all[order], v_all[order]
