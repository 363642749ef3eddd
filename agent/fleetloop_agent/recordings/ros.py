"""Robot recordings: MCAP files of ROS 2 messages (through mcap and mcap-ros2-support) and ROS bags — ROS 1
``.bag`` files and ROS 2 bag directories (through rosbags).

Each topic is one group (a message's fields were sampled together) timed by the message's log time;
each numeric, boolean or text leaf of the message is a signal named by its field path
(``linear_acceleration.x``, ``orientation_covariance[4]``), so a signal's path is ``<topic>/<field>``.
Arrays longer than :data:`MAX_ARRAY` and byte blobs (images, point clouds) are left out with a note, as is
a field that some messages of a topic lack. Faults on outside bytes become one ConfigError naming the
file. This is the only module that imports mcap, mcap_ros2 and rosbags, and only when a file is read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import numpy as np

from fleetloop_agent.recordings.recording import Note, Recording, SignalGroup
from fleetloop_agent.recordings.text import MAX_INPUT_BYTES, check_size
from fleetloop_shared.errors import ConfigError

#: Longest array of scalars flattened into signals (a 3×3 covariance is 9).
MAX_ARRAY: Final = 16
_SCALARS = (bool, int, float, str, np.bool_, np.integer, np.floating)


def is_robot_log(path: Path) -> bool:
    """An MCAP file, a ROS 1 bag, or a ROS 2 bag directory (its ``metadata.yaml``)."""
    path = Path(path)
    if path.is_dir():
        return (path / "metadata.yaml").is_file()
    return path.suffix.lower() in (".mcap", ".bag")


def _fields(msg: Any) -> list[str]:
    if dataclasses.is_dataclass(msg):
        return [f.name for f in dataclasses.fields(msg) if not f.name.startswith("_")]
    slots = getattr(type(msg), "__slots__", None)
    if slots:
        return [s for s in slots if not s.startswith("_")]
    return []


def flatten(msg: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(field path, scalar) of every leaf of a decoded message; long arrays and blobs are skipped
    (reported as (path, ``...``))."""
    for name in _fields(msg):
        value = getattr(msg, name)
        path = f"{prefix}{name}"
        if isinstance(value, _SCALARS):
            yield path, value.item() if isinstance(value, np.generic) else value
        elif isinstance(value, bytes | bytearray | memoryview):
            yield path, ...
        elif isinstance(value, list | tuple | np.ndarray):
            items = list(value)
            if len(items) > MAX_ARRAY or not all(isinstance(v, _SCALARS) for v in items):
                yield path, ...
                continue
            for i, v in enumerate(items):
                yield f"{path}[{i}]", v.item() if isinstance(v, np.generic) else v
        elif _fields(value):
            yield from flatten(value, path + ".")


class _Topics:
    """Columns of each topic as messages arrive; a field not in every message is dropped with a note."""

    def __init__(self) -> None:
        self.t: dict[str, list[int]] = {}
        self.cols: dict[str, dict[str, list[Any]]] = {}
        self.notes: list[Note] = []
        self._skipped: set[tuple[str, str]] = set()
        self._ragged: set[tuple[str, str]] = set()

    def add(self, topic: str, t_ns: int, msg: Any) -> None:
        times = self.t.setdefault(topic, [])
        cols = self.cols.setdefault(topic, {})
        row = len(times)
        seen = set()
        for path, value in flatten(msg):
            if value is ...:
                if (topic, path) not in self._skipped:
                    self._skipped.add((topic, path))
                    self.notes.append(
                        Note(
                            f"{topic}: {path} is an array or blob too large for signals; left out",
                            f"{topic}/{path}",
                        )
                    )
                continue
            col = cols.get(path)
            if col is None:
                if row:
                    self._ragged.add((topic, path))
                col = cols[path] = [None] * row
            col.append(value)
            seen.add(path)
        for path, col in cols.items():
            if path not in seen:
                self._ragged.add((topic, path))
                col.append(None)
        times.append(t_ns)

    def recording(self) -> Recording:
        groups = []
        for topic, times in self.t.items():
            t = np.asarray(times, dtype=np.int64)
            order = np.argsort(t, kind="stable")
            columns: dict[str, Any] = {}
            for path, values in self.cols[topic].items():
                if (topic, path) in self._ragged:
                    self.notes.append(
                        Note(f"{topic}: {path} is missing from some messages; left out", f"{topic}/{path}")
                    )
                    continue
                first = values[0]
                dtype: Any = bool if isinstance(first, bool) else object if isinstance(first, str) else float
                if isinstance(first, int) and not isinstance(first, bool):
                    dtype = np.int64 if all(-(2**63) <= v < 2**63 for v in values) else float
                arr = (
                    np.asarray(values, dtype=dtype)
                    if dtype is not object
                    else np.asarray(values, dtype=object)
                )
                columns[path] = arr[order]
            if columns:
                groups.append(SignalGroup(topic, t[order], columns))
        return Recording(groups, notes=self.notes, qualified=True, time_unit="ns")


def _size(path: Path, limit: int) -> None:
    if path.is_dir():
        total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        if total > limit:
            raise ConfigError(f"{path}: {total} bytes exceeds the {limit}-byte limit for one recording")
    else:
        check_size(path, limit)


def read_mcap(path: Path, *, topics: set[str] | None = None, limit: int = MAX_INPUT_BYTES) -> Recording:
    """Every ROS 2 (CDR) message of an MCAP file, by topic (``topics``: only those)."""
    path = Path(path)
    _size(path, limit)
    try:
        from mcap.reader import make_reader
        from mcap_ros2.decoder import DecoderFactory
    except ImportError:
        raise ConfigError(
            f"{path}: reading MCAP needs mcap and mcap-ros2-support: pip install 'fleetloop[robot]'"
        ) from None
    out = _Topics()
    try:
        with path.open("rb") as fh:
            reader = make_reader(fh, decoder_factories=[DecoderFactory()])
            for _schema, channel, message, decoded in reader.iter_decoded_messages(
                topics=sorted(topics) if topics else None
            ):
                out.add(channel.topic, int(message.log_time), decoded)
    except Exception as exc:  # mcap's and the CDR decoder's errors on outside bytes: one line
        raise ConfigError(
            f"{path}: not a readable MCAP file of ROS 2 messages ({_first_line(exc)})"
        ) from None
    return out.recording()


def read_rosbag(path: Path, *, topics: set[str] | None = None, limit: int = MAX_INPUT_BYTES) -> Recording:
    """Every message of a ROS 1 ``.bag`` or a ROS 2 bag directory, by topic (``topics``: only those).
    Message types come from the bag's own definitions, else from ROS 2 Humble's standard types."""
    path = Path(path)
    _size(path, limit)
    try:
        from rosbags.highlevel import AnyReader
        from rosbags.typesys import Stores, get_typestore
    except ImportError:
        raise ConfigError(f"{path}: reading ROS bags needs rosbags: pip install 'fleetloop[robot]'") from None
    out = _Topics()
    try:
        with AnyReader([path], default_typestore=get_typestore(Stores.ROS2_HUMBLE)) as reader:
            wanted = [c for c in reader.connections if not topics or c.topic in topics]
            for connection, timestamp, raw in reader.messages(connections=wanted):
                out.add(connection.topic, int(timestamp), reader.deserialize(raw, connection.msgtype))
    except Exception as exc:  # rosbags' reader and deserializer errors on outside bytes: one line
        raise ConfigError(f"{path}: not a readable ROS bag ({_first_line(exc)})") from None
    return out.recording()


def read_robot_log(path: Path, *, topics: set[str] | None = None, limit: int = MAX_INPUT_BYTES) -> Recording:
    """An MCAP file or a ROS bag, by what :func:`is_robot_log` tells."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".mcap":
        return read_mcap(path, topics=topics, limit=limit)
    if is_robot_log(path):
        return read_rosbag(path, topics=topics, limit=limit)
    raise ConfigError(f"{path}: not an MCAP file, a ROS 1 .bag or a ROS 2 bag directory")


def robot_log_topics(path: Path) -> list[str]:
    """The topics a robot recording holds (from its summary or connections, without reading messages)."""
    path = Path(path)
    try:
        if path.is_file() and path.suffix.lower() == ".mcap":
            from mcap.reader import make_reader

            with path.open("rb") as fh:
                summary = make_reader(fh).get_summary()
            return sorted({c.topic for c in summary.channels.values()}) if summary else []
        from rosbags.highlevel import AnyReader

        with AnyReader([path]) as reader:
            return sorted({c.topic for c in reader.connections})
    except Exception as exc:  # the same outside bytes read_robot_log refuses
        raise ConfigError(f"{path}: not a readable robot recording ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
