"""Who is asking: the one place where a request's identity is checked against what it asks for, and
where what it did is written down.

Each surface builds a :class:`Caller` once per request or stream from what its transport established —
the gRPC peer's certificate CN (or, without mTLS, the device id the hello claims), the MQTT topic the
broker tied to the certificate, the HTTP request's API token (its name and role) — and passes it to
every service call. Services ask :class:`Access` before they act: a device may act only for itself and
never as an operator; an operator action needs the role :data:`~fleetloop_cloud.identity.roles.ACTIONS`
names for it (403 naming that role otherwise). After a write, the service records it through
:meth:`Access.record` in the hash-chained audit log: who (token name and role), what, on which target,
before and after, when, from which address, with which request id.

Refusals (a forged identity, an undecodable message, ...) are counted in :class:`Refusals`, by reason
and by transport: what the summary and the surfaces' tests read.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass, replace
from enum import StrEnum

from fleetloop_cloud.identity.roles import ACTIONS, Role, allows, class_access
from fleetloop_cloud.repositories.audit import MemoryAuditLog
from fleetloop_cloud.repositories.interfaces import AuditLog
from fleetloop_cloud.repositories.records import AuditEntry, NewAuditEntry
from fleetloop_shared.classification import FULL_VIEW, Classification, ClassView
from fleetloop_shared.errors import PermissionDeniedError, UnauthenticatedError

log = logging.getLogger("fleetloop.cloud.audit")


class CallerKind(StrEnum):
    DEVICE = "device"
    OPERATOR = "operator"
    #: The coordinator acting on its own (the rollout controller stepping a rollout).
    COORDINATOR = "coordinator"


@dataclass(frozen=True)
class Caller:
    """Who a request comes from, as the surface that received it knows it.

    ``proven`` says whether the transport proved the name (an mTLS certificate, a broker ACL, an API
    token) or the request only claims it (gRPC without mTLS, HTTP with ``--insecure``). An operator's
    ``role`` comes from its token; ``address`` and ``request_id`` are what the audit log records.
    """

    kind: CallerKind
    name: str
    transport: str
    proven: bool
    role: Role | None = None
    address: str = ""
    request_id: str = ""

    @classmethod
    def device(cls, device_id: str, *, transport: str, proven: bool, address: str = "") -> Caller:
        return cls(CallerKind.DEVICE, device_id, transport, proven, address=address)

    @classmethod
    def operator(
        cls,
        name: str,
        role: Role | None,
        *,
        transport: str = "http",
        proven: bool = True,
        address: str = "",
        request_id: str = "",
    ) -> Caller:
        """An operator named by its token (``role`` None: not authenticated; every action refused)."""
        return cls(CallerKind.OPERATOR, name, transport, proven, role, address, request_id)

    @classmethod
    def local(cls) -> Caller:
        """This process itself (tests, benchmarks, ``cloud init``, a coordinator embedded in a CLI
        command): whoever can run code here owns the data directory anyway."""
        return cls(CallerKind.OPERATOR, "local", "in-process", True, Role.ADMIN)

    @classmethod
    def controller(cls, coordinator_id: str) -> Caller:
        """The rollout controller of one coordinator, acting on a rollout by itself."""
        return cls(CallerKind.COORDINATOR, "rollout-controller", "internal", True, address=coordinator_id)

    def with_request(self, *, address: str, request_id: str) -> Caller:
        return replace(self, address=address, request_id=request_id)

    def __str__(self) -> str:
        role = f", {self.role.value}" if self.role is not None else ""
        return f"{self.kind.value} {self.name} ({self.transport}{role})"


class Refusals:
    """Messages refused from devices, by reason and by transport; safe from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_transport: dict[str, Counter[str]] = {}

    def count(self, reason: str, transport: str) -> None:
        with self._lock:
            self._by_transport.setdefault(transport, Counter())[reason] += 1

    def totals(self) -> Counter[str]:
        """Every transport's refusals, by reason."""
        out: Counter[str] = Counter()
        with self._lock:
            for counts in self._by_transport.values():
                out.update(counts)
        return out

    def of(self, transport: str) -> Counter[str]:
        """One transport's refusals, by reason."""
        with self._lock:
            return Counter(self._by_transport.get(transport, {}))

    def __getitem__(self, reason: str) -> int:
        return self.totals()[reason]

    def snapshot(self) -> dict[tuple[str, str], int]:
        """Every count, by (transport, reason): what the coordinator's metrics export."""
        with self._lock:
            return {(t, r): n for t, counts in self._by_transport.items() for r, n in counts.items()}


class Access:
    """The identity checks every service makes before it acts, and the audit log it writes after.

    ``audit`` is where writes are recorded (the coordinator's metadata database; an in-memory log when
    none is given, as in the services' tests).
    """

    def __init__(
        self, refusals: Refusals, audit: AuditLog | None = None, classification: Classification | None = None
    ) -> None:
        self.refusals = refusals
        self.audit: AuditLog = audit if audit is not None else MemoryAuditLog()
        #: How the deployment classifies its signals (built-in defaults unless configured).
        self.classification = classification if classification is not None else Classification()

    def view(self, caller: Caller) -> ClassView:
        """What ``caller`` may see of each signal class (identity.roles.CLASS_ACCESS): the query layer
        builds every read for this caller from it. The coordinator itself and in-process tools see all;
        a device or an operator without a role gets the least (the viewer's)."""
        if caller.kind is CallerKind.COORDINATOR:
            return FULL_VIEW
        role = caller.role if caller.kind is CallerKind.OPERATOR else None
        return ClassView(class_access(role), self.classification)

    def device(self, caller: Caller, claimed: str) -> str:
        """The device a device request acts for. A request naming another device than its caller (a
        forged identity) is refused — PermissionDeniedError, counted as ``impersonation``."""
        if caller.kind is not CallerKind.DEVICE:
            raise PermissionDeniedError(f"{caller} is not a device")
        if claimed != caller.name:
            self.refusals.count("impersonation", caller.transport)
            raise PermissionDeniedError(f"this connection is device {caller.name}, not {claimed!r}")
        return caller.name

    def operator(self, caller: Caller, action: str) -> None:
        """May ``caller`` do the operator ``action`` (``campaigns.apply``, ``rollouts.create``, ...)?
        Devices never may (PermissionDeniedError); an operator without a role was not authenticated
        (UnauthenticatedError); one whose role does not allow the action is told the role it needs."""
        needed = ACTIONS.get(action)
        if needed is None:
            raise PermissionDeniedError(f"{action!r} is not an operator action")
        if caller.kind is not CallerKind.OPERATOR:
            raise PermissionDeniedError(f"{caller} may not {action}: devices cannot use operator actions")
        if caller.role is None:
            raise UnauthenticatedError(f"{action} needs an API token (role {needed.value})")
        if not allows(caller.role, action):
            either = needed.value if needed is Role.ADMIN else f"{needed.value} or admin"
            raise PermissionDeniedError(
                f"{action} needs role {either}; token {caller.name!r} has role {caller.role.value}"
            )

    def record(
        self,
        caller: Caller,
        action: str,
        target: str,
        now: float,
        *,
        before: object = "",
        after: object = "",
        detail: str = "",
    ) -> AuditEntry:
        """Write one entry of the audit log for a write ``caller`` made (after it succeeded)."""
        role = caller.role.value if caller.role is not None else caller.kind.value
        entry = self.audit.append(
            NewAuditEntry(
                at=now, actor=caller.name, role=role, transport=caller.transport, address=caller.address,
                request_id=caller.request_id, action=action, target=target, before=_text(before),
                after=_text(after), detail=detail,
            )
        )  # fmt: skip
        log.info(
            "audit %d: %s (%s) %s %s", entry.seq, entry.actor, role, action, target,
            extra={"request_id": caller.request_id} if caller.request_id else None,
        )  # fmt: skip
        return entry


def _text(value: object) -> str:
    return "" if value is None else str(value)
