"""Signal sources: where a device's samples come from, and how the agent config's ``sources:`` list
becomes running sources.

Each entry of ``sources:`` is checked here, key by key, so a typo in a config names the source and the
key instead of surfacing later as a missing signal.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal

from fleetloop_agent.sources import can_config
from fleetloop_agent.sources.base import ORIGINS, SignalSource
from fleetloop_agent.sources.can_replay import CanReplaySource
from fleetloop_agent.sources.csv_replay import TIME_FORMATS, CsvReplaySource
from fleetloop_agent.sources.live import DeviceClock
from fleetloop_agent.sources.machine_kinds import BUILDERS as _MACHINE_BUILDERS
from fleetloop_agent.sources.machine_kinds import KEYS as _MACHINE_KEYS
from fleetloop_shared.choices import check_choice
from fleetloop_shared.errors import ConfigError
from fleetloop_shared.yaml_marks import location

__all__ = ["CanReplaySource", "CsvReplaySource", "SignalSource", "build_source"]

_MISSING: Final = object()

_CAN_KEYS: Final = ("kind", "name", "frames", "dbc", "bus", "mapping", "include_unmapped", "origin")
_CSV_KEYS: Final = (
    "kind",
    "name",
    "path",
    "time_column",
    "time_format",
    "delimiter",
    "group",
    "columns",
    "origin",
)
# The machine's own buses, adapters and servers: CAN, J1939 and OBD-II (can_config); PLC gateways, home
# hubs and robots (machine_kinds). Each module holds its kinds' keys and builders.
KINDS: Final = ("can_replay", "csv_replay", *can_config.KEYS, *_MACHINE_BUILDERS)


class _SpecReader:
    """Typed access to one ``sources:`` entry; every failure is a ConfigError naming source and key."""

    def __init__(self, spec: Mapping[str, Any], label: str, base_dir: Path, allowed: tuple[str, ...]) -> None:
        self.spec = spec
        self.label = label
        self.base_dir = base_dir
        unknown = [k for k in spec if k not in allowed]
        if unknown:
            where, key = location(spec, unknown[0]), str(unknown[0])
            raise ConfigError(f"{where}{label}: unknown key {key!r} (expected {', '.join(allowed)})")

    def fail(self, key: str, reason: str) -> ConfigError:
        return ConfigError(f"{location(self.spec, key)}{self.label}: key {key!r}: {reason}")

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        value = self.spec.get(key, _MISSING)
        if value is _MISSING or value is None:
            if default is _MISSING:
                raise ConfigError(f"{location(self.spec)}{self.label}: missing key {key!r}")
            return default
        return value

    def string(self, key: str, default: Any = _MISSING, *, choices: tuple[str, ...] = ()) -> str:
        value = self.raw(key, default)
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"expected a non-empty string, got {value!r}")
        if choices:
            check_choice(value, choices, error=lambda problem: self.fail(key, problem))
        return value

    def integer(self, key: str, default: int) -> int:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.fail(key, f"expected a non-negative integer, got {value!r}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {value!r}")
        return value

    def path(self, key: str, *, must_be: Literal["file", "directory", "existing", "any"]) -> Path:
        """A path, relative to the configuration file's folder: an existing ``file`` or ``directory``,
        either (``existing``), or ``any`` (it need not exist yet: a socket the source makes)."""
        value = self.raw(key)
        if not isinstance(value, str | Path) or not str(value):
            raise self.fail(key, f"expected a path, got {value!r}")
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = self.base_dir / path
        if must_be == "directory" and not path.is_dir():
            raise self.fail(key, f"directory not found: {path}")
        if must_be == "file" and not path.is_file():
            raise self.fail(key, f"file not found: {path}")
        if must_be == "existing" and not path.exists():
            raise self.fail(key, f"not found: {path}")
        return path

    def mapping(self, key: str, default: Any = _MISSING) -> Mapping[Any, Any]:
        value = self.raw(key, default)
        if not isinstance(value, Mapping):
            raise self.fail(key, f"expected a mapping, got {type(value).__name__}")
        return value


def _can_source(r: _SpecReader, name: str, start_ns: int) -> CanReplaySource:
    frames = r.path("frames", must_be="directory")
    dbc, mapping, include_unmapped = can_config.dbc_mapping(r)
    bus = r.integer("bus", 0)
    origin = r.string("origin", "recordings", choices=ORIGINS)
    return CanReplaySource(
        frames,
        dbc,
        start_ns=start_ns,
        bus=bus,
        mapping=mapping,
        include_unmapped=include_unmapped,
        name=name,
        origin=origin,
    )


def _csv_source(r: _SpecReader, name: str, start_ns: int) -> CsvReplaySource:
    path = r.path("path", must_be="file")
    time_column = r.string("time_column")
    time_format = r.string("time_format", choices=tuple(TIME_FORMATS))
    delimiter = r.string("delimiter", ",")
    if len(delimiter) != 1:
        raise r.fail("delimiter", f"expected one character, got {delimiter!r}")
    group = r.string("group", name)
    columns: dict[str, tuple[str, str]] = {}
    for column, target in r.mapping("columns").items():
        ok = (
            isinstance(column, str)
            and isinstance(target, list | tuple)
            and len(target) == 2
            and all(isinstance(x, str) for x in target)
            and bool(target[0])
        )
        if not ok:
            raise r.fail("columns", f"entry {column!r} must be [catalog.path, unit], got {target!r}")
        columns[column] = (target[0], target[1])
    if not columns:
        raise r.fail("columns", "maps no column")
    origin = r.string("origin", "recordings", choices=ORIGINS)
    return CsvReplaySource(
        path,
        start_ns=start_ns,
        time_column=time_column,
        time_format=time_format,
        columns=columns,
        delimiter=delimiter,
        group=group,
        name=name,
        origin=origin,
    )


def build_source(
    spec: Mapping[str, Any], *, base_dir: Path, start_ns: int, clock: DeviceClock | None = None
) -> SignalSource:
    """The source one ``sources:`` entry describes; relative paths resolve against ``base_dir`` (the
    config file's directory); live sources stamp with ``clock`` (default: the system clock). Any missing
    or invalid key, or a missing file, is a ConfigError naming the source and the key."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"sources: each entry must be a mapping, got {type(spec).__name__}")
    raw_name = spec.get("name")
    label = f"source {raw_name!r}" if isinstance(raw_name, str) and raw_name else "source"
    kind = spec.get("kind")
    if kind is None:
        raise ConfigError(f"{label}: missing key 'kind' (expected one of {', '.join(KINDS)})")
    check_choice(kind, KINDS, f"{label}: key 'kind':")
    if kind in can_config.KEYS:
        allowed = can_config.KEYS[kind]
    elif kind in _MACHINE_KEYS:
        allowed = _MACHINE_KEYS[kind]
    else:
        allowed = _CAN_KEYS if kind == "can_replay" else _CSV_KEYS
    reader = _SpecReader(spec, label, Path(base_dir), allowed)
    name = reader.string("name")
    try:
        if kind in can_config.KEYS:
            return can_config.build(kind, reader, name, start_ns=start_ns, clock=clock)
        if kind in _MACHINE_BUILDERS:
            return _MACHINE_BUILDERS[kind](reader, name, start_ns, clock)
        if kind == "can_replay":
            return _can_source(reader, name, start_ns)
        return _csv_source(reader, name, start_ns)
    except ConfigError as exc:
        if label in exc.message:
            raise
        raise ConfigError(f"{location(spec)}{label}: {exc.message}") from None
