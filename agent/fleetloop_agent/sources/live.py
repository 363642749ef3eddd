"""What every live source shares: the device clock it stamps with, the bounded hand-off from its I/O
thread to :meth:`read`, reconnect backoff, poll schedules and the counters the agent exports.

A live source (a Modbus poller, an OPC UA subscription, an MQTT subscriber, the local push API) does its
I/O on a thread it owns; the agent's main loop only calls :meth:`LiveSource.read`, which drains a
:class:`SampleQueue`. The queue is bounded in *samples* (rows × signals) with a named overflow policy:

* **drop-oldest** (pollers and subscriptions): a main loop that stalls loses the oldest samples, counted
  in ``dropped``, never memory;
* **refuse-newest** (the push API): the publisher is told ``RESOURCE_EXHAUSTED`` and keeps its data.

Samples are stamped by a :class:`DeviceClock` passed in, so the clock the agent measures against the
cloud can replace the system clock without touching a source.
"""

from __future__ import annotations

import enum
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Final, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from fleetloop_shared.can_batch import CLASSIC_WIDTH, FrameBatch
from fleetloop_shared.catalog import Catalog
from fleetloop_shared.errors import FleetloopError, StateError
from fleetloop_shared.samples import GroupBatch

log = logging.getLogger("fleetloop.agent.sources")

#: Origin of samples read from a machine's own buses and servers (not a recording, not generated).
LIVE_ORIGIN: Final = "live"
#: Default bound of a live source's hand-off queue, in samples (rows × signals).
DEFAULT_QUEUE_SAMPLES: Final = 1_000_000
NS_PER_S: Final = 1_000_000_000
#: Default capacity of a CAN source's receive queue (frames): ~10 s of a busy 500 kbit/s bus.
DEFAULT_QUEUE_FRAMES: Final = 65_536


class DeviceClock(Protocol):
    """The device's notion of now, in ns since the Unix epoch; every live sample is stamped with it."""

    def now_ns(self) -> int: ...


class SystemClock:
    """The machine's realtime clock (what the device clock is until it is disciplined)."""

    def now_ns(self) -> int:
        return time.time_ns()


@runtime_checkable
class Closable(Protocol):
    """A source that owns threads or sockets and must let go of them when the agent stops."""

    def close(self) -> None: ...


@dataclass
class SourceCounters:
    """Running totals of one source, mirrored into Prometheus by the agent (``fleetloop_agent_source_*``).

    ``samples``: samples handed to the agent. ``errors``: faults (a refused request, malformed input,
    a lost connection). ``missed_polls``: polls that did not happen or failed. ``reconnects``:
    connections re-established after a loss. ``dropped``: samples lost to the overflow policy or refused.
    """

    samples: int = 0
    errors: int = 0
    missed_polls: int = 0
    reconnects: int = 0
    dropped: int = 0

    def totals(self) -> dict[str, int]:
        return {f.name: int(getattr(self, f.name)) for f in fields(self)}


def source_totals(source: object) -> Mapping[str, int] | None:
    """A source's running totals for the agent's metrics: a :class:`SourceCounters` attribute
    ``counters``, or a ``counters()`` method that adds what the source keeps elsewhere (a queue's drops,
    a decoder's errors); None for a source that keeps none (a replay)."""
    counters = getattr(source, "counters", None)
    if isinstance(counters, SourceCounters):
        return counters.totals()
    if callable(counters):
        totals: Mapping[str, int] = counters()
        return totals
    return None


class Backoff:
    """Exponential reconnect delays with jitter: ``initial_s`` doubling up to ``max_s``, each delay
    spread by ±``jitter`` so a fleet that lost one server does not come back in lockstep."""

    def __init__(
        self,
        initial_s: float = 0.2,
        max_s: float = 30.0,
        *,
        factor: float = 2.0,
        jitter: float = 0.2,
        rng: random.Random | None = None,
    ) -> None:
        if initial_s <= 0 or max_s < initial_s or factor < 1 or not 0 <= jitter < 1:
            raise ValueError("backoff: need 0 < initial <= max, factor >= 1, 0 <= jitter < 1")
        self.initial_s = initial_s
        self.max_s = max_s
        self.factor = factor
        self.jitter = jitter
        self._rng = rng or random.Random()
        self.attempts = 0

    def next_delay(self) -> float:
        base = min(self.max_s, self.initial_s * self.factor**self.attempts)
        self.attempts += 1
        return base * (1.0 + self.jitter * (2.0 * self._rng.random() - 1.0))

    def reset(self) -> None:
        self.attempts = 0


class PollSchedule:
    """When the next poll of one group is due, and how many were missed (pure; monotonic ns passed in).

    Polls are due at ``first + k × interval``. A poll that ends after later due times (a slow server, a
    lost connection) makes those polls missed: they are counted, not made up for in a burst.
    """

    def __init__(self, interval_ns: int, first_ns: int) -> None:
        if interval_ns <= 0:
            raise ValueError("poll interval must be positive")
        self.interval_ns = int(interval_ns)
        self.due_ns = int(first_ns)

    def is_due(self, now_ns: int) -> bool:
        return now_ns >= self.due_ns

    def advance(self, now_ns: int) -> int:
        """Move past the poll just made (or given up) at ``now_ns``; return the due times skipped."""
        late = max(0, now_ns - self.due_ns)
        skipped = late // self.interval_ns
        self.due_ns += (skipped + 1) * self.interval_ns
        return int(skipped)


class OverflowPolicy(enum.Enum):
    """What a full :class:`SampleQueue` does with more samples."""

    DROP_OLDEST = "drop-oldest"
    REFUSE_NEWEST = "refuse-newest"


@dataclass
class _Chunk:
    """Rows of one group (one column set): times and one column per signal id, lists or arrays."""

    group: str
    ids: tuple[int, ...]
    t_ns: Sequence[int] | npt.NDArray[np.int64]
    columns: Sequence[Sequence[Any] | npt.NDArray[Any]]

    @property
    def samples(self) -> int:
        return len(self.t_ns) * len(self.ids)


class SampleQueue:
    """The bounded, thread-safe hand-off from a source's I/O thread to the agent's main loop."""

    def __init__(self, capacity: int, policy: OverflowPolicy, counters: SourceCounters) -> None:
        if capacity <= 0:
            raise ValueError("queue capacity must be positive")
        self.capacity = int(capacity)
        self.policy = policy
        self._counters = counters
        self._lock = threading.Lock()
        self._chunks: deque[_Chunk] = deque()
        self._size = 0
        #: dtype of each signal id (set by the source when it declares its signals)
        self.dtypes: dict[int, str] = {}

    def __len__(self) -> int:
        """Samples waiting."""
        return self._size

    def put(
        self,
        group: str,
        ids: tuple[int, ...],
        t_ns: Sequence[int] | npt.NDArray[np.int64],
        columns: Sequence[Sequence[Any] | npt.NDArray[Any]],
    ) -> bool:
        """Queue rows of one group; False (and counted as dropped) when the policy refuses them."""
        return self.put_all([(group, ids, t_ns, columns)])

    def put_all(
        self,
        chunks: Sequence[
            tuple[
                str,
                tuple[int, ...],
                Sequence[int] | npt.NDArray[np.int64],
                Sequence[Sequence[Any] | npt.NDArray[Any]],
            ]
        ],
    ) -> bool:
        """Queue several chunks all or none (one publisher's request); False when the policy refuses."""
        parts = [_Chunk(*c) for c in chunks]
        n = sum(p.samples for p in parts)
        with self._lock:
            if n > self.capacity or (
                self.policy is OverflowPolicy.REFUSE_NEWEST and self._size + n > self.capacity
            ):
                self._counters.dropped += n
                return False
            while self._size + n > self.capacity:
                old = self._chunks.popleft()
                self._size -= old.samples
                self._counters.dropped += old.samples
            self._chunks.extend(p for p in parts if p.samples)
            self._size += n
            self._counters.samples += n
        return True

    def room(self) -> int:
        """Samples that can be queued now without the overflow policy acting."""
        return self.capacity - self._size

    def take(self, until_ns: int) -> list[GroupBatch]:
        """Every queued row with time ``<= until_ns``, one batch per group and column set, time-sorted;
        later rows stay queued."""
        with self._lock:
            chunks = list(self._chunks)
            self._chunks.clear()
            self._size = 0
        if not chunks:
            return []
        by_key: dict[tuple[str, tuple[int, ...]], list[_Chunk]] = {}
        for c in chunks:
            by_key.setdefault((c.group, c.ids), []).append(c)
        out: list[GroupBatch] = []
        keep: list[_Chunk] = []
        for (group, ids), parts in by_key.items():
            t_ns, columns = self._join(ids, parts)
            if t_ns.shape[0] > 1 and bool(np.any(t_ns[1:] < t_ns[:-1])):
                order = np.argsort(t_ns, kind="stable")
                t_ns = t_ns[order]
                columns = [c[order] for c in columns]
            k = int(np.searchsorted(t_ns, until_ns, side="right"))
            if k:
                out.append(
                    GroupBatch(group, t_ns[:k], {sid: col[:k] for sid, col in zip(ids, columns, strict=True)})
                )
            if k < t_ns.shape[0]:
                keep.append(_Chunk(group, ids, t_ns[k:], [col[k:] for col in columns]))
        if keep:
            with self._lock:
                for c in reversed(keep):
                    self._chunks.appendleft(c)
                    self._size += c.samples
        return out

    def _join(
        self, ids: tuple[int, ...], parts: list[_Chunk]
    ) -> tuple[npt.NDArray[np.int64], list[npt.NDArray[Any]]]:
        if all(not isinstance(p.t_ns, np.ndarray) for p in parts):
            # rows queued one poll at a time: one conversion per column, not one per poll
            t_list: list[int] = []
            col_lists: list[list[Any]] = [[] for _ in ids]
            for p in parts:
                t_list.extend(p.t_ns)
                for acc, col in zip(col_lists, p.columns, strict=True):
                    acc.extend(col)
            t_ns = np.asarray(t_list, dtype=np.int64)
            return t_ns, [self._array(sid, c) for sid, c in zip(ids, col_lists, strict=True)]
        t_ns = np.concatenate([np.asarray(p.t_ns, dtype=np.int64) for p in parts])
        cols = [
            np.concatenate([self._array(sid, p.columns[i]) for p in parts])
            if len(parts) > 1
            else self._array(sid, parts[0].columns[i])
            for i, sid in enumerate(ids)
        ]
        return t_ns, cols

    def _array(self, sid: int, values: Sequence[Any] | npt.NDArray[Any]) -> npt.NDArray[Any]:
        dtype = self.dtypes.get(sid, "float64")
        if dtype == "object":
            arr = np.empty(len(values), dtype=object)
            arr[:] = list(values)
            return arr
        return np.asarray(values, dtype=dtype)


class ErrorLog:
    """Logs a source's recurring faults without flooding: each distinct fault once, then at most once
    per ``every_s`` with how many occurred meanwhile (pure apart from the logger; now passed in)."""

    def __init__(self, source: str, every_s: float = 30.0) -> None:
        self.source = source
        self.every_ns = int(every_s * NS_PER_S)
        self._last: dict[str, tuple[int, int]] = {}

    def error(self, key: str, message: str, now_ns: int) -> None:
        last = self._last.get(key)
        if last is None or now_ns - last[0] >= self.every_ns:
            extra = f" ({last[1]} more since last reported)" if last and last[1] else ""
            log.warning("source %s: %s%s", self.source, message, extra)
            self._last[key] = (now_ns, 0)
        else:
            self._last[key] = (last[0], last[1] + 1)


class LiveSource:
    """Base of the sources fed by an I/O thread they own; :meth:`read` only drains the queue.

    The thread starts at the first :meth:`read` (or :meth:`start`), so building and declaring a source
    (config validation) opens no socket; :meth:`close` stops it. A subclass implements
    :meth:`_declare` and :meth:`_run` (which returns when :attr:`_stop` is set).
    """

    def __init__(
        self,
        name: str,
        *,
        clock: DeviceClock | None = None,
        queue_samples: int = DEFAULT_QUEUE_SAMPLES,
        policy: OverflowPolicy = OverflowPolicy.DROP_OLDEST,
        origin: str = LIVE_ORIGIN,
    ) -> None:
        self.name = name
        self.origin = origin
        self.clock: DeviceClock = clock if clock is not None else SystemClock()
        self.counters = SourceCounters()
        self.queue = SampleQueue(queue_samples, policy, self.counters)
        self.errors = ErrorLog(name)
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed: str | None = None
        self._declared = False

    # -- the SignalSource interface ----------------------------------------------------------------
    def declare(self, catalog: Catalog) -> None:
        self._declare(catalog)
        self._declared = True

    def read(self, until_ns: int) -> list[GroupBatch]:
        if not self._declared:
            raise StateError(f"source {self.name!r}: read() before declare()")
        self.start()
        return self.queue.take(int(until_ns))

    def alive(self) -> bool:
        return self._failed is None

    @property
    def failure(self) -> str | None:
        """Why the source stopped for good, if it did."""
        return self._failed

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the I/O thread (once; later calls do nothing)."""
        if self._thread is not None or self._stop.is_set():
            return
        if not self._declared:
            raise StateError(f"source {self.name!r}: start() before declare()")
        self._thread = threading.Thread(target=self._guarded, name=f"source-{self.name}", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the I/O thread and let go of its connections."""
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _guarded(self) -> None:
        try:
            self._run()
        except FleetloopError as exc:  # a mistake the message explains (a path that is not a socket)
            log.error("source %s stopped: %s", self.name, exc)
            self._failed = str(exc)
        except Exception as exc:  # a bug or a library fault: the source stops, the agent goes on
            log.exception("source %s stopped", self.name)
            self._failed = f"{type(exc).__name__}: {exc}"

    # -- for subclasses ------------------------------------------------------------------------------
    def _declare(self, catalog: Catalog) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        raise NotImplementedError

    def _wake(self) -> None:
        """Interrupt a blocking wait of the I/O thread so it sees :attr:`_stop` (override if needed)."""

    def _error(self, key: str, message: str) -> None:
        """Count one fault and log it (rate-limited per ``key``)."""
        self.counters.errors += 1
        self.last_error = message
        self.errors.error(key, message, time.monotonic_ns())


class ConnectionSource:
    """Base of a source that keeps one connection (a CAN bus, an OBD link) on an I/O thread it owns:
    the thread starts once (:meth:`start`, or the first ``read``), :attr:`_connected` is set while the
    connection is up, :attr:`_down` while it is lost and being reopened, and :meth:`close` sets
    :attr:`_stop` and joins the thread (at most ``join_s``)."""

    def __init__(self, thread_name: str, target: Callable[[], None], *, join_s: float) -> None:
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._down = False
        self._thread_name = thread_name
        self._target = target
        self._join_s = join_s
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the I/O thread (once; later calls do nothing)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._target, name=self._thread_name, daemon=True)
            self._thread.start()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def close(self) -> None:
        """Stop the I/O thread and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._join_s)

    def alive(self) -> bool:
        """False while the connection is down (the source keeps trying to reopen it)."""
        return not self._down


class FrameQueue:
    """Frames handed from a receive thread to ``read()``: bounded, drop-oldest, counted.

    ``put`` is what the receive thread calls per frame (``put_many`` per burst), so it does the least
    possible: appends to three lists under a lock, no tuple per frame. The oldest frames beyond
    ``capacity`` are dropped in bulk once a quarter more has piled up, and always before a drain, so
    ``dropped_total`` and what ``drain`` returns are exactly those of a drop-oldest queue of
    ``capacity``; memory is bounded by 1.25 × ``capacity`` frames. ``drain`` turns everything queued
    into one :class:`FrameBatch`.
    """

    def __init__(self, capacity: int = DEFAULT_QUEUE_FRAMES, width: int = CLASSIC_WIDTH) -> None:
        if capacity < 1:
            raise ValueError("queue capacity must be at least 1 frame")
        self.capacity = capacity
        self.width = width
        self._limit = capacity + max(1, capacity // 4)
        self._t: list[int] = []
        self._ids: list[int] = []
        self._data: list[bytes] = []
        self._lock = threading.Lock()
        self._dropped = 0

    @property
    def dropped_total(self) -> int:
        """Frames dropped because the queue was full (oldest first)."""
        return self._dropped + max(0, len(self._t) - self.capacity)

    def put(self, t_ns: int, frame_id: int, data: bytes) -> None:
        with self._lock:
            self._t.append(t_ns)
            self._ids.append(frame_id)
            self._data.append(data)
            if len(self._t) > self._limit:
                self._trim()

    def put_many(self, t_ns: list[int], frame_ids: list[int], payloads: list[bytes]) -> None:
        """A burst of frames, in order (the three lists of equal length)."""
        with self._lock:
            self._t += t_ns
            self._ids += frame_ids
            self._data += payloads
            if len(self._t) > self._limit:
                self._trim()

    def _trim(self) -> None:
        excess = len(self._t) - self.capacity
        if excess > 0:
            del self._t[:excess], self._ids[:excess], self._data[:excess]
            self._dropped += excess

    def __len__(self) -> int:
        return min(len(self._t), self.capacity)

    def oldest_ns(self) -> int | None:
        """Receive time of the oldest frame a drain would return (None when empty)."""
        with self._lock:
            t = self._t
            return t[max(0, len(t) - self.capacity)] if t else None

    def drain(self, until_ns: int | None = None) -> FrameBatch:
        """Every queued frame (received at or before ``until_ns``, if given) as one batch; later ones stay."""
        with self._lock:
            self._trim()
            t, ids, data = self._t, self._ids, self._data
            if until_ns is None or not t or t[-1] <= until_ns:
                self._t, self._ids, self._data = [], [], []
            else:
                k = 0
                while k < len(t) and t[k] <= until_ns:
                    k += 1
                self._t, self._ids, self._data = t[k:], ids[k:], data[k:]
                t, ids, data = t[:k], ids[:k], data[:k]
        if not t:
            return FrameBatch.empty(self.width)
        return FrameBatch.from_payloads(
            np.array(t, dtype=np.int64), np.array(ids, dtype=np.int64), data, width=self.width
        )
