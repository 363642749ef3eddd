"""What to ask an OBD-II ECU and when: the pure decision core of the OBD source (time passed in).

Each PID has its own polling interval. PIDs that fall due together share one service 01 request (up to
six, as J1979 allows) while the ECU answers them; an ECU that refuses multi-PID requests — answers only
some of the PIDs asked, or nothing — is learned from its first such answer: the PIDs it left out are
asked again alone, at once, and every later request carries one PID. PIDs the ECU declares unsupported
in its support bitmaps (01 00, 01 20, ...) are never asked; a PID that goes unanswered alone twice in a
row is dropped the same way (as is one left out of multi-PID answers twice, where the configuration
fixes multi-PID requests on). A PID whose turn came round again before it could be asked (the ECU or
the link was too slow) counts as a missed poll.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fleetloop_shared.obd_pids import MAX_PIDS_PER_REQUEST

#: Unanswered single-PID requests after which a PID is taken as unsupported.
MAX_FAILURES = 2


@dataclass
class _Poll:
    interval_ns: int
    next_ns: int = 0
    failures: int = 0


@dataclass
class PlanStats:
    missed_polls: int = 0
    unsupported: int = 0
    requests: int = 0


class ObdPollPlan:
    """The polling plan of one ECU."""

    def __init__(self, intervals_s: Mapping[int, float], *, multi_pid: bool | None = None) -> None:
        """``multi_pid``: None learns it from the ECU (try, then split); True or False fixes it."""
        self._polls = {pid: _Poll(int(s * 1e9)) for pid, s in intervals_s.items()}
        self.multi_pid = True if multi_pid is None else multi_pid
        self._learn_multi = multi_pid is None
        self.unsupported: set[int] = set()
        self.stats = PlanStats()

    @property
    def pids(self) -> list[int]:
        """The PIDs still polled."""
        return sorted(self._polls)

    def learn_supported(self, supported: Iterable[int]) -> None:
        """Drop every PID the ECU's support bitmaps leave out."""
        known = set(supported)
        for pid in [p for p in self._polls if p not in known]:
            self._drop(pid)

    def _drop(self, pid: int) -> None:
        del self._polls[pid]
        self.unsupported.add(pid)
        self.stats.unsupported += 1

    def next_due_ns(self) -> int | None:
        """When the next PID falls due (None: nothing left to poll)."""
        return min((p.next_ns for p in self._polls.values()), default=None)

    def due(self, now_ns: int) -> list[tuple[int, ...]]:
        """The requests to send now: due PIDs, grouped when the ECU takes several per request."""
        pids = []
        for pid, poll in sorted(self._polls.items()):
            if poll.next_ns > now_ns:
                continue
            late = now_ns - poll.next_ns
            if poll.next_ns and late >= poll.interval_ns:
                self.stats.missed_polls += late // poll.interval_ns
            poll.next_ns = now_ns + poll.interval_ns
            pids.append(pid)
        size = MAX_PIDS_PER_REQUEST if self.multi_pid else 1
        requests = [tuple(pids[k : k + size]) for k in range(0, len(pids), size)]
        self.stats.requests += len(requests)
        return requests

    def answered(self, now_ns: int, request: tuple[int, ...], got: Iterable[int]) -> None:
        """Record which PIDs of ``request`` the ECU answered."""
        answered = set(got)
        missing = [pid for pid in request if pid not in answered and pid in self._polls]
        for pid in request:
            if pid in answered and pid in self._polls:
                self._polls[pid].failures = 0
        if not missing:
            return
        if len(request) > 1 and self._learn_multi and self.multi_pid:
            self.multi_pid = False  # this ECU answers one PID per request
            for pid in missing:
                self._polls[pid].next_ns = now_ns  # ask again, alone, now
            return
        for pid in missing:
            self._polls[pid].failures += 1
            if self._polls[pid].failures >= MAX_FAILURES:
                self._drop(pid)
