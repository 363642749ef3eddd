"""Capture assembly: turns fires into captures once their post-window has arrived. Pure: data time in.

A fire asks for ``[t - pre, t + post]``. The pre-window is already in the ring buffers; the post-window
is not, so a fire waits as *pending* until data time passes ``to_ns`` and is then cut from the ring
buffers in one piece (same group/column layout the store writes). Pending fires are bounded: beyond
``max_pending`` new fires are dropped (policy ``drop-newest``: the captures already waiting are at least
as valuable and closer to completion) and counted in ``dropped_fires_total``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fleetloop_agent.ring_buffer import RingBuffers
from fleetloop_agent.trigger_engine import Fire
from fleetloop_shared.catalog import Catalog
from fleetloop_shared.errors import ConfigError
from fleetloop_shared.samples import GroupBatch


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

    @property
    def sample_count(self) -> int:
        return sum(batch.sample_count for batch in self.batches)


@dataclass(frozen=True)
class _Pending:
    capture_id: str
    fire: Fire
    patterns: tuple[str, ...]


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
        #: Fires not captured because ``max_pending`` fires were already waiting (policy drop-newest).
        self.dropped_fires_total = 0

    @property
    def pending(self) -> int:
        """Number of fires waiting for their post-window."""
        return len(self._pending)

    def on_fire(self, fire: Fire, collect_patterns: Sequence[str]) -> None:
        """Queue ``fire``; ``collect_patterns`` are the campaign's ``collect.signals`` globs.

        A fire already pending (same campaign and time) is not queued twice.
        """
        capture_id = capture_id_for(fire)
        if capture_id in self._pending:
            return
        if len(self._pending) >= self._max_pending:
            self.dropped_fires_total += 1
            return
        self._pending[capture_id] = _Pending(capture_id, fire, tuple(collect_patterns))

    def poll(self, data_now_ns: int, buffers: RingBuffers) -> list[Capture]:
        """The captures whose window has fully arrived (``data_now_ns >= to_ns``), in fire order."""
        done = [p for p in self._pending.values() if data_now_ns >= p.fire.to_ns]
        captures: list[Capture] = []
        for pending in sorted(done, key=lambda p: (p.fire.t_ns, p.capture_id)):
            del self._pending[pending.capture_id]
            fire = pending.fire
            ids = {spec.id for spec in self._catalog.match(pending.patterns)}
            batches = buffers.window(ids, fire.from_ns, fire.to_ns) if ids else []
            captures.append(
                Capture(
                    capture_id=pending.capture_id,
                    campaign=fire.campaign,
                    priority=fire.priority,
                    fire_ns=fire.t_ns,
                    from_ns=fire.from_ns,
                    to_ns=fire.to_ns,
                    batches=batches,
                )
            )
        return captures
