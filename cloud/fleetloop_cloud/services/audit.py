"""The audit log as operators read it: entries filtered by time, actor and kind, and a verification of
the whole hash chain (:mod:`fleetloop_cloud.identity.audit_chain`).

Writes are recorded by the services themselves, through :meth:`.access.Access.record`, so every
surface's writes land here — HTTP, the CLI's in-process commands, and the coordinator's own rollout
controller.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from typing import Any

from fleetloop_cloud.identity.audit_chain import ChainReport, verify
from fleetloop_cloud.repositories.audit import MAX_READ
from fleetloop_cloud.repositories.records import AuditEntry, AuditFilter
from fleetloop_cloud.services.access import Access, Caller
from fleetloop_shared.classification import SignalClass, Visibility


class AuditService:
    def __init__(self, access: Access) -> None:
        self._access = access

    def entries(self, caller: Caller, where: AuditFilter) -> list[AuditEntry]:
        self._access.operator(caller, "audit.list")
        entries = self._access.audit.entries(where)
        if self._access.view(caller).of(SignalClass.PERSONAL) is Visibility.FULL:
            return entries
        return [_without_sql(e) for e in entries]

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


def _without_sql(entry: AuditEntry) -> AuditEntry:
    """An access record as a reader who may not see personal data reads it: the SQL is replaced by its
    SHA-256 (an admin's ``WHERE value_str = 'WVW…'`` would otherwise show the VIN it looked for). The
    log itself keeps the SQL, and the chain verifies over it."""
    if entry.action != "query" or not entry.detail.startswith("{"):
        return entry
    try:
        detail = json.loads(entry.detail)
    except ValueError:
        return entry
    sql = detail.pop("sql", None) if isinstance(detail, dict) else None
    if not isinstance(sql, str):
        return entry
    detail["sql_sha256"] = hashlib.sha256(sql.encode()).hexdigest()
    return dataclasses.replace(entry, detail=json.dumps(detail, sort_keys=True))
