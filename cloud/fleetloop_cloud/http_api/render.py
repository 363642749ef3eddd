"""The services' typed records as JSON-ready data, rendered once for every route."""

from __future__ import annotations

import dataclasses
from typing import Any

from fleetloop_cloud.services.devices import DeviceStatus
from fleetloop_cloud.services.tokens import TokenView
from fleetloop_shared.update.artifact import ReleaseManifest


def plain(record: Any) -> Any:
    """A service's record as JSON-ready data: dataclasses as objects, bytes as hex."""
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        return {f.name: plain(getattr(record, f.name)) for f in dataclasses.fields(record)}
    if isinstance(record, bytes):
        return record.hex()
    if isinstance(record, list | tuple):
        return [plain(v) for v in record]
    if isinstance(record, dict):
        return {k: plain(v) for k, v in record.items()}
    return record


def device_json(status: DeviceStatus) -> dict[str, Any]:
    # the id first, where a reader looks for it (the record's inventory fields come first in it)
    out: dict[str, Any] = {"device_id": status.record.device_id} | plain(status.record)
    out.pop("catalog", None)
    out.pop("session_owner", None)
    out["online"] = status.online
    out["telemetry"] = plain(status.telemetry) if status.telemetry is not None else None
    return out


def token_json(view: TokenView) -> dict[str, Any]:
    """A token as the API shows it: its name, role and state, then the rest of its record but the hash."""
    out: dict[str, Any] = {"name": view.record.name, "role": view.record.role, "state": view.state}
    stored: dict[str, Any] = plain(view.record)
    del stored["token_hash"]
    return out | stored


def release_json(m: ReleaseManifest) -> dict[str, Any]:
    return {
        "name": m.name,
        "version": m.version,
        "hardware_id": m.hardware_id,
        "sha256": m.target_sha256,
        "size": m.target_size,
        "payloads": [
            {
                "kind": p.kind,
                "algorithm": p.algorithm,
                "size": p.size,
                "sha256": p.sha256,
                "path": p.path,
                "base_sha256": p.base_sha256,
            }
            for p in m.payloads
        ],
    }
