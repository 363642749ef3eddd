"""The audit log as operators read it: entries filtered by time, actor and kind, and a verification of
the whole hash chain (:mod:`fleetloop_cloud.identity.audit_chain`).

Writes are recorded by the services themselves, through :meth:`.access.Access.record`, so every
surface's writes land here — HTTP, the CLI's in-process commands, and the coordinator's own rollout
controller.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fleetloop_cloud.identity.audit_chain import ChainReport, verify
from fleetloop_cloud.repositories.audit import MAX_READ
from fleetloop_cloud.repositories.records import AuditEntry, AuditFilter
from fleetloop_cloud.services.access import Access, Caller


class AuditService:
    def __init__(self, access: Access) -> None:
        self._access = access

    def entries(self, caller: Caller, where: AuditFilter) -> list[AuditEntry]:
        self._access.operator(caller, "audit.list")
        return self._access.audit.entries(where)

    def verify(self, caller: Caller) -> ChainReport:
        """Walk the whole chain, a page at a time."""
        self._access.operator(caller, "audit.verify")
        return verify(self._walk())

    def _walk(self) -> Iterator[dict[str, Any]]:
        after = 0
        while True:
            page = self._access.audit.chain(after, MAX_READ)
            for e in page:
                yield e.fields()
            if len(page) < MAX_READ:
                return
            after = page[-1].seq
