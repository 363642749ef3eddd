"""A small client for the agent's local push API, for a machine's own software (a robot's controller).

    with PushClient("/run/fleetloop/push.sock") as agent:
        agent.publish({"Robot.Imu.Acceleration.X": [0.1, 0.2], "Robot.Imu.Acceleration.Y": [0.0, 0.1]},
                      time_ns=[t0, t0 + 10_000_000])
        agent.publish({"Robot.Battery.Voltage": 24.1})        # one row, stamped by the agent on arrival

Values are sent in each signal's catalog datatype, learnt from the agent once (``ListSignals``). A refusal
raises: :class:`~fleetloop_shared.errors.UserError` for a request the agent will never accept (a signal
outside its catalog, a wrong datatype; the message says which), :class:`UnavailableError` when the agent
is busy (its queue is full: retry later, nothing was accepted) or not running.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from fleetloop_shared.catalog import DataType
from fleetloop_shared.errors import FleetloopError, UnavailableError, UserError
from fleetloop_shared.wire import push_pb2, push_pb2_grpc

_FIELD = {
    DataType.FLOAT64: ("doubles", push_pb2.DoubleValues),
    DataType.INT64: ("int64s", push_pb2.Int64Values),
    DataType.BOOL: ("bools", push_pb2.BoolValues),
    DataType.STRING: ("strings", push_pb2.StringValues),
}

Values = Mapping[str, Sequence[Any] | float | int | bool | str]


def _guess(value: Any) -> DataType:
    if isinstance(value, bool):
        return DataType.BOOL
    if isinstance(value, int):
        return DataType.INT64
    if isinstance(value, str):
        return DataType.STRING
    return DataType.FLOAT64


def _error(exc: grpc.RpcError) -> FleetloopError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code in (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    ):
        return UnavailableError(f"agent push API: {details}")
    return UserError(f"agent push API refused the request: {details}")


class PushClient:
    """Publishes to the agent's push API on ``socket_path``."""

    def __init__(self, socket_path: str | Path, *, timeout_s: float = 5.0) -> None:
        self.target = f"unix:{socket_path}"
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(self.target)
        self._stub = push_pb2_grpc.PushServiceStub(self._channel)
        self._types: dict[str, DataType] | None = None

    def signals(self) -> list[push_pb2.PushSignal]:
        """The signals the agent accepts."""
        try:
            reply = self._stub.ListSignals(push_pb2.ListSignalsRequest(), timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise _error(exc) from None
        self._types = {s.path: DataType(s.data_type) for s in reply.signals}
        return list(reply.signals)

    def batch(self, values: Values, time_ns: Sequence[int] | None = None) -> push_pb2.SampleBatch:
        """One batch: columns of equal length (a scalar is one row), times in ns (None: stamped on
        arrival)."""
        if self._types is None:
            self.signals()
        types = self._types or {}
        columns = []
        for signal, column in values.items():
            seq = [column] if isinstance(column, str | int | float | bool) else list(column)
            data_type = types.get(signal) or _guess(seq[0] if seq else 0.0)
            name, cls = _FIELD[data_type]
            columns.append(push_pb2.Column(signal=signal, **{name: cls(values=seq)}))
        return push_pb2.SampleBatch(time_ns=list(time_ns or ()), columns=columns)

    def publish(self, values: Values, time_ns: Sequence[int] | None = None) -> int:
        """Publish one batch; the number of samples accepted."""
        return self.publish_batches([self.batch(values, time_ns)])

    def publish_batches(self, batches: Sequence[push_pb2.SampleBatch]) -> int:
        """Publish several batches in one call, accepted all or none."""
        try:
            reply = self._stub.PublishValues(
                push_pb2.PublishValuesRequest(batches=batches), timeout=self.timeout_s
            )
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return int(reply.accepted_samples)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> PushClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
