"""Captures as an operator opens them: the list by device, campaign and time; one capture's signals,
trigger instant and windows; its series for the timeline; its rows as a file for other tools.

The trigger instant is the capture's own: an agent names a capture ``<campaign>-<fire time ns>``
(``fleetloop_agent.capture.capture_id_for``). The pre/post windows are the campaign's when it is still
applied, else what the data spans around the trigger. A capture whose last segment arrived less than
:data:`ARRIVING_S` ago may still be growing: it is listed as ``arriving`` and the console says so.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from fleetloop_cloud.fleet_store.captures import ENUM_LIMIT, Bands, CaptureReader, Envelope, SignalStats
from fleetloop_cloud.fleet_store.exports import export_capture, export_format
from fleetloop_cloud.repositories.interfaces import CampaignRepository, DeviceRepository, SegmentRepository
from fleetloop_cloud.repositories.records import CaptureRecord
from fleetloop_cloud.services.access import Access, Caller
from fleetloop_cloud.services.query import record_read
from fleetloop_shared.classification import FULL_VIEW, ClassView, SignalClass
from fleetloop_shared.errors import NotFoundError, StateError, UserError
from fleetloop_shared.rules import parse_campaign

#: A capture whose newest segment is younger than this may still be arriving.
ARRIVING_S = 15.0
#: Captures whose signal statistics are kept (the ones opened last).
STATS_CACHED = 64
#: Captures one list returns at most (the newest).
MAX_LIST = 10_000
#: Samples one export holds at most: the file is made in memory (a million samples peak at ~215 MB of
#: Python heap as MCAP, ~170 MB as CSV: benchmarks/console.py); a larger capture is refused with a
#: pointer to SQL, and counted.
MAX_EXPORT_SAMPLES = 2_000_000
_FIRE_TIME = re.compile(r"-(\d{1,19})$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class CaptureView:
    capture: CaptureRecord
    #: ``complete`` or ``arriving`` (segments came in the last :data:`ARRIVING_S` seconds).
    state: str


@dataclass(frozen=True)
class SignalInfo:
    signal: str
    #: ``number`` (drawn as a line), ``enum`` or ``text`` (drawn as state bands).
    kind: str
    samples: int
    first_ns: int
    last_ns: int
    unit: str


@dataclass(frozen=True)
class CaptureDetail(CaptureView):
    """A capture as listed, with its trigger, its windows and its signals."""

    #: The instant the trigger fired (None for a capture not named by an agent).
    trigger_ns: int | None
    pre_ns: int
    post_ns: int
    #: ``campaign`` (the campaign's collect.pre/post) or ``data`` (what the samples span).
    windows_from: str
    signals: tuple[SignalInfo, ...]
    #: Two signals a trajectory is drawn from (x then y: longitude, latitude), or empty.
    trajectory: tuple[str, ...]


@dataclass(frozen=True)
class Series:
    from_ns: int
    to_ns: int
    columns: int
    lines: tuple[Envelope, ...]
    bands: tuple[Bands, ...]


@dataclass(frozen=True)
class CaptureFile:
    filename: str
    media_type: str
    data: bytes


def signal_kind(stats: SignalStats) -> str:
    """How a signal is drawn: text as bands, integers of few values (booleans, gears) as bands, the
    rest as a line."""
    if stats.texts:
        return "text"
    if stats.integers and stats.distinct <= ENUM_LIMIT:
        return "enum"
    return "number" if stats.numbers else "text"


def trajectory_of(signals: Sequence[str]) -> tuple[str, ...]:
    """(x, y) signals to draw a path from: ``*.Longitude``/``*.Latitude`` siblings, else
    ``*Position*.X``/``.Y`` siblings; empty when the capture has neither."""
    present = set(signals)
    for signal in sorted(present):
        parent, _, leaf = signal.rpartition(".")
        if leaf == "Latitude" and f"{parent}.Longitude" in present:
            return (f"{parent}.Longitude", signal)
    for signal in sorted(present):
        parent, _, leaf = signal.rpartition(".")
        if leaf in ("X", "x") and "position" in parent.lower():
            y = f"{parent}.{'Y' if leaf == 'X' else 'y'}"
            if y in present:
                return (signal, y)
    return ()


def trigger_time(capture: CaptureRecord) -> int | None:
    """The fire time an agent wrote into the capture id, when it did (and it is within the data's day)."""
    m = _FIRE_TIME.search(capture.capture_id)
    if not m or not capture.capture_id.startswith(f"{capture.campaign}-"):
        return None
    t = int(m.group(1))
    return t if t < 2**63 else None


class StatsCache:
    """The signals of the captures opened last: a timeline asks for a capture's series again with every
    zoom, and its signals only change when a segment of it arrives (its segment count changes then).
    Bounded: the :data:`STATS_CACHED` captures used last (least recently used dropped)."""

    def __init__(self, reader: CaptureReader) -> None:
        self._reader = reader
        self._lock = threading.Lock()
        self._cached: OrderedDict[tuple[object, ...], list[SignalStats]] = OrderedDict()

    def of(self, capture: CaptureRecord, view: ClassView = FULL_VIEW) -> list[SignalStats]:
        """Per view: a role's signal list never comes from another role's read."""
        key = (capture.device_id, capture.capture_id, capture.segments, capture.samples,
               tuple(sorted(view.limited().items())), view.classification)  # fmt: skip
        with self._lock:
            if key in self._cached:
                self._cached.move_to_end(key)
                return self._cached[key]
        stats = self._reader.signals(capture.device_id, capture.capture_id, view=view)
        with self._lock:
            self._cached[key] = stats
            while len(self._cached) > STATS_CACHED:
                self._cached.popitem(last=False)
        return stats

    def forget(self, device_id: str) -> None:
        """Drop what is held of ``device_id``'s captures (its data was erased)."""
        with self._lock:
            for key in [k for k in self._cached if k[0] == device_id]:
                del self._cached[key]


class CaptureService:
    def __init__(
        self,
        segments: SegmentRepository,
        devices: DeviceRepository,
        campaigns: CampaignRepository,
        reader: CaptureReader,
        access: Access,
    ) -> None:
        self._segments = segments
        self._devices = devices
        self._campaigns = campaigns
        self._reader = reader
        self._access = access
        self._stats = StatsCache(reader)
        #: Drops what the console's timeline holds of a device's captures (after an erasure).
        self.forget_device = self._stats.forget
        #: Exports refused for holding more than :data:`MAX_EXPORT_SAMPLES`.
        self.exports_refused_total = 0

    def list(
        self,
        caller: Caller,
        now: float,
        *,
        device: str | None = None,
        campaign: str | None = None,
        since_ns: int | None = None,
        until_ns: int | None = None,
        limit: int = MAX_LIST,
    ) -> list[CaptureView]:
        """Captures by first arrival, only the newest ``limit`` of those matching."""
        self._access.operator(caller, "query")
        found = [
            c for c in self._segments.captures()
            if (device is None or c.device_id == device) and (campaign is None or c.campaign == campaign)
            and (since_ns is None or c.last_ns >= since_ns) and (until_ns is None or c.first_ns <= until_ns)
        ]  # fmt: skip
        return [CaptureView(c, _state(c, now)) for c in found[-max(1, min(limit, MAX_LIST)) :]]

    def _find(self, capture_id: str, device: str | None) -> CaptureRecord:
        found = [c for c in self._segments.captures()
                 if c.capture_id == capture_id and (device is None or c.device_id == device)]  # fmt: skip
        if not found:
            where = f" of device {device!r}" if device else ""
            raise NotFoundError(f"no capture {capture_id!r}{where} has arrived")
        if len(found) > 1:
            devices = ", ".join(sorted(c.device_id for c in found))
            raise StateError(f"capture {capture_id!r} exists on devices {devices}: name the device")
        return found[0]

    def detail(self, caller: Caller, capture_id: str, device: str | None, now: float) -> CaptureDetail:
        self._access.operator(caller, "captures.get")
        capture = self._find(capture_id, device)
        stats = self._stats.of(capture, self._access.view(caller))
        units = self._units(capture.device_id)
        signals = tuple(
            SignalInfo(s.signal, signal_kind(s), s.samples, s.first_ns, s.last_ns, units.get(s.signal, ""))
            for s in stats
        )
        trigger = trigger_time(capture)
        pre, post, windows_from = self._windows(capture, trigger)
        return CaptureDetail(
            capture, _state(capture, now), trigger, pre, post, windows_from, signals,
            trajectory_of([s.signal for s in signals if s.kind == "number"]),
        )  # fmt: skip

    def _units(self, device_id: str) -> dict[str, str]:
        record = self._devices.get(device_id)
        if record is None:
            return {}
        return {str(s.get("path", "")): str(s.get("unit", "") or "") for s in record.catalog}

    def _windows(self, capture: CaptureRecord, trigger: int | None) -> tuple[int, int, str]:
        if trigger is None:
            return 0, 0, "data"
        for doc in self._campaigns.desired().campaigns:
            if doc.name == capture.campaign:
                try:
                    spec = parse_campaign(doc.document, source=doc.name)
                except UserError:
                    break
                return spec.pre_ns, spec.post_ns, "campaign"
        return max(0, trigger - capture.first_ns), max(0, capture.last_ns - trigger), "data"

    def series(
        self,
        caller: Caller,
        capture_id: str,
        device: str | None,
        signals: Sequence[str],
        *,
        from_ns: int | None,
        to_ns: int | None,
        columns: int,
    ) -> Series:
        """The ``signals`` over a window (the whole capture by default): lines reduced to ``columns``
        plot columns, enumerations as bands. UserError naming a signal the capture does not hold."""
        self._access.operator(caller, "captures.get")
        capture = self._find(capture_id, device)
        view = self._access.view(caller)
        stats = {s.signal: s for s in self._stats.of(capture, view)}
        unknown = [s for s in signals if s not in stats]
        if unknown:
            raise UserError(f"capture {capture_id!r} holds no signal {unknown[0]!r}")
        start = capture.first_ns if from_ns is None else from_ns
        end = capture.last_ns if to_ns is None else to_ns
        numeric = [s for s in signals if signal_kind(stats[s]) == "number"]
        states = [s for s in signals if signal_kind(stats[s]) != "number"]
        lines, bands = self._reader.series(capture.device_id, capture.capture_id, numeric, states, start, end,
                                           columns, view=view)  # fmt: skip
        return Series(start, end, columns, tuple(lines), tuple(bands))

    def export(
        self, caller: Caller, capture_id: str, device: str | None, fmt_name: str, now: float | None = None
    ) -> CaptureFile:
        """The capture's rows as an MCAP, Parquet or CSV file, as the caller's view shows them; an
        access record in the audit log names the capture, the format, the rows and the classes read."""
        self._access.operator(caller, "captures.export")
        fmt = export_format(fmt_name)
        capture = self._find(capture_id, device)
        if capture.samples > MAX_EXPORT_SAMPLES:
            self.exports_refused_total += 1
            raise UserError(f"capture {capture_id!r} holds {capture.samples:,} samples and an export at most "
                            f"{MAX_EXPORT_SAMPLES:,}: select its rows in parts with SQL (POST /v1/query, "
                            "docs/query.md)")  # fmt: skip
        view, touched = self._access.view(caller), set[SignalClass]()
        table = self._reader.rows(capture.device_id, capture.capture_id, view=view, touched=touched)
        record_read(self._access, caller, "captures.export", f"{capture.device_id}/{capture.capture_id}",
                    time.time() if now is None else now, view, touched,
                    {"capture_id": capture.capture_id, "device_id": capture.device_id, "format": fmt.name,
                     "rows": table.num_rows})  # fmt: skip
        if table.num_rows == 0:
            raise NotFoundError(f"capture {capture_id!r} has no rows in the fleet store yet")
        metadata = {"capture_id": capture.capture_id, "device_id": capture.device_id,
                    "campaign": capture.campaign, "trigger_ns": str(trigger_time(capture) or "")}  # fmt: skip
        data = export_capture(table, fmt, metadata)
        name = _UNSAFE.sub("_", f"{capture.device_id}_{capture.capture_id}")
        return CaptureFile(f"{name}{fmt.extension}", fmt.media_type, data)


def _state(capture: CaptureRecord, now: float) -> str:
    return "arriving" if now - capture.last_received < ARRIVING_S else "complete"
