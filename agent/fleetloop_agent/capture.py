"""Capture assembly: turns fires into captures once their post-window has arrived. Pure: data time in.

A fire asks for ``[t - pre, t + post]``. The pre-window is already in the ring buffers; the post-window
is not, so a fire waits as *pending* until data time passes ``to_ns`` and is then cut from the ring
buffers in one piece (same group/column layout the store writes). Pending fires are bounded: beyond
``max_pending`` a new fire evicts the lowest-priority waiting one if it has a higher priority, and is
dropped otherwise (policy ``drop-lowest-priority-then-newest``: among equals, the captures already
waiting are closer to completion); both count in ``dropped_fires_total``.

Two campaign limits are applied here, where captures are born: ``upload.max_per_hour`` (a fire beyond
that many captures of its campaign in the last hour of data time is dropped, counted in
``rate_limited_total``) and the per-signal ``min_period`` of ``collect.signals`` (the capture keeps at
most one sample of such a signal per period: the first, then the first at least a period later).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fleetloop_agent.ring_buffer import RingBuffers
from fleetloop_agent.trigger_engine import Fire
from fleetloop_shared.catalog import Catalog
from fleetloop_shared.errors import ConfigError
from fleetloop_shared.privacy import PrivacyPolicy
from fleetloop_shared.samples import GroupBatch
from fleetloop_shared.segment import BUNDLE_MAX_ROWS, Segment, bundle_segments, segment_from_batch

HOUR_NS = 3_600_000_000_000


@dataclass
class Capture:
    """The samples of the collected signals around one fire, one batch per group."""

    capture_id: str
    campaign: str
    priority: int
    fire_ns: int
    from_ns: int
    to_ns: int
    batches: list[GroupBatch]
    #: The campaign's privacy policy when it fired: applied before the capture is stored.
    privacy: PrivacyPolicy | None = None

    @property
    def sample_count(self) -> int:
        return sum(batch.sample_count for batch in self.batches)

    def segments(self, catalog: Catalog, *, bundle_rows: int = BUNDLE_MAX_ROWS) -> list[Segment]:
        """The capture as the segments to store: its non-empty groups packed into multi-group (format 4)
        segments of ≤ ``bundle_rows`` rows, whose groups share one clock where their times coincide
        (the frames of one CAN bus arriving in one USB batch). ``bundle_rows`` 0: one group per segment
        (formats 2/3) for a coordinator that does not read format 4 yet."""
        singles = (
            segment_from_batch(batch, catalog) for batch in self.batches if len(batch) and batch.values
        )
        return list(bundle_segments(singles, max_rows=bundle_rows))


@dataclass(frozen=True)
class _Pending:
    capture_id: str
    fire: Fire
    patterns: tuple[str, ...]
    privacy: PrivacyPolicy | None


def capture_id_for(fire: Fire) -> str:
    """Deterministic id: the same fire (e.g. replayed after a restart) yields the same capture id."""
    return f"{fire.campaign}-{fire.t_ns}"


class CaptureAssembler:
    """Holds fires until their window is complete, then cuts them from the ring buffers."""

    def __init__(self, catalog: Catalog, *, max_pending: int = 64) -> None:
        if max_pending <= 0:
            raise ConfigError(f"capture max_pending must be positive, got {max_pending}")
        self._catalog = catalog
        self._max_pending = max_pending
        self._pending: dict[str, _Pending] = {}
        self._accepted: dict[str, deque[int]] = {}  # campaign → fire times accepted in the last hour
        #: Fires not captured because ``max_pending`` fires were already waiting (or evicted by a higher
        #: priority one).
        self.dropped_fires_total = 0
        #: Fires not captured because their campaign reached ``upload.max_per_hour``.
        self.rate_limited_total = 0

    @property
    def pending(self) -> int:
        """Number of fires waiting for their post-window."""
        return len(self._pending)

    def required_horizon_ns(self) -> int:
        """History the ring buffers must keep for the captures still waiting (a campaign swapped out
        keeps its pending captures: the runtime keeps at least this horizon)."""
        return max((p.fire.to_ns - p.fire.from_ns for p in self._pending.values()), default=0)

    def on_fire(
        self, fire: Fire, collect_patterns: Sequence[str], privacy: PrivacyPolicy | None = None
    ) -> None:
        """Queue ``fire``; ``collect_patterns`` are the campaign's ``collect.signals`` globs and
        ``privacy`` its policy now (the capture is stored under it even if the campaign changes meanwhile).

        A fire already pending (same campaign and time) is not queued twice.
        """
        capture_id = capture_id_for(fire)
        if capture_id in self._pending:
            return
        if fire.max_per_hour is not None:
            recent = self._accepted.setdefault(fire.campaign, deque())
            while recent and recent[0] <= fire.t_ns - HOUR_NS:
                recent.popleft()
            if len(recent) >= fire.max_per_hour:
                self.rate_limited_total += 1
                return
        if len(self._pending) >= self._max_pending:
            victim = min(self._pending.values(), key=lambda p: (p.fire.priority, -p.fire.t_ns))
            if victim.fire.priority >= fire.priority:
                self.dropped_fires_total += 1
                return
            del self._pending[victim.capture_id]
            self.dropped_fires_total += 1
        if fire.max_per_hour is not None:
            self._accepted[fire.campaign].append(fire.t_ns)
        self._pending[capture_id] = _Pending(capture_id, fire, tuple(collect_patterns), privacy)

    def poll(self, data_now_ns: int, buffers: RingBuffers) -> list[Capture]:
        """The captures whose window has fully arrived (``data_now_ns >= to_ns``), in fire order."""
        done = [p for p in self._pending.values() if data_now_ns >= p.fire.to_ns]
        captures: list[Capture] = []
        for pending in sorted(done, key=lambda p: (p.fire.t_ns, p.capture_id)):
            del self._pending[pending.capture_id]
            fire = pending.fire
            ids = {spec.id for spec in self._catalog.match(pending.patterns)}
            batches = buffers.window(ids, fire.from_ns, fire.to_ns) if ids else []
            if fire.min_periods:
                batches = self._thin(batches, fire.min_periods)
            captures.append(
                Capture(
                    capture_id=pending.capture_id,
                    campaign=fire.campaign,
                    priority=fire.priority,
                    fire_ns=fire.t_ns,
                    from_ns=fire.from_ns,
                    to_ns=fire.to_ns,
                    batches=batches,
                    privacy=pending.privacy,
                )
            )
        return captures

    def _thin(self, batches: list[GroupBatch], min_periods: Sequence[tuple[str, int]]) -> list[GroupBatch]:
        """Split the columns with a minimum period out of their group and keep one sample per period."""
        period_of: dict[int, int] = {}
        for pattern, period in min_periods:
            for spec in self._catalog.match([pattern]):
                period_of[spec.id] = max(period_of.get(spec.id, 0), period)
        out: list[GroupBatch] = []
        for batch in batches:
            plain = {sid: col for sid, col in batch.values.items() if sid not in period_of}
            if plain:
                out.append(GroupBatch(batch.group, batch.t_ns, plain))
            by_period: dict[int, list[int]] = {}
            for sid in batch.values:
                if sid in period_of:
                    by_period.setdefault(period_of[sid], []).append(sid)
            for period, sids in sorted(by_period.items()):
                keep = _first_per_period(batch.t_ns.tolist(), period)
                rows = np.asarray(keep, np.intp)
                out.append(
                    GroupBatch(batch.group, batch.t_ns[rows], {sid: batch.values[sid][rows] for sid in sids})
                )
        return out


def _first_per_period(times: list[int], period: int) -> list[int]:
    """Rows kept by "at most one sample per period": the first, then the first at least ``period`` later."""
    keep: list[int] = []
    last: int | None = None
    for row, t in enumerate(times):
        if last is None or t - last >= period:
            keep.append(row)
            last = t
    return keep
