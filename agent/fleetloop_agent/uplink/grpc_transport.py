"""The uplink over gRPC: ``DeviceService.Connect`` for the session, ``IngestService`` for uploads.

The only agent module that imports grpc. Every gRPC failure is mapped here: a session's to
:class:`~fleetloop_shared.errors.UnavailableError` (``STATUS: details``, the words the health check and
the logs show), an upload's to an answer (:func:`~fleetloop_agent.uplink.transport.answer_for_status`;
``UNIMPLEMENTED`` for a piece means an older coordinator that takes whole segments only).

Each transport has its own channel and, through a local subchannel pool, its own connection (gRPC would
otherwise fold the channels of a simulator's devices onto one shared TCP connection); with mTLS, the
client certificate's CN is the device id.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import grpc
import grpc.aio

# Not in grpc-stubs: the end-of-stream marker call.read() returns.
from grpc.aio import EOF  # type: ignore[attr-defined]

from fleetloop_agent.uplink.transport import (
    PiecesUnsupported,
    UploadAnswer,
    UploadReply,
    UploadRequest,
    answer_for_reply,
    answer_for_status,
)
from fleetloop_shared.errors import ConfigError, UnavailableError
from fleetloop_shared.wire import MAX_MESSAGE_BYTES, device_pb2, ingest_pb2

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.initial_reconnect_backoff_ms", 300),
    ("grpc.max_reconnect_backoff_ms", 3000),
    ("grpc.use_local_subchannel_pool", 1),
]
CONNECT_PATH = "/fleetloop.device.v1.DeviceService/Connect"
UPLOAD_PATH = "/fleetloop.ingest.v1.IngestService/UploadSegment"
CHUNK_PATH = "/fleetloop.ingest.v1.IngestService/UploadChunk"


def describe(exc: grpc.RpcError) -> str:
    """``STATUS: details`` of a failed call."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return f"{code.name if code is not None else 'ERROR'}: {details}"


class _GrpcSession:
    """One ``Connect`` stream (read and written from the same loop)."""

    def __init__(
        self, call: grpc.aio.StreamStreamCall[device_pb2.DeviceMessage, device_pb2.CloudMessage]
    ) -> None:
        self._call = call
        self._closed = False

    async def receive(self) -> device_pb2.CloudMessage:
        try:
            msg = await self._call.read()
        except grpc.RpcError as exc:
            raise UnavailableError(describe(exc)) from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and task is not None and not task.cancelling():
                raise UnavailableError("control stream closed") from None
            raise
        if msg is EOF:
            raise UnavailableError("cloud closed the control stream")
        assert isinstance(msg, device_pb2.CloudMessage)
        return msg

    async def send(self, msg: device_pb2.DeviceMessage) -> None:
        try:
            await self._call.write(msg)
        except grpc.RpcError as exc:
            raise UnavailableError(describe(exc)) from None
        except asyncio.InvalidStateError as exc:
            raise UnavailableError(f"control stream ended: {exc}") from None

    async def close(self) -> None:
        self._closed = True
        self._call.cancel()


class GrpcTransport:
    """A device's gRPC channels to the coordinators at ``target`` (``host:port``, or several of them);
    ``tls``: (ca, cert, key).

    With several addresses the device talks to one at a time, the first to begin with, and every
    reconnect after a session ended tries the next (round robin): coordinators share their state, so a
    device whose coordinator died carries on with another one, and one that is only slow to come back
    costs a reconnect, not an outage. One channel per address, opened on first use; an upload goes over
    the current one."""

    takes_pieces = True

    def __init__(self, target: str | Sequence[str], *, tls: tuple[Path, Path, Path] | None = None) -> None:
        self.targets = [target] if isinstance(target, str) else list(target)
        if not self.targets:
            raise ConfigError("the device needs at least one coordinator address")
        self._current = 0
        #: The address in use now.
        self.target = self.targets[0]
        self._tls = tls
        self._channels: dict[int, grpc.aio.Channel] = {}
        self._connects = 0

    def _open(self) -> grpc.aio.Channel:
        """The current address's channel, created on first use (on the loop that will drive it)."""
        channel = self._channels.get(self._current)
        if channel is None:
            if self._tls is not None:
                ca, cert, key = (Path(x).read_bytes() for x in self._tls)
                creds = grpc.ssl_channel_credentials(ca, private_key=key, certificate_chain=cert)
                channel = grpc.aio.secure_channel(self.target, creds, options=CHANNEL_OPTIONS)
            else:
                channel = grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
            self._channels[self._current] = channel
        return channel

    async def connect(self, greeting: Sequence[device_pb2.DeviceMessage]) -> _GrpcSession:
        if self._connects and len(self.targets) > 1:  # the last session ended: the next address
            self._current = (self._current + 1) % len(self.targets)
            self.target = self.targets[self._current]
        self._connects += 1
        connect = self._open().stream_stream(
            CONNECT_PATH,
            request_serializer=device_pb2.DeviceMessage.SerializeToString,
            response_deserializer=device_pb2.CloudMessage.FromString,
        )
        session = _GrpcSession(connect(None))  # no iterator: written and read here
        try:
            for msg in greeting:
                await session.send(msg)
        except BaseException:
            await session.close()
            raise
        return session

    async def upload(self, request: UploadRequest, timeout_s: float) -> UploadAnswer:
        channel = self._open()
        try:
            chunked = isinstance(request, ingest_pb2.UploadChunkRequest)
            reply_type = ingest_pb2.UploadChunkResponse if chunked else ingest_pb2.UploadSegmentResponse
            call = channel.unary_unary(
                CHUNK_PATH if chunked else UPLOAD_PATH,
                request_serializer=type(request).SerializeToString,
                response_deserializer=reply_type.FromString,
            )
            reply: UploadReply = await call(request, timeout=timeout_s)
            return answer_for_reply(reply)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
            if code == grpc.StatusCode.UNIMPLEMENTED and isinstance(request, ingest_pb2.UploadChunkRequest):
                return PiecesUnsupported(describe(exc))
            return answer_for_status(
                code.name, (exc.details() if hasattr(exc, "details") else None) or str(exc)
            )

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close(None)
