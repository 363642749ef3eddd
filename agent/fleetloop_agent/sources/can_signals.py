"""Which signals of a DBC a CAN source delivers, under which catalog paths, and how a batch of raw frames
becomes groups of samples: the part every CAN source shares (a replayed numpy log, a replayed bus log, a
live bus).

Decoding is :class:`~fleetloop_shared.can_batch.BatchDecoder`: one pass of array operations per batch,
values exactly cantools'. The signals of one frame share its timestamp, so each message is one group
(``SOURCE/MESSAGE``). A multiplexed message carries different signals in different frames; its frames
are split by which of the chosen multiplexed signals they carry, one group per combination
(``SOURCE/MESSAGE/SIG_A,SIG_B``), so every group keeps one time column for all its signals.

When to decode is :class:`DecodeCadence`: a batch costs a fixed ~25-60 µs of array calls whatever it
holds, so a CAN source lets frames pile up until enough are pending, or the oldest has waited long
enough, instead of decoding every loop tick (docs/decisions/0035-can-decode-cadence.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from fleetloop_agent.sources.base import GroupAccumulator
from fleetloop_shared.can_batch import BatchDecoder, DecodedMessage, FrameBatch
from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.dbc import DbcDatabase
from fleetloop_shared.errors import ConfigError

#: Longest group name spelled out; longer combinations of multiplexed signals are named by a digest.
MAX_GROUP_NAME: Final = 120
#: Default of ``decode_frames``: a CAN source decodes once this many frames are pending ...
DEFAULT_DECODE_FRAMES: Final = 4_096
#: ... or once the oldest pending frame has waited this long (``decode_wait``, seconds), whichever is first.
DEFAULT_DECODE_WAIT_S: Final = 10.0
#: Longest ``decode_wait`` accepted: well under a replay's drop-oldest backlog (300 s).
MAX_DECODE_WAIT_S: Final = 60.0
_NS_PER_S: Final = 1_000_000_000


@dataclass(frozen=True)
class DecodeCadence:
    """When a CAN source decodes the frames it has received (pure: counts and times passed in).

    Decoding is due once ``min_frames`` frames are pending, or once the oldest pending frame is
    ``max_wait_ns`` old; then everything pending is decoded as one batch. So after every read, every
    frame received at or before ``now - max_wait_ns`` has been decoded: :attr:`lag_ns` is how much
    later than its frame a sample can reach the ring buffers and the trigger engine, which the agent
    adds to the time it waits before cutting a capture (and to the ring buffers' horizon), so a
    capture still holds its whole window. ``DecodeCadence(1, 0)`` decodes at every read.
    """

    min_frames: int = DEFAULT_DECODE_FRAMES
    max_wait_ns: int = int(DEFAULT_DECODE_WAIT_S * _NS_PER_S)

    def __post_init__(self) -> None:
        if isinstance(self.min_frames, bool) or not isinstance(self.min_frames, int) or self.min_frames < 1:
            raise ConfigError(f"decode_frames must be an integer >= 1, got {self.min_frames!r}")
        if not 0 <= self.max_wait_ns <= MAX_DECODE_WAIT_S * _NS_PER_S:
            got = self.max_wait_ns / _NS_PER_S
            raise ConfigError(f"decode_wait must be between 0 and {MAX_DECODE_WAIT_S:g} s, got {got:g}")

    @staticmethod
    def seconds(min_frames: int, max_wait_s: float) -> DecodeCadence:
        return DecodeCadence(min_frames, round(max_wait_s * _NS_PER_S))

    @property
    def lag_ns(self) -> int:
        """Most a sample can reach the agent after its frame's time (at the agent's next tick after it)."""
        return self.max_wait_ns

    def due(self, pending: int, oldest_ns: int | None, now_ns: int) -> bool:
        """Whether to decode now, with ``pending`` frames waiting, the oldest received at ``oldest_ns``."""
        if pending <= 0 or oldest_ns is None:
            return False
        return pending >= self.min_frames or now_ns - oldest_ns >= self.max_wait_ns


#: Decoding at every read (what a source did before it had a cadence; tests that count frames use it).
EVERY_READ: Final = DecodeCadence(1, 0)
#: The cadence of a CAN source whose config says nothing.
DEFAULT_CADENCE: Final = DecodeCadence()


class MappingKeyError(ConfigError):
    """A ``mapping:`` entry that cannot be: the message names the key, ``key`` lets the config reader say
    where it was written."""

    def __init__(self, key: object, reason: str) -> None:
        super().__init__(f"mapping key {key!r}: {reason}")
        self.key = key


#: Per decoded message: group name, catalog ids, which decoder columns carry them, casts (see ``_plan``).
_Plan = tuple[str, tuple[int, ...], tuple[int, ...] | None, tuple[np.dtype[Any], ...] | None]


@dataclass(frozen=True)
class _Target:
    signal: str
    path: str
    unit: str
    is_float: bool


class CanSignalMap:
    """The chosen signals of one DBC (``MESSAGE.SIGNAL: catalog.path`` mapping, plus every other signal as
    ``CAN.MESSAGE.SIGNAL`` when ``include_unmapped``), their catalog ids once declared, and the decoder
    for exactly them."""

    def __init__(
        self, dbc: DbcDatabase, mapping: Mapping[str, str], *, include_unmapped: bool, source: str
    ) -> None:
        self.dbc = dbc
        self.source = source
        self._mapping_order = [str(p) for p in mapping.values()]
        self._targets = self._resolve(dict(mapping), include_unmapped)
        if not self._targets:
            raise ConfigError(f"source {source!r}: the mapping selects no signal of {dbc.source}")
        self.decoder = BatchDecoder(
            [dbc.layout(m) for m in self._targets],
            {m: [t.signal for t in targets] for m, targets in self._targets.items()},
        )
        self._ids: dict[str, dict[str, tuple[int, np.dtype[Any]]]] = {}
        self._muxed_groups: dict[tuple[str, tuple[str, ...]], str] = {}
        self._plans: list[_Plan] = []
        #: Frames of a chosen message that carried none of its chosen signals (multiplexed elsewhere).
        self.skipped_frames_total = 0

    def _resolve(self, mapping: dict[str, str], include_unmapped: bool) -> dict[str, list[_Target]]:
        wanted: dict[str, dict[str, str]] = {}
        paths = list(mapping.values())
        for key, path in mapping.items():
            if paths.count(path) > 1:
                raise MappingKeyError(key, f"signal {path!r} is the target of two keys")
            message, dot, signal = str(key).partition(".")
            if not dot or not message or not signal:
                raise MappingKeyError(key, "expected MESSAGE.SIGNAL")
            if not isinstance(path, str) or not path:
                raise MappingKeyError(key, "the catalog path must be a non-empty string")
            if message not in self.dbc.message_names():
                raise MappingKeyError(key, f"{self.dbc.source} has no message {message!r}")
            if signal not in [s[0] for s in self.dbc.signals_of(message)]:
                raise MappingKeyError(key, f"message {message} has no signal {signal!r}")
            wanted.setdefault(message, {})[signal] = path
        messages = self.dbc.message_names() if include_unmapped else list(wanted)
        resolved: dict[str, list[_Target]] = {}
        for message in messages:
            targets = wanted.get(message, {})
            kept = []
            for signal, unit, is_float in self.dbc.signals_of(message):
                target: str | None = targets.get(signal)
                if target is None and include_unmapped:
                    target = f"CAN.{message}.{signal}"
                if target is not None:
                    kept.append(_Target(signal, target, unit, is_float))
            if kept:
                resolved[message] = kept
        return resolved

    @property
    def frame_ids(self) -> frozenset[int]:
        return self.decoder.frame_ids

    @property
    def messages(self) -> list[str]:
        """The DBC messages carrying a chosen signal."""
        return list(self._targets)

    @property
    def decode_errors_total(self) -> int:
        """Frames of chosen messages the DBC refuses (too short, unknown multiplexer value)."""
        return self.decoder.errors_total

    def declare(self, catalog: Catalog) -> None:
        """Register mapped signals in mapping order, then unmapped ones in DBC order.

        Catalog ids follow registration order, so two machines whose mappings list the same paths in the
        same order get the same ids, whatever their DBCs look like.
        """
        flat = {t.path: t for targets in self._targets.values() for t in targets}
        order = [p for p in self._mapping_order if p in flat] + [
            p for p in flat if p not in self._mapping_order
        ]
        ids: dict[str, tuple[int, DataType]] = {}
        for path in order:
            dtype = DataType.FLOAT64 if flat[path].is_float else DataType.INT64
            ids[path] = (catalog.add(path, dtype, flat[path].unit).id, dtype)
        self._ids = {
            message: {t.signal: (ids[t.path][0], np.dtype(ids[t.path][1].numpy_dtype)) for t in targets}
            for message, targets in self._targets.items()
        }
        self._plans = [self._plan(k) for k in range(len(self.decoder.layouts))]

    def _plan(self, k: int) -> _Plan:
        """How message ``k``'s decoded columns become a group: its name, the catalog ids in the decoder's
        column order, which columns carry them (None: all) and their dtypes when some column needs a
        cast (None: every column already has its catalog type)."""
        layout = self.decoder.layouts[k]
        ids = self._ids[layout.name]
        names = self.decoder.signal_names(k)
        pick = tuple(j for j, name in enumerate(names) if name in ids)
        sids = tuple(ids[names[j]][0] for j in pick)
        dtypes = tuple(ids[names[j]][1] for j in pick)
        decoded = self.decoder.column_dtypes(k)
        same = decoded is not None and dtypes == tuple(decoded[j] for j in pick)
        return (
            f"{self.source}/{layout.name}",
            sids,
            None if len(pick) == len(names) else pick,
            None if same else dtypes,
        )

    def emit(self, batch: FrameBatch, offset_ns: int, out: GroupAccumulator) -> None:
        """Decode ``batch`` and add its samples (time ``batch.t_ns + offset_ns``) to ``out``.

        The decoder's flat result is split per message straight into catalog-id columns (views, cast only
        where the catalog's type differs); only multiplexed messages go through :class:`DecodedMessage`.
        """
        flat = self.decoder.decode_flat(batch)
        if not len(flat):
            return
        t_all = flat.t_ns + np.int64(offset_ns) if offset_ns else flat.t_ns
        plans = self._plans
        for i, (k, where, columns, present) in enumerate(flat.parts()):
            t_ns = t_all[where]
            if present:
                layout = self.decoder.layouts[k]
                names = self.decoder.signal_names(k)
                message = DecodedMessage(
                    layout, flat.rows[where], dict(zip(names, columns, strict=True)), present, flat.codes(i)
                )
                self._emit_multiplexed(message, self._ids[layout.name], t_ns, out)
                continue
            group, sids, pick, dtypes = plans[k]
            if pick is not None:
                columns = [columns[j] for j in pick]
            if dtypes is None:
                out.add(group, t_ns, dict(zip(sids, columns, strict=True)))
            else:
                out.add(
                    group,
                    t_ns,
                    {
                        sid: c if c.dtype == d else c.astype(d)
                        for sid, c, d in zip(sids, columns, dtypes, strict=True)
                    },
                )

    @staticmethod
    def _columns(
        message: DecodedMessage,
        ids: Mapping[str, tuple[int, np.dtype[Any]]],
        rows: npt.NDArray[np.intp] | None,
        names: tuple[str, ...] | None,
    ) -> dict[int, npt.NDArray[np.generic]]:
        columns: dict[int, npt.NDArray[np.generic]] = {}
        for name, (sid, dtype) in ids.items():
            if names is not None and name not in names:
                continue
            values: Any = message.values[name]
            if rows is not None:
                values = values[rows]
            if values.dtype != dtype:
                values = values.astype(dtype)
            columns[sid] = values
        return columns

    def _emit_multiplexed(
        self,
        message: DecodedMessage,
        ids: Mapping[str, tuple[int, np.dtype[Any]]],
        t_ns: npt.NDArray[np.int64],
        out: GroupAccumulator,
    ) -> None:
        """One group per combination of chosen multiplexed signals the frames carry."""
        muxed = [name for name in ids if name in message.present]
        plain = tuple(name for name in ids if name not in message.present)
        if muxed:
            bits = np.stack([message.present[name] for name in muxed], axis=1)
            keys, inverse = np.unique(bits, axis=0, return_inverse=True)
            inverse = inverse.reshape(-1)
        else:
            keys, inverse = np.ones((1, 0), bool), np.zeros(t_ns.shape[0], np.intp)
        for k, key in enumerate(keys):
            carried = tuple(name for name, on in zip(muxed, key.tolist(), strict=True) if on)
            names = plain + carried
            rows = np.flatnonzero(inverse == k)
            if not names:
                self.skipped_frames_total += int(rows.size)
                continue
            group = self._group_name(message.layout.name, carried)
            out.add(group, t_ns[rows], self._columns(message, ids, rows, names))

    def _group_name(self, message: str, carried: tuple[str, ...]) -> str:
        key = (message, carried)
        name = self._muxed_groups.get(key)
        if name is None:
            name = f"{self.source}/{message}" + (f"/{','.join(carried)}" if carried else "")
            if len(name) > MAX_GROUP_NAME:
                digest = hashlib.sha256(",".join(carried).encode()).hexdigest()[:16]
                name = f"{self.source}/{message}/{digest}"
            self._muxed_groups[key] = name
        return name
