"""Replay of a robot recording (MCAP of ROS 2 messages, ROS 1 bag, ROS 2 bag directory), looping forever.

The file is read once, at construction, by the one reader of recordings
(:func:`~fleetloop_agent.recordings.read_robot_log`): each topic is a group, each message field a signal.
A mapping names the fields to deliver (``/imu.linear_acceleration.x: [Robot.Imu.Acceleration.X, m/s^2]``:
topic, a dot, the field path); ``include_unmapped`` adds every other field as ``<topic>/<field>``. All
topics loop together (one period: the recording's duration plus one median sample period), so their
relative timing is what the robot recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fleetloop_agent.recordings import data_type_of, read_robot_log
from fleetloop_agent.recordings.ros import robot_log_topics
from fleetloop_agent.sources.base import GroupAccumulator, ReplayCursor, check_origin, loop_period_ns
from fleetloop_shared.catalog import Catalog
from fleetloop_shared.errors import ConfigError, StateError
from fleetloop_shared.samples import GroupBatch

log = logging.getLogger("fleetloop.agent.sources")


class _Topic:
    def __init__(
        self,
        name: str,
        rel_ns: npt.NDArray[np.int64],
        columns: dict[str, npt.NDArray[Any]],
        cursor: ReplayCursor,
    ) -> None:
        self.name = name
        self.rel_ns = rel_ns
        self.columns = columns
        self.cursor = cursor
        self.ids: dict[str, int] = {}

    def times(self, lo: int, hi: int) -> npt.NDArray[np.int64]:
        return self.rel_ns[lo:hi]


class RosReplaySource:
    """Fields of a robot recording's topics replayed as groups of signals."""

    def __init__(
        self,
        path: Path,
        *,
        start_ns: int,
        mapping: Mapping[str, tuple[str, str]] | None = None,
        include_unmapped: bool = False,
        name: str = "robot",
        origin: str = "recordings",
    ) -> None:
        check_origin(name, origin)
        self.name = name
        self.origin = origin
        wanted: dict[str, dict[str, tuple[str, str]]] = {}
        for key, target in (mapping or {}).items():
            topic, dot, field = str(key).partition(".")
            if not dot or not topic or not field:
                raise ConfigError(
                    f"source {name!r}: mapping key {key!r}: expected TOPIC.FIELD "
                    "(e.g. /imu.linear_acceleration.x)"
                )
            wanted.setdefault(topic, {})[field] = target
        targets = [t[0] for t in (mapping or {}).values()]
        if len(set(targets)) != len(targets):
            raise ConfigError(
                f"source {name!r}: signal {next(t for t in targets if targets.count(t) > 1)!r} "
                "is the target of two keys"
            )
        if not wanted and not include_unmapped:
            raise ConfigError(f"source {name!r}: maps no field (give a mapping or include_unmapped: true)")
        recording = read_robot_log(Path(path), topics=None if include_unmapped else set(wanted))
        for note in recording.notes:
            log.info("source %s: %s", name, note)
        by_topic = {g.name: g for g in recording.groups}
        for topic, fields in wanted.items():
            group = by_topic.get(topic)
            if group is None:
                raise ConfigError(
                    f"source {name!r}: {path} has no topic {topic!r} "
                    f"(topics: {', '.join(robot_log_topics(Path(path))) or 'none'})"
                )
            for field in fields:
                if field not in group.columns:
                    raise ConfigError(
                        f"source {name!r}: topic {topic} has no field {field!r} "
                        f"(fields: {', '.join(list(group.columns)[:12])})"
                    )
        if not recording.groups:
            raise ConfigError(f"source {name!r}: {path} holds no messages")
        t0 = min(int(g.t_ns[0]) for g in recording.groups)
        t_last = max(int(g.t_ns[-1]) for g in recording.groups)
        densest = max(recording.groups, key=lambda g: len(g.t_ns))
        period = loop_period_ns(densest.t_ns, t_last - t0)
        self._targets: dict[tuple[str, str], tuple[str, str]] = {}
        self._topics: list[_Topic] = []
        for group in recording.groups:
            fields = wanted.get(group.name, {})
            keep: dict[str, npt.NDArray[Any]] = {}
            for field, values in group.columns.items():
                if field in fields:
                    self._targets[(group.name, field)] = fields[field]
                elif include_unmapped:
                    self._targets[(group.name, field)] = (f"{group.name}/{field}", "")
                else:
                    continue
                keep[field] = values
            if keep:
                rel = group.t_ns - np.int64(t0)
                self._topics.append(
                    _Topic(group.name, rel, keep, ReplayCursor(len(rel), int(start_ns), period))
                )
        self._declared = False

    def declare(self, catalog: Catalog) -> None:
        for topic in self._topics:
            for field, values in topic.columns.items():
                path, unit = self._targets[(topic.name, field)]
                topic.ids[field] = catalog.add(path, data_type_of(values, f"{topic.name} {field}"), unit).id
        self._declared = True

    def alive(self) -> bool:
        return True  # the recording is in memory since construction

    @property
    def dropped_total(self) -> int:
        """Messages skipped by the drop-oldest backlog policy."""
        return sum(t.cursor.dropped_total for t in self._topics)

    def read(self, until_ns: int) -> list[GroupBatch]:
        if not self._declared:
            raise StateError(f"source {self.name!r}: read() before declare()")
        out = GroupAccumulator()
        for topic in self._topics:
            for span in topic.cursor.advance(int(until_ns), topic.times, len(topic.rel_ns)):
                t_ns = topic.rel_ns[span.lo : span.hi] + np.int64(span.offset_ns)
                values: dict[int, npt.NDArray[np.generic]] = {
                    topic.ids[f]: v[span.lo : span.hi].copy() for f, v in topic.columns.items()
                }
                out.add(f"{self.name}{topic.name}", t_ns, values)
        return out.build()
