"""Who uploads what, when: the cloud's upload scheduler (a pure policy core — no I/O, time passed in).

Devices report their backlog (bytes pending per priority, and the network they are on); every tick the
scheduler hands out upload grants (``max_bytes`` of data at ``min_priority`` or above) so that:

- the **global ingest budget** (bytes/s the cloud accepts) and the **per-network budgets** (what the
  operator pays for on cellular vs wifi) hold: the grants of one tick never add up to more than
  ``budget × tick``;
- **highest priority first**: a device's *effective priority* is the highest priority it has bytes for;
- **fair between devices**: among equal effective priorities the device granted longest ago goes first,
  and no grant exceeds ``quantum_bytes``, so equal backlogs are served round-robin;
- **no starvation**: a device waiting with a backlog gains one priority level per ``aging_s`` waited, so
  it eventually outranks any fresh report and is served within a bounded number of ticks (as long as its
  network's budget is not zero).

The scheduler keeps a *view* of each backlog: a grant is subtracted from the view at once (so one backlog
is never granted twice) and the device's next report replaces the view. Devices that stop reporting are
forgotten after ``forget_after_s``. Everything is bounded: at most ``max_devices`` backlogs are tracked
(overflow policy: refuse the new device, counted in ``refused_devices``; it is served once others leave).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fleetloop_shared.choices import check_choice
from fleetloop_shared.errors import UserError
from fleetloop_shared.networks import NETWORKS

MAX_PRIORITY = 9


@dataclass(frozen=True)
class Backlog:
    """One device's report: bytes pending per priority (0..9) and its network type."""

    device_id: str
    network: str
    bytes_by_priority: Mapping[int, int]

    def __post_init__(self) -> None:
        if not self.device_id:
            raise UserError("backlog without a device id")
        check_choice(self.network, NETWORKS, f"backlog of {self.device_id}: network", error=UserError)
        for p, n in self.bytes_by_priority.items():
            if not 0 <= p <= MAX_PRIORITY or n < 0:
                raise UserError(f"backlog of {self.device_id}: priority {p} / bytes {n} out of range")


@dataclass(frozen=True)
class Budget:
    """Bytes per second the cloud grants in total and per network type (a missing network: no cap)."""

    global_bytes_per_s: int
    per_network_bytes_per_s: Mapping[str, int] = field(default_factory=dict)
    quantum_bytes: int = 4 * 1024 * 1024
    aging_s: float = 30.0
    forget_after_s: float = 300.0
    max_devices: int = 100_000

    def __post_init__(self) -> None:
        if self.global_bytes_per_s < 0 or any(v < 0 for v in self.per_network_bytes_per_s.values()):
            raise UserError("upload budgets must be >= 0 bytes/s")
        if self.quantum_bytes <= 0 or self.aging_s <= 0 or self.max_devices <= 0:
            raise UserError("quantum, aging and max devices must be positive")
        unknown = set(self.per_network_bytes_per_s) - set(NETWORKS)
        if unknown:
            raise UserError(f"unknown network type(s) in the budget: {', '.join(sorted(unknown))}")


@dataclass(frozen=True)
class Grant:
    device_id: str
    max_bytes: int
    min_priority: int
    network: str


@dataclass
class _Device:
    network: str
    view: dict[int, int]
    reported_at: float
    waiting_since: float | None
    last_grant_seq: int = -1


class UploadScheduler:
    """State: the backlog views. ``report`` and ``tick`` are the only ways in; no clocks are read."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self._devices: dict[str, _Device] = {}
        self._last_tick: float | None = None
        self.refused_devices = 0
        self.granted_bytes_total = 0
        self._grant_seq = 0

    def report(self, backlog: Backlog, now: float) -> bool:
        """Replace the device's view with its report; False when refused (too many devices tracked)."""
        view = {p: int(n) for p, n in backlog.bytes_by_priority.items() if n > 0}
        dev = self._devices.get(backlog.device_id)
        if dev is None:
            if len(self._devices) >= self.budget.max_devices:
                self.refused_devices += 1
                return False
            dev = _Device(backlog.network, view, now, now if view else None)
            self._devices[backlog.device_id] = dev
            return True
        dev.network = backlog.network
        dev.view = view
        dev.reported_at = now
        if not view:
            dev.waiting_since = None
        elif dev.waiting_since is None:
            dev.waiting_since = now
        return True

    def forget(self, device_id: str) -> None:
        self._devices.pop(device_id, None)

    def tracked(self) -> int:
        return len(self._devices)

    def pending_bytes(self, device_id: str) -> int:
        dev = self._devices.get(device_id)
        return sum(dev.view.values()) if dev is not None else 0

    def effective_priority(self, device_id: str, now: float) -> int:
        dev = self._devices[device_id]
        return self._effective(dev, now)

    def _effective(self, dev: _Device, now: float) -> int:
        if not dev.view:
            return -1
        top = max(dev.view)
        waited = 0.0 if dev.waiting_since is None else max(0.0, now - dev.waiting_since)
        return top + int(waited // self.budget.aging_s)

    def tick(self, now: float, dt: float) -> list[Grant]:
        """The grants for the next ``dt`` seconds (budgets × dt), highest effective priority first."""
        if dt <= 0:
            return []
        for device_id in [
            d for d, dev in self._devices.items() if now - dev.reported_at > self.budget.forget_after_s
        ]:
            del self._devices[device_id]
        left_global = int(self.budget.global_bytes_per_s * dt)
        left_net = {n: int(v * dt) for n, v in self.budget.per_network_bytes_per_s.items()}
        order = sorted(
            (
                (self._effective(dev, now), dev.last_grant_seq, device_id)
                for device_id, dev in self._devices.items()
            ),
            key=lambda t: (-t[0], t[1], t[2]),
        )
        grants: list[Grant] = []
        for eff, _, device_id in order:
            if eff < 0 or left_global <= 0:
                break
            dev = self._devices[device_id]
            net_cap = left_net.get(dev.network)
            if net_cap is not None and net_cap <= 0:
                continue
            top = max(dev.view)
            amount = min(self.budget.quantum_bytes, left_global, dev.view[top])
            if net_cap is not None:
                amount = min(amount, net_cap)
            if amount <= 0:
                continue
            grants.append(Grant(device_id, amount, top, dev.network))
            left_global -= amount
            if net_cap is not None:
                left_net[dev.network] = net_cap - amount
            self.granted_bytes_total += amount
            dev.view[top] -= amount
            if dev.view[top] <= 0:
                del dev.view[top]
            self._grant_seq += 1
            dev.last_grant_seq = self._grant_seq
            dev.waiting_since = now if dev.view else None
        self._last_tick = now
        return grants
