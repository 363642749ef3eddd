"""The devices aggregate: SQL (SQLite / PostgreSQL) and its in-memory fake, side by side."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Sequence
from typing import Any

from fleetloop_cloud.repositories.database import Database
from fleetloop_cloud.repositories.records import DeviceRecord, DeviceTelemetry, Inventory, Registration
from fleetloop_shared.catalog import Catalog
from fleetloop_shared.errors import MalformedMessageError, NotFoundError

_COLUMNS = (
    "device_id, fleet, labels_json, catalog_json, agent_version, data_origin, hardware_id, "
    "firmware_version, firmware_sha256, active_slot, campaigns_version, campaigns_running_json, "
    "campaigns_refused_json, captures_total, session_owner, last_seen, registered_at, time_zone, "
    "delta_formats"
)


def _unknown(device_id: str) -> NotFoundError:
    return NotFoundError(f"device {device_id!r} is not registered")


def _catalog(device_id: str, records: Sequence[dict[str, Any]]) -> Catalog:
    try:
        return Catalog.from_records(list(records))
    except (KeyError, ValueError, TypeError) as exc:
        raise MalformedMessageError(f"device {device_id!r}: stored catalog is invalid: {exc}") from None


class SqlDevices:
    def __init__(self, db: Database) -> None:
        self._db = db

    def register(self, device_id: str, registration: Registration, *, owner: str, now: float) -> None:
        r = registration
        labels_json = json.dumps(dict(r.labels), sort_keys=True)
        catalog_json = json.dumps([dict(s) for s in r.catalog], sort_keys=True)
        with self._db.write() as tx:
            tx.execute(
                """INSERT INTO devices (device_id, fleet, labels_json, catalog_json, agent_version,
                                        data_origin, session_owner, last_seen, registered_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (device_id) DO UPDATE SET
                     fleet = excluded.fleet, labels_json = excluded.labels_json,
                     catalog_json = excluded.catalog_json, agent_version = excluded.agent_version,
                     data_origin = excluded.data_origin, session_owner = excluded.session_owner,
                     last_seen = excluded.last_seen""",
                (device_id, r.fleet, labels_json, catalog_json, r.agent_version, r.data_origin, owner, now,
                 now),
            )  # fmt: skip

    def update_inventory(self, device_id: str, inventory: Inventory, now: float) -> None:
        i = inventory
        with self._db.write() as tx:
            cur = tx.execute(
                """UPDATE devices SET hardware_id = ?, firmware_version = ?, firmware_sha256 = ?,
                          active_slot = ?, campaigns_version = ?, time_zone = ?, last_seen = ?,
                          delta_formats = ?
                   WHERE device_id = ?""",
                (i.hardware_id, i.firmware_version, i.firmware_sha256, i.active_slot, i.campaigns_version,
                 i.time_zone, now, ",".join(i.delta_formats), device_id),
            )  # fmt: skip
            if cur.rowcount == 0:
                raise _unknown(device_id)

    def set_campaign_status(
        self, device_id: str, version: int, running: Sequence[str], refused: dict[str, str], captures: int
    ) -> None:
        with self._db.write() as tx:
            cur = tx.execute(
                """UPDATE devices SET campaigns_version = ?, campaigns_running_json = ?,
                          campaigns_refused_json = ?, captures_total = ? WHERE device_id = ?""",
                (version, json.dumps(list(running)), json.dumps(dict(refused), sort_keys=True), captures,
                 device_id),
            )  # fmt: skip
            if cur.rowcount == 0:
                raise _unknown(device_id)

    def touch(
        self, device_id: str, now: float, *, owner: str, telemetry: DeviceTelemetry | None = None
    ) -> None:
        with self._db.write() as tx:
            cur = tx.execute(
                "UPDATE devices SET last_seen = ?, session_owner = ? WHERE device_id = ?",
                (now, owner, device_id),
            )
            if telemetry is not None and cur.rowcount > 0:
                tx.execute(
                    """INSERT INTO device_telemetry (device_id, reported_at, telemetry_json) VALUES (?, ?, ?)
                       ON CONFLICT (device_id) DO UPDATE SET reported_at = excluded.reported_at,
                         telemetry_json = excluded.telemetry_json""",
                    (device_id, telemetry.reported_at, json.dumps(dataclasses.asdict(telemetry))),
                )

    def telemetry(self) -> dict[str, DeviceTelemetry]:
        rows = self._db.read("SELECT device_id, telemetry_json FROM device_telemetry")
        known = {f.name for f in dataclasses.fields(DeviceTelemetry)}
        out = {}
        for device_id, text in rows:
            fields = {k: v for k, v in json.loads(text).items() if k in known}
            if fields.keys() == known:  # a row a newer or older coordinator wrote otherwise is left out
                out[str(device_id)] = DeviceTelemetry(**fields)
        return out

    def end_session(self, device_id: str, *, owner: str | None) -> bool:
        with self._db.write() as tx:
            if owner is None:
                cur = tx.execute(
                    "UPDATE devices SET session_owner = '' WHERE device_id = ? AND session_owner <> ''",
                    (device_id,),
                )
            else:
                cur = tx.execute(
                    "UPDATE devices SET session_owner = '' WHERE device_id = ? AND session_owner = ?",
                    (device_id, owner),
                )
            return cur.rowcount > 0

    @staticmethod
    def _record(row: tuple[Any, ...]) -> DeviceRecord:
        return DeviceRecord(
            device_id=row[0],
            fleet=row[1],
            labels=dict(json.loads(row[2])),
            catalog=list(json.loads(row[3])),
            agent_version=row[4],
            data_origin=row[5],
            hardware_id=row[6],
            firmware_version=row[7],
            firmware_sha256=row[8],
            active_slot=row[9],
            campaigns_version=int(row[10]),
            campaigns_running=list(json.loads(row[11])),
            campaigns_refused=dict(json.loads(row[12])),
            captures_total=int(row[13]),
            session_owner=str(row[14]),
            last_seen=float(row[15]),
            registered_at=float(row[16]),
            time_zone=str(row[17]),
            delta_formats=tuple(f for f in str(row[18]).split(",") if f),
        )

    def get(self, device_id: str) -> DeviceRecord | None:
        rows = self._db.read(f"SELECT {_COLUMNS} FROM devices WHERE device_id = ?", (device_id,))
        return self._record(rows[0]) if rows else None

    def all(self) -> list[DeviceRecord]:
        return [self._record(r) for r in self._db.read(f"SELECT {_COLUMNS} FROM devices ORDER BY device_id")]

    def catalog(self, device_id: str) -> Catalog:
        rows = self._db.read("SELECT catalog_json FROM devices WHERE device_id = ?", (device_id,))
        if not rows:
            raise _unknown(device_id)
        try:
            records = json.loads(rows[0][0])
        except ValueError as exc:
            raise MalformedMessageError(f"device {device_id!r}: stored catalog is invalid: {exc}") from None
        return _catalog(device_id, records)


class MemoryDevices:
    """The same semantics in a dict, for service tests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._devices: dict[str, DeviceRecord] = {}
        self._telemetry: dict[str, DeviceTelemetry] = {}

    def register(self, device_id: str, registration: Registration, *, owner: str, now: float) -> None:
        r = registration
        with self._lock:
            old = self._devices.get(device_id)
            base = old or DeviceRecord(
                device_id=device_id, fleet="", labels={}, catalog=[], agent_version="", data_origin="",
                hardware_id="", firmware_version="", firmware_sha256="", active_slot="", campaigns_version=0,
                campaigns_running=[], campaigns_refused={}, captures_total=0, session_owner="", last_seen=now,
                registered_at=now,
            )  # fmt: skip
            self._devices[device_id] = dataclasses.replace(
                base, fleet=r.fleet, labels=dict(r.labels), catalog=[dict(s) for s in r.catalog],
                agent_version=r.agent_version, data_origin=r.data_origin, session_owner=owner, last_seen=now,
            )  # fmt: skip

    def _change(self, device_id: str, **changes: Any) -> bool:
        with self._lock:
            old = self._devices.get(device_id)
            if old is None:
                return False
            self._devices[device_id] = dataclasses.replace(old, **changes)
            return True

    def update_inventory(self, device_id: str, inventory: Inventory, now: float) -> None:
        if not self._change(device_id, last_seen=now, **dataclasses.asdict(inventory)):
            raise _unknown(device_id)

    def set_campaign_status(
        self, device_id: str, version: int, running: Sequence[str], refused: dict[str, str], captures: int
    ) -> None:
        if not self._change(
            device_id, campaigns_version=version, campaigns_running=list(running),
            campaigns_refused=dict(refused), captures_total=captures,
        ):  # fmt: skip
            raise _unknown(device_id)

    def touch(
        self, device_id: str, now: float, *, owner: str, telemetry: DeviceTelemetry | None = None
    ) -> None:
        if self._change(device_id, last_seen=now, session_owner=owner) and telemetry is not None:
            with self._lock:
                self._telemetry[device_id] = telemetry

    def telemetry(self) -> dict[str, DeviceTelemetry]:
        with self._lock:
            return dict(self._telemetry)

    def end_session(self, device_id: str, *, owner: str | None) -> bool:
        with self._lock:
            old = self._devices.get(device_id)
            if old is None or not old.session_owner or owner not in (None, old.session_owner):
                return False
            self._devices[device_id] = dataclasses.replace(old, session_owner="")
            return True

    def get(self, device_id: str) -> DeviceRecord | None:
        with self._lock:
            return self._devices.get(device_id)

    def all(self) -> list[DeviceRecord]:
        with self._lock:
            return [self._devices[d] for d in sorted(self._devices)]

    def catalog(self, device_id: str) -> Catalog:
        record = self.get(device_id)
        if record is None:
            raise _unknown(device_id)
        return _catalog(device_id, record.catalog)
