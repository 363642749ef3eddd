"""The local push API: a machine's own software (a robot's controller) publishes signal values to the
agent over gRPC on a UNIX socket (``fleetloop.push.v1.PushService``).

:class:`PushCatalog` is the pure admission core: a request is accepted whole or refused whole, with a
message that says what was wrong — a signal outside the catalog, a batch that is not exactly one group,
values of the wrong datatype, columns of unequal length, times far ahead of the device clock. Accepted
samples go into the source's queue with the **refuse-newest** policy: a publisher that floods gets
``RESOURCE_EXHAUSTED`` (counted in ``dropped``) and keeps its data, and the agent's memory stays bounded
by the queue, the message size limit and the number of concurrent calls.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
import numpy as np
import numpy.typing as npt

from fleetloop_agent.sources.base import first_repeat
from fleetloop_agent.sources.live import DeviceClock, LiveSource, OverflowPolicy
from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.errors import ConfigError, MalformedMessageError
from fleetloop_shared.wire import device_pb2, push_pb2, push_pb2_grpc

log = logging.getLogger("fleetloop.agent.sources")

#: Largest request accepted (bounds what one call can make the agent hold).
MAX_REQUEST_BYTES: Final = 4 * 1024 * 1024
#: Calls served at once; more are refused by gRPC with RESOURCE_EXHAUSTED.
MAX_CONCURRENT_CALLS: Final = 8
#: How far ahead of the device clock a sample time may be (clock steps, unit mistakes: s vs ns).
MAX_AHEAD_NS: Final = 60 * 1_000_000_000
#: Longest UNIX socket path the kernel accepts (sun_path is 108 bytes with its NUL).
MAX_SOCKET_PATH: Final = 107
_VALUE_FIELD: Final = {
    DataType.FLOAT64: "doubles",
    DataType.INT64: "int64s",
    DataType.BOOL: "bools",
    DataType.STRING: "strings",
}


@dataclass(frozen=True)
class PushSignal:
    """A signal publishers may send; signals with the same ``group`` travel in one batch."""

    path: str
    data_type: DataType = DataType.FLOAT64
    unit: str = ""
    group: str = ""


class RequestRefused(MalformedMessageError):
    """A publish request the agent refuses whole; ``code`` is the gRPC status to answer with."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> None:
        super().__init__(message)
        self.code = code


Chunk = tuple[str, tuple[int, ...], npt.NDArray[np.int64], list[npt.NDArray[Any]]]


class PushCatalog:
    """Which signals publishers may send, and the admission of one request (pure; now passed in)."""

    def __init__(self, source: str, signals: Sequence[PushSignal]) -> None:
        if not signals:
            raise ConfigError(f"source {source!r}: no signals to accept")
        twice = first_repeat([s.path for s in signals])
        if twice is not None:
            raise ConfigError(f"source {source!r}: signal {twice!r} listed twice")
        self.source = source
        self.signals = [s if s.group else PushSignal(s.path, s.data_type, s.unit, s.path) for s in signals]
        self._by_path = {s.path: s for s in self.signals}
        self._groups: dict[str, list[str]] = {}
        for s in self.signals:
            self._groups.setdefault(s.group, []).append(s.path)
        self._ids: dict[str, int] = {}

    def declare(self, catalog: Catalog) -> dict[int, str]:
        dtypes = {}
        for s in self.signals:
            spec = catalog.add(s.path, s.data_type, s.unit)
            self._ids[s.path] = spec.id
            dtypes[spec.id] = s.data_type.numpy_dtype
        return dtypes

    def listing(self) -> push_pb2.ListSignalsResponse:
        return push_pb2.ListSignalsResponse(
            signals=[
                push_pb2.PushSignal(
                    path=s.path,
                    data_type=device_pb2.DataType.ValueType(int(s.data_type)),
                    unit=s.unit,
                    group=s.group,
                )
                for s in self.signals
            ]
        )

    def admit(self, request: push_pb2.PublishValuesRequest, now_ns: int) -> list[Chunk]:
        """The chunks to queue for ``request``; RequestRefused saying why when any part is wrong."""
        chunks: list[Chunk] = []
        for b, batch in enumerate(request.batches):
            chunks.append(self._batch(b, batch, now_ns))
        return chunks

    def _batch(self, b: int, batch: push_pb2.SampleBatch, now_ns: int) -> Chunk:
        where = f"batch {b}"
        if not batch.columns:
            raise RequestRefused(f"{where}: no columns")
        names = [c.signal for c in batch.columns]
        unknown = [n for n in names if n not in self._by_path]
        if unknown:
            raise RequestRefused(
                f"{where}: signal {unknown[0]!r} is not in this agent's catalog for source {self.source!r} "
                f"({len(unknown)} unknown; ListSignals lists the accepted ones)"
            )
        if len(set(names)) != len(names):
            raise RequestRefused(
                f"{where}: signal {next(n for n in names if names.count(n) > 1)!r} given twice"
            )
        group = self._by_path[names[0]].group
        members = self._groups[group]
        if set(names) != set(members):
            missing = sorted(set(members) - set(names))
            other = sorted(set(names) - set(members))
            detail = (
                f"missing {', '.join(missing)}" if missing else f"{', '.join(other)} belong to other groups"
            )
            raise RequestRefused(f"{where}: the signals of group {group!r} travel together ({detail})")
        rows = len(batch.time_ns)
        columns: dict[str, npt.NDArray[Any]] = {}
        for c in batch.columns:
            sig = self._by_path[c.signal]
            kind = c.WhichOneof("values")
            expected = _VALUE_FIELD[sig.data_type]
            if kind != expected:
                raise RequestRefused(
                    f"{where}: {c.signal} is {sig.data_type.name}; send its values as {expected}, not {kind}"
                )
            raw = getattr(c, expected).values
            values = (
                np.array(raw, dtype=object)
                if sig.data_type is DataType.STRING
                else np.array(raw, dtype=sig.data_type.numpy_dtype)
            )
            columns[c.signal] = values
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1:
            raise RequestRefused(
                f"{where}: columns of unequal length ({', '.join(map(str, sorted(lengths)))})"
            )
        (n,) = lengths
        if rows == 0:
            if n != 1:
                raise RequestRefused(
                    f"{where}: {n} rows but no time_ns (only a single row is stamped on arrival)"
                )
            t_ns = np.array([now_ns], dtype=np.int64)
        else:
            if rows != n:
                raise RequestRefused(f"{where}: {rows} times but {n} values per column")
            t_ns = np.array(batch.time_ns, dtype=np.int64)
            newest = int(t_ns.max())
            if int(t_ns.min()) <= 0 or newest > now_ns + MAX_AHEAD_NS:
                bad = newest if newest > now_ns + MAX_AHEAD_NS else int(t_ns.min())
                raise RequestRefused(
                    f"{where}: time {bad} ns is not a time of the device clock (now {now_ns}; "
                    f"times are ns since the Unix epoch, at most {MAX_AHEAD_NS // 1_000_000_000} s ahead)"
                )
        ids = tuple(self._ids[m] for m in members)
        return (f"{self.source}/{group}", ids, t_ns, [columns[m] for m in members])


class _Servicer(push_pb2_grpc.PushServiceServicer):
    def __init__(self, source: PushApiSource) -> None:
        self.source = source

    def PublishValues(
        self, request: push_pb2.PublishValuesRequest, context: grpc.ServicerContext
    ) -> push_pb2.PublishValuesResponse:
        src = self.source
        try:
            chunks = src.catalog.admit(request, src.clock.now_ns())
        except RequestRefused as exc:
            src._error(f"refused:{exc.code.name}", f"publish refused: {exc}")
            context.abort(exc.code, str(exc))
        total = sum(len(c[2]) * len(c[1]) for c in chunks)
        if not src.queue.put_all(chunks):
            src.counters.errors += 1
            src.errors.error(
                "full",
                f"queue full ({len(src.queue)} of {src.queue.capacity} samples waiting); publishers refused",
                src.clock.now_ns(),
            )
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the agent's queue is full ({len(src.queue)} of {src.queue.capacity} samples waiting); "
                f"{total} samples not accepted, retry later",
            )
        return push_pb2.PublishValuesResponse(accepted_samples=total)

    def ListSignals(
        self, request: push_pb2.ListSignalsRequest, context: grpc.ServicerContext
    ) -> push_pb2.ListSignalsResponse:
        return self.source.catalog.listing()


class PushApiSource(LiveSource):
    """Serves :class:`PushService` on ``socket_path`` while the source runs."""

    def __init__(
        self,
        name: str,
        socket_path: Path,
        signals: Sequence[PushSignal],
        *,
        clock: DeviceClock | None = None,
        socket_mode: int = 0o660,
        queue_samples: int = 1_000_000,
        workers: int = 2,
        origin: str = "live",
    ) -> None:
        super().__init__(
            name, clock=clock, queue_samples=queue_samples, policy=OverflowPolicy.REFUSE_NEWEST, origin=origin
        )
        self.socket_path = Path(socket_path)
        if len(str(self.socket_path)) > MAX_SOCKET_PATH:
            raise ConfigError(
                f"source {name!r}: socket path longer than {MAX_SOCKET_PATH} bytes: {socket_path}"
            )
        self.socket_mode = socket_mode
        self.workers = workers
        self.catalog = PushCatalog(name, signals)
        self.serving = False

    def _declare(self, catalog: Catalog) -> None:
        self.queue.dtypes.update(self.catalog.declare(catalog))

    def _prepare_socket(self) -> None:
        path = self.socket_path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise ConfigError(
                    f"source {self.name!r}: {path} exists and is not a socket; not replacing it"
                )
            path.unlink()  # left by an agent that did not stop cleanly

    def _run(self) -> None:
        self._prepare_socket()
        server = grpc.server(
            ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix=f"push-{self.name}"),
            maximum_concurrent_rpcs=MAX_CONCURRENT_CALLS,
            options=[
                ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                ("grpc.max_send_message_length", MAX_REQUEST_BYTES),
            ],
        )
        push_pb2_grpc.add_PushServiceServicer_to_server(_Servicer(self), server)
        server.add_insecure_port(f"unix:{self.socket_path}")
        server.start()
        os.chmod(self.socket_path, self.socket_mode)
        self.serving = True
        log.info("source %s: push API on %s", self.name, self.socket_path)
        try:
            self._stop.wait()
        finally:
            self.serving = False
            server.stop(grace=1.0).wait(2.0)
            if self.socket_path.exists():
                self.socket_path.unlink()
