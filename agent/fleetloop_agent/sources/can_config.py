"""The ``sources:`` entries of the CAN kinds — ``can`` (a live bus), ``can_log`` (a bus log replayed) and
``obd`` (OBD-II over ISO-TP or an ELM327 adapter) — checked key by key before the agent starts.

Everything that can be known without the machine's hardware is checked here: the keys, the DBC and the
mapping against it, the python-can interface name, the PIDs. Whether the bus or adapter is there is
not a configuration question: a live source that cannot open it keeps retrying and says why.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from fleetloop_agent.sources.base import ORIGINS, SignalSource
from fleetloop_agent.sources.can_bus import TIMESTAMPS, CanBusSource, interfaces
from fleetloop_agent.sources.can_log import CanLogSource
from fleetloop_agent.sources.can_signals import (
    DEFAULT_DECODE_FRAMES,
    DEFAULT_DECODE_WAIT_S,
    MAX_DECODE_WAIT_S,
    CanSignalMap,
    DecodeCadence,
    MappingKeyError,
)
from fleetloop_agent.sources.live import DEFAULT_QUEUE_FRAMES, DeviceClock
from fleetloop_agent.sources.obd import DEFAULT_QUEUE_SAMPLES, ObdSource
from fleetloop_agent.sources.obd_link import ELM_PROTOCOLS, Elm327Link, IsoTpLink, ObdLink
from fleetloop_shared.choices import check_choice
from fleetloop_shared.dbc import load_dbc
from fleetloop_shared.errors import ConfigError
from fleetloop_shared.obd_pids import BY_NAME, PIDS
from fleetloop_shared.yaml_marks import location

if TYPE_CHECKING:
    from fleetloop_agent.sources import _SpecReader

_SIGNAL_KEYS: Final = ("dbc", "mapping", "include_unmapped", "j1939", "decode_frames", "decode_wait")
KEYS: Final[dict[str, tuple[str, ...]]] = {
    "can": (
        "kind",
        "name",
        "interface",
        "channel",
        "bitrate",
        "fd",
        *_SIGNAL_KEYS,
        "timestamps",
        "queue_frames",
        "filters",
        "options",
    ),
    "can_log": ("kind", "name", "path", "bus", *_SIGNAL_KEYS, "speed", "loop", "origin"),
    "obd": (
        "kind",
        "name",
        "transport",
        "interface",
        "channel",
        "options",
        "request_id",
        "response_id",
        "extended",
        "port",
        "baudrate",
        "protocol",
        "pids",
        "paths",
        "vin",
        "vin_every",
        "multi_pid",
        "timeout",
        "queue_samples",
    ),
}
OBD_TRANSPORTS: Final = ("isotp", "elm327")


def dbc_mapping(r: _SpecReader) -> tuple[Path, dict[str, str], bool]:
    """``dbc``, ``mapping`` (MESSAGE.SIGNAL → catalog path) and ``include_unmapped`` of a CAN source
    (live or replayed: one reading, one set of messages)."""
    dbc = r.path("dbc", must_be="file")
    mapping: dict[str, str] = {}
    for k, v in r.mapping("mapping", {}).items():
        if not isinstance(k, str) or not isinstance(v, str) or not k or not v:
            raise r.fail("mapping", f"entries must be MESSAGE.SIGNAL: catalog.path strings, got {k!r}: {v!r}")
        mapping[k] = v
    include_unmapped = r.boolean("include_unmapped", False)
    if not mapping and not include_unmapped:
        raise r.fail("mapping", "maps no signal (give a mapping or include_unmapped: true)")
    return dbc, mapping, include_unmapped


def _signals(r: _SpecReader, name: str) -> CanSignalMap:
    dbc, mapping, include_unmapped = dbc_mapping(r)
    try:
        return CanSignalMap(load_dbc(dbc), mapping, include_unmapped=include_unmapped, source=name)
    except MappingKeyError as exc:  # FILE:LINE:COL of the key itself, not of the source entry
        written = r.spec.get("mapping")
        where = location(written, exc.key) if isinstance(written, Mapping) else ""
        raise ConfigError(f"{where or location(r.spec, 'mapping')}{r.label}: {exc.message}") from None


def _cadence(r: _SpecReader) -> DecodeCadence:
    """``decode_frames`` (decode once this many frames are pending) and ``decode_wait`` (seconds: or once
    the oldest has waited this long; 0 decodes at every tick)."""
    frames = r.raw("decode_frames", DEFAULT_DECODE_FRAMES)
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise r.fail("decode_frames", f"expected a number of frames >= 1, got {frames!r}")
    wait = r.raw("decode_wait", DEFAULT_DECODE_WAIT_S)
    if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait <= MAX_DECODE_WAIT_S:
        raise r.fail("decode_wait", f"expected seconds between 0 and {MAX_DECODE_WAIT_S:g}, got {wait!r}")
    return DecodeCadence.seconds(frames, float(wait))


def _number(r: _SpecReader, key: str, default: float) -> float:
    value = r.raw(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise r.fail(key, f"expected a number > 0, got {value!r}")
    return float(value)


def _can_bus(r: _SpecReader, name: str, clock: DeviceClock | None) -> CanBusSource:
    known = interfaces()
    interface = r.string("interface", "socketcan")
    if interface not in known:
        raise r.fail(
            "interface", f"python-can has no interface {interface!r} here (known: {', '.join(sorted(known))})"
        )
    channel = r.raw("channel")
    if not isinstance(channel, str | int) or isinstance(channel, bool) or str(channel) == "":
        raise r.fail("channel", f"expected a channel name (can0, vcan0, ws://host:port/), got {channel!r}")
    options: dict[str, Any] = {str(k): v for k, v in r.mapping("options", {}).items()}
    if r.spec.get("bitrate") is not None:
        options["bitrate"] = r.integer("bitrate", 0)
    queue_frames = r.integer("queue_frames", DEFAULT_QUEUE_FRAMES)
    if queue_frames < 1:
        raise r.fail("queue_frames", "expected at least 1")
    return CanBusSource(
        _signals(r, name),
        interface=interface,
        channel=str(channel),
        name=name,
        options=options,
        fd=r.boolean("fd", False),
        j1939=r.boolean("j1939", False),
        timestamps=r.string("timestamps", "receive", choices=TIMESTAMPS),
        queue_frames=queue_frames,
        filters=r.boolean("filters", True),
        cadence=_cadence(r),
        clock=clock,
    )


def _can_log(r: _SpecReader, name: str, start_ns: int) -> CanLogSource:
    path = r.path("path", must_be="existing")
    bus = r.spec.get("bus")
    if bus is not None and (isinstance(bus, bool) or not isinstance(bus, int) or bus < 0):
        raise r.fail("bus", f"expected a bus number (0, 1, ...), got {bus!r}")
    return CanLogSource(
        path,
        _signals(r, name),
        start_ns=start_ns,
        bus=bus,
        speed=_number(r, "speed", 1.0),
        loop=r.boolean("loop", True),
        j1939=r.boolean("j1939", False),
        name=name,
        origin=r.string("origin", "recordings", choices=ORIGINS),
        cadence=_cadence(r),
    )


def _pid(r: _SpecReader, key: str, value: Any) -> int:
    """A PID named (``RPM``), in hex (``"0x0C"``, ``"0C"``) or as a number."""
    if isinstance(value, str) and value.upper() in BY_NAME:
        return BY_NAME[value.upper()].pid
    try:
        pid = value if isinstance(value, int) and not isinstance(value, bool) else int(str(value), 16)
    except ValueError:
        pid = -1
    if pid not in PIDS:
        raise r.fail(key, f"unknown PID {value!r} (known: {', '.join(sorted(BY_NAME))})")
    return pid


def _obd(r: _SpecReader, name: str, clock: DeviceClock | None) -> ObdSource:
    transport = r.string("transport", choices=OBD_TRANSPORTS)
    factory: Callable[[], ObdLink]
    if transport == "isotp":
        interface = r.string("interface", "socketcan")
        if interface not in interfaces():
            raise r.fail("interface", f"python-can has no interface {interface!r} here")
        channel = str(r.raw("channel"))
        options = {str(k): v for k, v in r.mapping("options", {}).items()}
        request_id, response_id = r.integer("request_id", 0x7E0), r.integer("response_id", 0x7E8)
        extended = r.boolean("extended", False)
        for key in ("port", "baudrate", "protocol"):
            if key in r.spec:
                raise r.fail(key, "belongs to transport elm327, not isotp")

        def factory() -> ObdLink:
            return IsoTpLink(
                interface,
                channel,
                options=options,
                request_id=request_id,
                response_id=response_id,
                extended=extended,
            )

    else:
        port = r.string("port")
        baudrate = r.integer("baudrate", 38400)
        protocol = str(r.raw("protocol", "0"))
        check_choice(
            protocol,
            ELM_PROTOCOLS,
            error=lambda problem: r.fail("protocol", f"{problem} (the CAN protocols)"),
        )
        for key in ("interface", "channel", "options", "request_id", "response_id", "extended"):
            if key in r.spec:
                raise r.fail(key, "belongs to transport isotp, not elm327")

        def factory() -> ObdLink:
            return Elm327Link(port, baudrate=baudrate, protocol=protocol)

    intervals: dict[int, float] = {}
    for key, interval in r.mapping("pids").items():
        if isinstance(interval, bool) or not isinstance(interval, int | float) or not interval > 0:
            raise r.fail("pids", f"{key}: expected a polling interval in seconds > 0, got {interval!r}")
        intervals[_pid(r, "pids", key)] = float(interval)
    if not intervals:
        raise r.fail("pids", "names no PID to poll")
    paths: dict[int, str] = {}
    for key, path in r.mapping("paths", {}).items():
        pid = _pid(r, "paths", key)
        if pid not in intervals or not isinstance(path, str) or not path:
            raise r.fail("paths", f"{key}: expected a catalog path for a polled PID, got {path!r}")
        paths[pid] = path
    multi = r.raw("multi_pid", "auto")
    if multi not in ("auto", True, False):
        raise r.fail("multi_pid", f"expected auto, true or false, got {multi!r}")
    return ObdSource(
        factory,
        intervals,
        name=name,
        paths=paths,
        vin=r.boolean("vin", True),
        vin_every_s=_number(r, "vin_every", 60.0) if "vin_every" in r.spec else 0.0,
        multi_pid=None if multi == "auto" else bool(multi),
        timeout_s=_number(r, "timeout", 1.0),
        queue_samples=max(1, r.integer("queue_samples", DEFAULT_QUEUE_SAMPLES)),
        clock=clock,
    )


def build(kind: str, r: _SpecReader, name: str, *, start_ns: int, clock: DeviceClock | None) -> SignalSource:
    """The source of one checked ``sources:`` entry of a CAN kind."""
    if kind == "can":
        return _can_bus(r, name, clock)
    if kind == "can_log":
        return _can_log(r, name, start_ns)
    if kind == "obd":
        return _obd(r, name, clock)
    raise ConfigError(f"{r.label}: key 'kind': not a CAN kind: {kind!r}")
