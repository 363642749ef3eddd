"""The OTA journal: the one job's state, durable before every side effect that follows it.

A power cut can hit between any two instructions. The driver writes the state it is *about to act in*
here first, so that after the cut it knows what may have half-happened and resumes or rolls back (see
``states.RESUME``). Writes are atomic (temp file, fsync, rename, fsync of the directory): the journal is
always either the old or the new entry, never a mix.

Beside it, :class:`FinishedJobs` remembers the ids of recently finished jobs, so a replayed job message
is refused instead of run twice.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fleetloop_agent.ota.states import OtaState
from fleetloop_shared.durable import fsync_directory, write_atomically

log = logging.getLogger(__name__)

JOURNAL_SCHEMA = "fleetloop.ota-journal.v1"
#: A journal holds one job's manifest (small); a bigger file is not ours.
MAX_JOURNAL_BYTES = 1 << 20


@dataclass
class JournalEntry:
    """Everything needed to continue (or explain) one OTA job after a restart."""

    job_id: str
    rollout_id: str
    state: OtaState
    reason: str
    manifest: bytes
    signature: bytes
    base_url: str
    version: str
    target_slot: str
    previous_slot: str
    payload_kind: str
    bytes_downloaded: int
    bytes_total: int
    updated_unix: float

    def to_json(self) -> bytes:
        doc: dict[str, Any] = asdict(self)
        doc["schema"] = JOURNAL_SCHEMA
        doc["state"] = self.state.value
        doc["manifest"] = base64.b64encode(self.manifest).decode("ascii")
        doc["signature"] = base64.b64encode(self.signature).decode("ascii")
        return json.dumps(doc, sort_keys=True, indent=1).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> JournalEntry:
        """Parse a journal file; ValueError (with the reason) on anything malformed."""
        doc = json.loads(data.decode("utf-8"))
        if not isinstance(doc, dict) or doc.get("schema") != JOURNAL_SCHEMA:
            raise ValueError(f"not a {JOURNAL_SCHEMA} document")

        def text(key: str) -> str:
            value = doc.get(key)
            if not isinstance(value, str):
                raise ValueError(f"field {key!r} must be a string")
            return value

        def count(key: str) -> int:
            value = doc.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"field {key!r} must be a non-negative integer")
            return value

        def blob(key: str) -> bytes:
            try:
                return base64.b64decode(text(key), validate=True)
            except binascii.Error as exc:
                raise ValueError(f"field {key!r} is not base64: {exc}") from None

        updated = doc.get("updated_unix")
        if isinstance(updated, bool) or not isinstance(updated, int | float):
            raise ValueError("field 'updated_unix' must be a number")
        return cls(
            job_id=text("job_id"),
            rollout_id=text("rollout_id"),
            state=OtaState(text("state")),
            reason=text("reason"),
            manifest=blob("manifest"),
            signature=blob("signature"),
            base_url=text("base_url"),
            version=text("version"),
            target_slot=text("target_slot"),
            previous_slot=text("previous_slot"),
            payload_kind=text("payload_kind"),
            bytes_downloaded=count("bytes_downloaded"),
            bytes_total=count("bytes_total"),
            updated_unix=float(updated),
        )


class OtaJournal:
    """The durable record of the current (or last finished) OTA job, one JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> JournalEntry | None:
        """The journaled job, or None when there is none or the file is unreadable (logged, not raised).

        A corrupt journal cannot come from our atomic writes, only from a failing disk; refusing to start
        the agent over it would turn a damaged file into a bricked device.
        """
        try:
            with self.path.open("rb") as f:
                data = f.read(MAX_JOURNAL_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("OTA journal %s unreadable, ignoring it: %s", self.path, exc)
            return None
        if len(data) > MAX_JOURNAL_BYTES:
            log.warning("OTA journal %s is larger than %d bytes, ignoring it", self.path, MAX_JOURNAL_BYTES)
            return None
        try:
            return JournalEntry.from_json(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            log.warning("OTA journal %s is corrupt, ignoring it: %s", self.path, exc)
            return None

    def save(self, entry: JournalEntry) -> None:
        """Durably replace the journal with ``entry`` (call before the side effect it announces)."""
        write_atomically(self.path, entry.to_json())

    def clear(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            return
        fsync_directory(self.path.parent)


class FinishedJobs:
    """Ids of the most recently finished jobs and how they ended, to refuse replays.

    Bounded to ``capacity`` ids; overflow policy: forget the oldest (a replay that old is also refused
    by the version check, since the device has moved on).
    """

    def __init__(self, path: Path, capacity: int = 256) -> None:
        self.path = path
        self.capacity = capacity
        self._jobs: OrderedDict[str, OtaState] | None = None

    def _load(self) -> OrderedDict[str, OtaState]:
        if self._jobs is not None:
            return self._jobs
        jobs: OrderedDict[str, OtaState] = OrderedDict()
        try:
            with self.path.open("rb") as f:
                doc = json.loads(f.read(MAX_JOURNAL_BYTES).decode("utf-8"))
            for job_id, state in doc["jobs"]:
                jobs[str(job_id)] = OtaState(state)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as exc:
            log.warning("finished-jobs file %s is corrupt, starting a new one: %s", self.path, exc)
            jobs.clear()
        self._jobs = jobs
        return jobs

    def state_of(self, job_id: str) -> OtaState | None:
        return self._load().get(job_id)

    def record(self, job_id: str, state: OtaState) -> None:
        jobs = self._load()
        if jobs.get(job_id) == state:
            return
        jobs.pop(job_id, None)
        jobs[job_id] = state
        while len(jobs) > self.capacity:
            jobs.popitem(last=False)
        doc = {"jobs": [[k, v.value] for k, v in jobs.items()]}
        write_atomically(self.path, json.dumps(doc, separators=(",", ":")).encode("utf-8"))
