"""The uplink to a cloud in the same process: no network, the same answers.

:class:`InProcessCloud` is what this transport needs of such a cloud — the agent owns it; a test adapts a
fake or a real coordinator to it. Its calls may block (a real ingest writes files), so they run in the
loop's default executor; the errors it raises (:class:`~fleetloop_shared.errors.FleetloopError`) are
mapped by their status name exactly as the gRPC and MQTT adapters map the wire's. A test switches the
cloud out of reach (:attr:`MemoryTransport.reachable`) or cuts the session (:meth:`MemoryTransport.cut`)
to see what a link does about it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from fleetloop_agent.uplink.transport import (
    RetryLater,
    SessionInbox,
    UploadAnswer,
    UploadRequest,
    answer_for_reply,
    answer_for_status,
    no_answer,
)
from fleetloop_shared.errors import FleetloopError, UnavailableError
from fleetloop_shared.wire import device_pb2, ingest_pb2

log = logging.getLogger("fleetloop.agent.uplink")
T = TypeVar("T")


class Downlink:
    """The cloud's end of one in-memory session: push messages to the device, or end the session. Safe
    to call from any thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, inbox: SessionInbox) -> None:
        self._loop = loop
        self._inbox = inbox

    def push(self, msg: device_pb2.CloudMessage) -> None:
        self._call(self._inbox.put, msg)

    def end(self, reason: str) -> None:
        self._call(self._inbox.end, reason)

    def _call(self, fn: Callable[[T], None], arg: T) -> None:
        with contextlib.suppress(RuntimeError):  # the device's loop is gone: nobody is listening
            self._loop.call_soon_threadsafe(fn, arg)


class InProcessCloud(Protocol):
    """A cloud the in-memory transport calls directly."""

    def open_session(self, hello: device_pb2.Hello, downlink: Downlink) -> Callable[[], None]:
        """A device said hello: keep ``downlink`` to push to it; returns what to call when it hangs up."""
        ...

    def on_message(self, device_id: str, msg: device_pb2.DeviceMessage) -> None:
        """A message from a device with an open session."""
        ...

    def upload(self, request: ingest_pb2.UploadSegmentRequest) -> ingest_pb2.UploadSegmentResponse: ...

    def upload_piece(self, request: ingest_pb2.UploadChunkRequest) -> ingest_pb2.UploadChunkResponse: ...


class _MemorySession:
    def __init__(self, cloud: InProcessCloud, device_id: str, inbox: SessionInbox) -> None:
        self._cloud = cloud
        self._device_id = device_id
        self.inbox = inbox
        self.hang_up: Callable[[], None] = lambda: None
        self._hung_up = False

    async def receive(self) -> device_pb2.CloudMessage:
        msg = await self.inbox.get()
        assert msg is not None  # no timeout: a message or the end
        return msg

    async def send(self, msg: device_pb2.DeviceMessage) -> None:
        if self.inbox.ended:
            raise UnavailableError("session ended")
        try:
            await asyncio.to_thread(self._cloud.on_message, self._device_id, msg)
        except FleetloopError as exc:  # the cloud refused this message; the session goes on (as over gRPC)
            log.warning("%s: cloud refused a %s message: %s", self._device_id, msg.WhichOneof("kind"), exc)

    async def close(self) -> None:
        self.inbox.end("session closed")
        if not self._hung_up:
            self._hung_up = True
            await asyncio.to_thread(self.hang_up)


class MemoryTransport:
    """A device's transport to ``cloud`` in this process."""

    takes_pieces = True

    def __init__(self, cloud: InProcessCloud, *, target: str = "memory") -> None:
        self.target = target
        self._cloud = cloud
        #: False: the cloud is out of reach (connects fail, uploads answer retry-later).
        self.reachable = True
        self._session: _MemorySession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def connect(self, greeting: Sequence[device_pb2.DeviceMessage]) -> _MemorySession:
        if not self.reachable:
            raise UnavailableError(f"UNAVAILABLE: {self.target} is out of reach")
        if not greeting or greeting[0].WhichOneof("kind") != "hello":
            raise UnavailableError("INVALID_ARGUMENT: the first message on the stream must be a hello")
        hello = greeting[0].hello
        self._loop = asyncio.get_running_loop()
        session = _MemorySession(self._cloud, hello.device_id, SessionInbox())
        try:
            session.hang_up = await asyncio.to_thread(
                self._cloud.open_session, hello, Downlink(self._loop, session.inbox)
            )
        except FleetloopError as exc:
            raise UnavailableError(f"{exc.grpc_code}: {exc}") from None
        for msg in greeting[1:]:
            await session.send(msg)
        self._session = session
        return session

    def cut(self, reason: str = "UNAVAILABLE: link cut") -> None:
        """End the current session, as a dropped link would (from any thread)."""
        session, loop = self._session, self._loop
        if session is not None and loop is not None:
            Downlink(loop, session.inbox).end(reason)

    async def upload(self, request: UploadRequest, timeout_s: float) -> UploadAnswer:
        if not self.reachable:
            return RetryLater(f"UNAVAILABLE: {self.target} is out of reach")
        try:
            if isinstance(request, ingest_pb2.UploadChunkRequest):
                piece = await asyncio.wait_for(
                    asyncio.to_thread(self._cloud.upload_piece, request), timeout_s
                )
                return answer_for_reply(piece)
            done = await asyncio.wait_for(asyncio.to_thread(self._cloud.upload, request), timeout_s)
            return answer_for_reply(done)
        except TimeoutError:
            return no_answer(timeout_s)
        except FleetloopError as exc:
            return answer_for_status(exc.grpc_code, str(exc))

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()
