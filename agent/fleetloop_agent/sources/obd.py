"""OBD-II as a signal source: service 01 PIDs polled by plan, the VIN (service 09) once per connection
(or every ``vin_every`` seconds), over ISO-TP on a CAN bus or through an ELM327 adapter (:mod:`.obd_link`).

A polling thread owns the link: it connects (with backoff, counting reconnects), reads the ECU's
support bitmaps so unsupported PIDs are never asked, asks for the VIN, then asks for each PID as its
interval comes round (:class:`~.obd_plan.ObdPollPlan` decides what and how to group). Every value is
stamped with the device clock when its answer arrives and handed to ``read()`` through a bounded queue
(drop-oldest, counted). Values already queued survive a link that breaks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Final

import numpy as np

from fleetloop_agent.sources.base import LIVE
from fleetloop_agent.sources.live import Backoff, ConnectionSource, DeviceClock, SourceCounters, SystemClock
from fleetloop_agent.sources.obd_link import ObdLink
from fleetloop_agent.sources.obd_plan import ObdPollPlan
from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.errors import StateError, UnavailableError
from fleetloop_shared.obd_pids import (
    PID_VIN,
    PIDS,
    SERVICE_CURRENT,
    SERVICE_VEHICLE_INFO,
    SUPPORT_PIDS,
    VIN_PATH,
    parse_current_data,
    parse_vin,
    supported_from,
)
from fleetloop_shared.samples import GroupBatch

log = logging.getLogger("fleetloop.agent.sources")

DEFAULT_QUEUE_SAMPLES: Final = 16_384
#: Longest idle wait of the polling thread (it rechecks its stop flag at least this often).
MAX_IDLE_S: Final = 0.2


class ObdSource(ConnectionSource):
    """PIDs (``{pid: interval_s}``) of one ECU, polled over ``link``."""

    def __init__(
        self,
        link_factory: Callable[[], ObdLink],
        intervals_s: Mapping[int, float],
        *,
        name: str = "obd",
        paths: Mapping[int, str] | None = None,
        vin: bool = True,
        vin_every_s: float = 0.0,
        multi_pid: bool | None = None,
        timeout_s: float = 1.0,
        queue_samples: int = DEFAULT_QUEUE_SAMPLES,
        clock: DeviceClock | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self.name = name
        self.origin = LIVE
        self._factory = link_factory
        self._intervals = dict(intervals_s)
        self._paths = {pid: (paths or {}).get(pid, PIDS[pid].path) for pid in self._intervals}
        self._vin = vin
        #: Ask for the VIN again this often (0: once): a capture window then holds the car's VIN.
        self._vin_every_ns = int(vin_every_s * 1e9)
        self._vin_at = 0
        self._timeout = timeout_s
        self._clock = clock or SystemClock()
        self._backoff = backoff or Backoff()
        self.plan = ObdPollPlan(self._intervals, multi_pid=multi_pid)
        self._samples: deque[tuple[int, int, float | str]] = deque()
        self._capacity = queue_samples
        self._lock = threading.Lock()
        self._counters = SourceCounters()
        self._ids: dict[int, int] = {}
        self._vin_id = 0
        super().__init__(f"obd-{name}", self._run, join_s=5.0)
        self._declared = False
        #: Why the link last failed (None while it works); the VIN once read.
        self.failure: str | None = None
        self.vin: str | None = None

    def declare(self, catalog: Catalog) -> None:
        for pid, path in self._paths.items():
            self._ids[pid] = catalog.add(path, DataType.FLOAT64, PIDS[pid].unit).id
        if self._vin:
            self._vin_id = catalog.add(VIN_PATH, DataType.STRING).id
        self._declared = True

    # -- the polling thread -------------------------------------------------------------------------------

    def _put(self, t_ns: int, pid: int, value: float | str) -> None:
        with self._lock:
            if len(self._samples) >= self._capacity:
                self._samples.popleft()
                self._counters.dropped += 1
            self._samples.append((t_ns, pid, value))

    def _run(self) -> None:
        ever = False
        while not self._stop.is_set():
            link = self._factory()
            try:
                link.open()
                if ever:
                    self._counters.reconnects += 1
                ever = True
                self._down, self.failure = False, None
                self._backoff.reset()
                self._connected.set()
                self._session(link)
            except UnavailableError as exc:
                self._counters.errors += 1
                if self.failure != exc.message:
                    log.warning("source %s: %s", self.name, exc.message)
                self.failure = exc.message
                self._down = True
                self._connected.clear()
                self._stop.wait(self._backoff.next_delay())
            finally:
                link.close()

    def _ask(self, link: ObdLink, payload: bytes) -> list[bytes]:
        return [answer for _, answer in link.request(payload, self._timeout)]

    def _session(self, link: ObdLink) -> None:
        """One connection: discover, then poll until stopped (UnavailableError ends it)."""
        supported: set[int] = set()
        for base in SUPPORT_PIDS:
            answers = self._ask(link, bytes([SERVICE_CURRENT, base]))
            bitmap = next((d[base] for a in answers if base in (d := parse_current_data(a))), None)
            if bitmap is None:
                if base == 0:
                    supported = set(self.plan.pids)  # no bitmaps: assume, and learn from silence
                break
            supported |= supported_from(base, bitmap)
            if base + 0x20 not in supported:
                break
        self.plan.learn_supported(supported)
        if self._vin and self.vin is None:
            self._read_vin(link)
        while not self._stop.is_set():
            now = time.monotonic_ns()
            if self._vin and self._vin_every_ns and now - self._vin_at >= self._vin_every_ns:
                self._read_vin(link)
            for request in self.plan.due(now):
                answers = self._ask(link, bytes([SERVICE_CURRENT, *request]))
                t_ns = self._clock.now_ns()
                got: dict[int, bytes] = {}
                for answer in answers:  # the first ECU (lowest id) answering a PID wins
                    for pid, data in parse_current_data(answer).items():
                        got.setdefault(pid, data)
                for pid in request:
                    if pid in got:
                        self._put(t_ns, pid, PIDS[pid].decode(got[pid]))
                self.plan.answered(time.monotonic_ns(), request, got)
            self._counters.missed_polls = self.plan.stats.missed_polls
            nxt = self.plan.next_due_ns()
            wait = MAX_IDLE_S if nxt is None else (nxt - time.monotonic_ns()) / 1e9
            if wait > 0:
                self._stop.wait(min(wait, MAX_IDLE_S))

    def _read_vin(self, link: ObdLink) -> None:
        """Ask for the VIN (service 09 PID 02) and queue it as a sample."""
        self._vin_at = time.monotonic_ns()
        for answer in self._ask(link, bytes([SERVICE_VEHICLE_INFO, PID_VIN])):
            vin = parse_vin(answer)
            if vin is not None:
                self.vin = vin
                self._put(self._clock.now_ns(), -1, vin)
                break

    # -- reading ------------------------------------------------------------------------------------------

    def read(self, until_ns: int) -> list[GroupBatch]:
        if not self._declared:
            raise StateError(f"source {self.name!r}: read() before declare()")
        self.start()
        with self._lock:
            taken: list[tuple[int, int, float | str]] = []
            while self._samples and self._samples[0][0] <= until_ns:
                taken.append(self._samples.popleft())
        per_pid: dict[int, tuple[list[int], list[float | str]]] = {}
        for t_ns, pid, value in taken:
            slot = per_pid.setdefault(pid, ([], []))
            slot[0].append(t_ns)
            slot[1].append(value)
        out = []
        for pid, (times, values) in per_pid.items():
            if pid < 0:
                group, sid, column = f"{self.name}/VIN", self._vin_id, np.array(values, dtype=object)
            else:
                group, sid, column = (
                    f"{self.name}/{PIDS[pid].name}",
                    self._ids[pid],
                    np.array(values, np.float64),
                )
            out.append(GroupBatch(group, np.array(times, np.int64), {sid: column}))
        self._counters.samples += len(taken)
        return out

    def counters(self) -> dict[str, int]:
        return self._counters.totals()
