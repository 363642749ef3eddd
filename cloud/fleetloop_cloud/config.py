"""The coordinator's configuration: one YAML file (``cloud serve --config cloud.yaml``) and the flags.

:data:`KEYS` is the one table of both — each key's dotted path in the file, the ``cloud serve`` flag
that sets it too (where there is one), how its value is checked, its default and what it means — so
every flag is also a key, and a flag given on the command line overrides the file. The CLI builds its
``cloud serve`` options from this table; ``packaging/config/cloud.yaml`` is the commented default.

Mistakes are refused before anything starts, each saying where: ``FILE:LINE:COL: key: what is wrong``
for the file (the key's position, read with :mod:`fleetloop_shared.yaml_marks` like the agent's
config), ``--flag: what is wrong`` for a flag. Unknown keys are refused too, with the nearest known
one: a misspelt limit silently left at its default is a mistake found only under load.
"""

from __future__ import annotations

import difflib
import math
import re
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fleetloop_cloud.fleet_store.query import MAX_ROWS_LIMIT, QueryLimits
from fleetloop_cloud.fleet_store.settings import FORMATS, TableSettings
from fleetloop_cloud.grpc_api import GrpcTls
from fleetloop_cloud.http_api import HttpSettings, HttpTls
from fleetloop_cloud.http_api.routes import ROUTES
from fleetloop_cloud.limits import Limits
from fleetloop_cloud.mqtt_bridge import BridgeSettings
from fleetloop_cloud.repositories.database import redact
from fleetloop_cloud.services.ingest import UPLOAD_BUDGET
from fleetloop_cloud.storage import S3Settings, check_key
from fleetloop_cloud.uploads.scheduler import Budget
from fleetloop_cloud.uploads.staging import StagingLimits
from fleetloop_shared.choices import check_choice
from fleetloop_shared.errors import ConfigError, FleetloopError, RuleError
from fleetloop_shared.networks import NETWORKS
from fleetloop_shared.rules.durations import parse_duration
from fleetloop_shared.yaml_marks import MarkedDict, location, read_config_file

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


class Invalid(Exception):
    """A value a parser refuses; ``where`` (``FILE:LINE:COL: ``) when it knows a closer place."""

    def __init__(self, message: str, where: str = "") -> None:
        super().__init__(message)
        self.where = where


#: A value's check: (the value as written, the folder relative paths resolve against) → the value.
Parser = Callable[[Any, Path], Any]


# -- value parsers ---------------------------------------------------------------------------------
def _text(value: Any, base: Path) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Invalid(f"must be a non-empty string, got {value!r}")
    return value.strip()


def _path(value: Any, base: Path) -> Path:
    path = Path(_text(value, base)).expanduser()
    return path if path.is_absolute() else base / path


def _existing_file(value: Any, base: Path) -> Path:
    path = _path(value, base)
    if not path.is_file():
        raise Invalid(f"no such file: {path}")
    return path


def _switch(value: Any, base: Path) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"must be true or false, got {value!r}")
    return value


def _integer(low: int, high: int) -> Parser:
    def parse(value: Any, base: Path) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise Invalid(f"must be an integer from {low} to {high}, got {value!r}")
        return value

    return parse


_port = _integer(0, 65535)
_SIZE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?$")
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}  # fmt: skip


def parse_size(value: Any) -> int:
    """Bytes as written: an integer, or a number with a unit (``64MiB``, ``1.5 GB``, ``512KiB``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = _SIZE.match(value.strip()) if isinstance(value, str) else None
        if match is None:
            raise Invalid(f"must be a size in bytes like 1048576, 64MiB or 1GB, got {value!r}")
        size = int(float(match[1]) * _SIZE_UNITS[match[2] or "B"])
    if size < 0:
        raise Invalid(f"must not be negative, got {value!r}")
    return size


def _size(value: Any, base: Path) -> int:
    return parse_size(value)


def _positive_size(value: Any, base: Path) -> int:
    size = parse_size(value)
    if size <= 0:
        raise Invalid(f"must be above 0 bytes, got {value!r}")
    return size


def _seconds(value: Any, base: Path) -> float:
    """Seconds: a number, or a duration (``500ms``, ``30s``, ``5m``, ``24h``)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = parse_duration(value) / 1e9
        except RuleError as exc:
            raise Invalid(exc.reason) from None
    else:
        raise Invalid(f"must be seconds (a number) or a duration like 30s, 5m, 24h, got {value!r}")
    if not (math.isfinite(seconds) and seconds > 0):
        raise Invalid(f"must be above 0 seconds, got {value!r}")
    return seconds


def _memory(value: Any, base: Path) -> str:
    text = _text(value, base)
    try:
        QueryLimits(memory_limit=text)
    except FleetloopError as exc:
        raise Invalid(str(exc)) from None
    return text


def _level(value: Any, base: Path) -> str:
    levels = ("debug", "info", "warning", "error", "critical")
    return check_choice(value.lower() if isinstance(value, str) else value, levels, error=Invalid)


def _sizes_by(names: tuple[str, ...], what: str) -> Parser:
    """A mapping of ``names`` (networks, route names) to sizes in bytes."""

    def parse(value: Any, base: Path) -> dict[str, int]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise Invalid(f"must be a mapping of {what} to sizes, got {value!r}")
        out = {}
        for name, size in value.items():
            where = location(value, name)
            if name not in names:
                near = difflib.get_close_matches(str(name), names, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else f"; known: {', '.join(names)}"
                raise Invalid(f"unknown {what[:-1]} {name!r}{hint}", where)
            try:
                out[str(name)] = parse_size(size)
            except Invalid as exc:
                raise Invalid(f"{name}: {exc}", where) from None
        return out

    return parse


def _http_url(what: str, example: str, *, path: bool) -> Parser:
    """An http(s) URL with a host, no query (and no path unless ``path``), without a trailing '/'."""

    def parse(value: Any, base: Path) -> str:
        url = _text(value, base).rstrip("/")
        parts = urllib.parse.urlsplit(url)
        if (parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment
                or (parts.path and not path)):  # fmt: skip
            raise Invalid(f"must be an http(s) URL {what}, like {example}, got {value!r}")
        return url

    return parse


_public_url = _http_url("with a host and no query", "https://fleet.example:8080", path=True)
_endpoint = _http_url("of the S3 service", "https://s3.example.com:9000", path=False)


def _object_prefix(value: Any, base: Path) -> str:
    if value is None or value == "":
        return ""
    text = _text(value, base).strip("/")
    try:
        check_key(text)
    except FleetloopError:
        raise Invalid(f"must be a key prefix of plain names separated by '/', got {value!r}") from None
    return text


def _choice(names: tuple[str, ...]) -> Parser:
    def parse(value: Any, base: Path) -> str:
        return check_choice(value, names, error=Invalid)

    return parse


def _non_negative_seconds(value: Any, base: Path) -> float:
    if value == 0:
        return 0.0
    return _seconds(value, base)


def _broker(value: Any, base: Path) -> str:
    host, _, port = _text(value, base).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise Invalid(f"must be HOST:PORT, got {value!r}")
    return f"{host}:{port}"


def _optional(parse: Parser) -> Parser:
    """``parse``, with null (or an empty string) meaning "not set"."""

    def optional(value: Any, base: Path) -> Any:
        return None if value is None or value == "" else parse(value, base)

    return optional


# -- the table -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Key:
    path: str
    parse: Parser
    default: Any
    help: str
    #: The ``cloud serve`` option setting this key too.
    flag: str | None = None
    #: How argparse converts the flag's text (``bool``: a switch without a value).
    flag_type: type = str


_BUDGET, _STAGING, _QUERY = UPLOAD_BUDGET, StagingLimits(), QueryLimits()
_S3, _TABLES = S3Settings(bucket="defaults"), TableSettings()
_ROUTE_NAMES = tuple(r.name for r in ROUTES if r.max_body)
_file = _optional(_existing_file)

KEYS: tuple[Key, ...] = (
    Key("data_dir", _path, Path("fleetloop-cloud"), "data directory (SQLite, Parquet, artifacts, keys)",
        "--dir"),
    Key("database", _optional(_text), None,
        "metadata in PostgreSQL (postgresql://...) instead of SQLite in the data directory", "--db"),
    Key("keys.dir", _optional(_path), None,
        "online keys from this mounted secret (read-only; FLEETLOOP_KEY_RELEASE_PEM wins over its file) "
        "instead of the data directory's keys/", "--keys-dir"),
    Key("classification.file", _file, None,
        "signal classes (rules: [{fleet, signal, class}] or a catalog with class:) over the built-in "
        "defaults, which decide who sees what in queries and exports (docs/privacy.md)"),
    Key("log_level", _level, "info", "log level", "--log-level"),
    Key("ready_file", _optional(_path), None, "write the bound ports here as JSON once serving",
        "--ready-file"),
    Key("listen.host", _text, "127.0.0.1", "address to listen on (off loopback: TLS on both ports)",
        "--host"),
    Key("listen.grpc_port", _port, 50051, "devices' gRPC port (0: any free port)", "--grpc-port", int),
    Key("listen.http_port", _port, 8080, "HTTP port: REST API, files, /metrics (0: any free port)",
        "--http-port", int),
    Key("public_url", _optional(_public_url), None,
        "URL devices download artifacts from (default: this host and HTTP port)", "--public-url"),
    Key("insecure", _switch, False,
        "lab only: no API tokens (everyone is admin) and no TLS required off loopback", "--insecure", bool),
    Key("tls.http.cert", _file, None, "serve HTTP over TLS with this certificate (and tls.http.key)",
        "--http-cert"),
    Key("tls.http.key", _file, None, "the HTTP server's private key", "--http-key"),
    Key("tls.grpc.cert", _file, None, "serve devices over mTLS with this certificate (and tls.grpc.key)",
        "--grpc-cert"),
    Key("tls.grpc.key", _file, None, "the gRPC server's private key", "--grpc-key"),
    Key("tls.grpc.ca", _file, None, "CA that device certificates must chain to (CN = device id)",
        "--grpc-ca"),
    Key("mqtt.broker", _optional(_broker), None,
        "also serve devices over MQTT 5 through this broker (HOST:PORT, TLS)", "--mqtt"),
    Key("mqtt.ca", _file, None, "CA certificate the broker's certificate is checked against", "--mqtt-ca"),
    Key("mqtt.cert", _file, None, "this coordinator's own certificate (CN in group coordinators)",
        "--mqtt-cert"),
    Key("mqtt.key", _file, None, "its private key", "--mqtt-key"),
    Key("http.workers", _integer(1, 256), HttpSettings().workers,
        "worker threads running the services' blocking calls"),
    Key("http.max_inflight", _integer(1, 100_000), HttpSettings().max_inflight,
        "operator requests handled at once; more are answered 503 at once"),
    Key("http.body_limits", _sizes_by(_ROUTE_NAMES, "routes"), {},
        "largest request body by route name (operationId), over the route's own default"),
    Key("uploads.budget.global_bytes_per_s", _size, UPLOAD_BUDGET.global_bytes_per_s,
        "bytes/s granted in total to devices whose uploads the cloud schedules (cloud.upload.scheduled)"),
    Key("uploads.budget.per_network_bytes_per_s", _sizes_by(NETWORKS, "networks"),
        dict(UPLOAD_BUDGET.per_network_bytes_per_s),
        "bytes/s granted per network type (wifi, cellular, ethernet, other; absent: no cap)"),
    Key("uploads.budget.quantum_bytes", _positive_size, _BUDGET.quantum_bytes,
        "largest single grant (devices with equal priority take turns)"),
    Key("uploads.budget.aging_s", _seconds, _BUDGET.aging_s,
        "a waiting backlog gains one priority level per this long"),
    Key("uploads.budget.forget_after_s", _seconds, _BUDGET.forget_after_s,
        "backlogs not reported for this long are forgotten"),
    Key("uploads.budget.max_devices", _integer(1, 10_000_000), _BUDGET.max_devices,
        "backlogs tracked at most (more are refused until others leave)"),
    Key("uploads.staging.max_upload_bytes", _positive_size, _STAGING.max_upload_bytes,
        "largest resumable (chunked) upload"),
    Key("uploads.staging.max_total_bytes", _positive_size, _STAGING.max_total_bytes,
        "bytes of partial uploads held over all devices (pieces beyond are refused; devices resume)"),
    Key("uploads.staging.max_per_device", _integer(1, 1000), _STAGING.max_per_device,
        "partial uploads per device (a new one evicts that device's oldest)"),
    Key("uploads.staging.ttl_s", _seconds, _STAGING.ttl_s, "partial uploads untouched this long are removed"),
    Key("query.timeout_s", _seconds, _QUERY.timeout_s,
        "longest a SQL query may run: the default and the most a request may ask for"),
    Key("query.memory_limit", _memory, _QUERY.memory_limit, "DuckDB memory per query (1GB, 512MiB)"),
    Key("query.threads", _integer(1, 256), _QUERY.threads, "DuckDB threads per query"),
    Key("query.max_rows", _integer(1, MAX_ROWS_LIMIT), _QUERY.max_rows, "rows a query returns at most"),
    Key("storage.bucket", _optional(_text), None,
        "keep the fleet store, upload staging and artifacts in this S3 bucket (default: the data directory)",
        "--bucket"),
    Key("storage.prefix", _object_prefix, "", "key prefix in the bucket for this deployment's objects"),
    Key("storage.endpoint", _optional(_endpoint), None,
        "URL of an S3-compatible service (MinIO, Ceph, ...); none: AWS", "--s3-endpoint"),
    Key("storage.region", _text, _S3.region, "the bucket's region"),
    Key("storage.credentials_file", _file, None,
        "AWS shared-credentials file (default: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, instance role)"),
    Key("storage.profile", _text, _S3.profile, "profile in the credentials file"),
    Key("storage.request_timeout_s", _seconds, _S3.request_timeout_s,
        "one S3 request's time limit (a slower answer is abandoned and retried)"),
    Key("storage.connect_timeout_s", _seconds, _S3.connect_timeout_s, "time limit to connect to the service"),
    Key("storage.max_attempts", _integer(1, 100), _S3.max_attempts,
        "attempts per S3 request, with backoff, before the caller is told it is unavailable"),
    Key("fleet_store.format", _choice(FORMATS), _TABLES.format,
        "parquet (a Hive-partitioned folder) or iceberg (tables in the database's catalog; needed with "
        "storage.bucket)", "--table-format"),
    Key("fleet_store.batch_wait_s", _non_negative_seconds, _TABLES.batch_wait_s,
        "iceberg: an ingest batch (one commit) waits this long at most for more segments"),
    Key("fleet_store.batch_max_segments", _integer(1, 10_000), _TABLES.batch_max_segments,
        "iceberg: segments in one ingest batch at most"),
    Key("fleet_store.snapshot_retention_s", _seconds, _TABLES.snapshot_retention_s,
        "iceberg: snapshots older than this expire, and files only they referenced are deleted"),
    Key("fleet_store.compact_min_files", _integer(2, 100_000), _TABLES.compact_min_files,
        "iceberg: a partition with this many small files is rewritten as one"),
)  # fmt: skip
_BY_PATH = {k.path: k for k in KEYS}
_BY_FLAG = {k.flag: k for k in KEYS if k.flag}
#: Every mapping a key sits in ("listen", "tls", "tls.http", ...).
_SECTIONS = {k.path.rsplit(".", 1)[0] for k in KEYS if "." in k.path}
_SECTIONS |= {s.rsplit(".", 1)[0] for s in _SECTIONS if "." in s}


def flag_of(path: str) -> str:
    """How a key is named in a message: its flag too, where it has one."""
    flag = _BY_PATH[path].flag
    return f"{path} ({flag})" if flag else path


# -- reading ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CloudConfig:
    """Everything ``cloud serve`` runs with, checked."""

    source: Path | None
    values: Mapping[str, Any]
    #: Where each value came from: "default", "FILE:LINE:COL" or "--flag".
    origins: Mapping[str, str]
    http: HttpSettings
    grpc_tls: GrpcTls | None
    mqtt: BridgeSettings | None
    limits: Limits
    #: The S3 bucket the fleet store and staging live in; None: the data directory.
    storage: S3Settings | None = None
    tables: TableSettings = field(default_factory=TableSettings)

    def __getitem__(self, path: str) -> Any:
        return self.values[path]

    def describe(self) -> dict[str, Any]:
        """The effective settings as nested plain values (``cloud serve --check`` prints them), the
        database URL without its password: what is printed ends up in terminals and tickets."""
        out: dict[str, Any] = {}
        for path, value in self.values.items():
            if path == "database" and value is not None:
                value = redact(value)
            *sections, leaf = path.split(".")
            node = out
            for section in sections:
                node = node.setdefault(section, {})
            node[leaf] = str(value) if isinstance(value, Path) else value
        return out


def _read_file(path: Path) -> Iterator[tuple[str, Any, str]]:
    """(key path, value as written, ``FILE:LINE:COL: ``) of every key in the file; ConfigError for
    an unknown key or a section that is not a mapping."""
    doc = read_config_file(path)

    def walk(mapping: MarkedDict, prefix: str) -> Iterator[tuple[str, Any, str]]:
        for name, value in mapping.items():
            full, where = f"{prefix}{name}", location(mapping, name)
            if full in _BY_PATH:
                yield full, value, where
            elif full in _SECTIONS:
                if value is None:
                    continue
                if not isinstance(value, MarkedDict):
                    raise ConfigError(f"{where}{full}: must be a mapping of settings, got {value!r}")
                yield from walk(value, full + ".")
            else:
                known = sorted({p[len(prefix):].split(".")[0] for p in (*_BY_PATH, *_SECTIONS)
                                if p.startswith(prefix)})  # fmt: skip
                near = difflib.get_close_matches(str(name), known, n=1)
                hint = f"did you mean {near[0]!r}?" if near else f"known here: {', '.join(known)}"
                section = f" in {prefix[:-1]}" if prefix else ""
                raise ConfigError(f"{where}unknown key {name!r}{section} ({hint})")

    yield from walk(doc, "")


def _parse(key: Key, value: Any, base: Path, where: str) -> Any:
    try:
        return key.parse(value, base)
    except Invalid as exc:
        raise ConfigError(f"{exc.where or where}{key.path}: {exc}") from None


def load_cloud_config(path: Path | None, flags: Mapping[str, Any] | None = None) -> CloudConfig:
    """The configuration from the file at ``path`` (None: defaults only) with ``flags`` (key path →
    value, as the flag gave it) over it. ConfigError, with where, for the first mistake."""
    values = {k.path: k.default for k in KEYS}
    origins = dict.fromkeys(values, "default")
    if path is not None:
        base = path.resolve().parent
        for key_path, raw, where in _read_file(path):
            values[key_path] = _parse(_BY_PATH[key_path], raw, base, where)
            origins[key_path] = where.rstrip(": ")
    for key_path, raw in (flags or {}).items():
        key = _BY_PATH[key_path]
        try:
            values[key_path] = key.parse(raw, Path.cwd())
        except Invalid as exc:
            raise ConfigError(f"{key.flag}: {exc}") from None
        origins[key_path] = str(key.flag)
    return _assemble(path, values, origins)


def _together(values: Mapping[str, Any], paths: tuple[str, ...], origins: Mapping[str, str]) -> bool:
    """Whether the keys ``paths`` are all set (True) or none is (False); ConfigError for some."""
    given = [p for p in paths if values[p] is not None]
    if given and len(given) < len(paths):
        missing = [p for p in paths if values[p] is None]
        where = origins[given[0]]
        prefix = f"{where}: " if where != "default" else ""
        raise ConfigError(f"{prefix}{', '.join(map(flag_of, given))} needs "
                          f"{' and '.join(map(flag_of, missing))}")  # fmt: skip
    return bool(given)


def _section(v: Mapping[str, Any], prefix: str, kind: type[T], **given: Any) -> T:
    """The settings of section ``prefix``: each field of ``kind`` from the key of its name in that section
    (``query.threads`` → ``QueryLimits.threads``: a setting is named once, in :data:`KEYS` and in its
    dataclass), and ``given`` for the fields no key sets."""
    keyed = {f.name: v[f"{prefix}.{f.name}"] for f in fields(kind) if f"{prefix}.{f.name}" in v}
    return kind(**keyed, **given)


def _assemble(source: Path | None, v: dict[str, Any], origins: dict[str, str]) -> CloudConfig:
    tls = None
    if _together(v, ("tls.http.cert", "tls.http.key"), origins):
        tls = HttpTls(v["tls.http.cert"], v["tls.http.key"])
    grpc_tls = None
    if _together(v, ("tls.grpc.cert", "tls.grpc.key", "tls.grpc.ca"), origins):
        grpc_tls = GrpcTls(v["tls.grpc.ca"], v["tls.grpc.cert"], v["tls.grpc.key"])
    mqtt = None
    if _together(v, ("mqtt.broker", "mqtt.ca", "mqtt.cert", "mqtt.key"), origins):
        host, _, port = v["mqtt.broker"].rpartition(":")
        mqtt = BridgeSettings(host, int(port), v["mqtt.ca"], v["mqtt.cert"], v["mqtt.key"])
    http = _section(v, "http", HttpSettings, tls=tls, insecure=v["insecure"])
    try:
        limits = Limits(
            upload_budget=_section(v, "uploads.budget", Budget),
            staging=_section(v, "uploads.staging", StagingLimits),
            query=_section(v, "query", QueryLimits),
        )
    except FleetloopError as exc:  # what a key's own check cannot see (DuckDB's memory spelling, ...)
        raise ConfigError(f"{source or 'flags'}: {exc}") from None
    storage = None
    if v["storage.bucket"] is not None:
        try:
            storage = _section(v, "storage", S3Settings)
        except FleetloopError as exc:
            where = origins["storage.bucket"]
            raise ConfigError(f"{where}: storage.bucket: {exc}") from None
    if storage is not None and v["fleet_store.format"] != "iceberg":
        where = origins["storage.bucket"]
        raise ConfigError(f"{where}: storage.bucket needs fleet_store.format: iceberg (--table-format "
                          "iceberg): the Parquet layout lives on local disk only")  # fmt: skip
    tables = _section(v, "fleet_store", TableSettings)
    return CloudConfig(source, v, origins, http, grpc_tls, mqtt, limits, storage, tables)
