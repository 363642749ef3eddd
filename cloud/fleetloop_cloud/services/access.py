"""Who is asking: the one place where a request's identity is checked against what it asks for.

Each surface builds a :class:`Caller` once per request or stream from what its transport established —
the gRPC peer's certificate CN (or, without mTLS, the device id the hello claims), the MQTT topic the
broker tied to the certificate, the HTTP request — and passes it to every service call. Services ask
:class:`Access` before they act: a device may act only for itself; operator actions are named, so the
roles that come with API tokens attach here and nowhere else. Today every HTTP caller is the anonymous
operator and may do every operator action.

Refusals (a forged identity, an undecodable message, ...) are counted in :class:`Refusals`, by reason
and by transport: what the summary and the surfaces' tests read.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from enum import StrEnum

from fleetloop_shared.errors import PermissionDeniedError


class CallerKind(StrEnum):
    DEVICE = "device"
    OPERATOR = "operator"


@dataclass(frozen=True)
class Caller:
    """Who a request comes from, as the surface that received it knows it.

    ``proven`` says whether the transport proved the name (an mTLS certificate, a broker ACL) or the
    request only claims it (gRPC without mTLS, HTTP without tokens).
    """

    kind: CallerKind
    name: str
    transport: str
    proven: bool

    @classmethod
    def device(cls, device_id: str, *, transport: str, proven: bool) -> Caller:
        return cls(CallerKind.DEVICE, device_id, transport, proven)

    @classmethod
    def operator(cls, name: str = "anonymous", *, transport: str = "http", proven: bool = False) -> Caller:
        return cls(CallerKind.OPERATOR, name, transport, proven)

    @classmethod
    def local(cls) -> Caller:
        """This process itself (tests, benchmarks, a coordinator embedded in a CLI command)."""
        return cls(CallerKind.OPERATOR, "local", "in-process", True)

    def __str__(self) -> str:
        return f"{self.kind.value} {self.name} ({self.transport})"


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


class Access:
    """The identity checks every service makes before it acts."""

    def __init__(self, refusals: Refusals) -> None:
        self.refusals = refusals

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
        Devices never may; every operator may, until tokens and roles say otherwise."""
        if caller.kind is not CallerKind.OPERATOR:
            raise PermissionDeniedError(f"{caller} may not {action}: devices cannot use operator actions")
