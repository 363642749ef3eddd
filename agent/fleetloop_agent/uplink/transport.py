"""The one seam between a device's link and the network: :class:`UplinkTransport`.

A transport carries three things and decides nothing: a control session that opens with the device's
greeting and then carries cloud messages down and device messages up, and uploads of one request each
(a whole segment or one piece of it), answered with what the cloud did. Every adapter — gRPC
(:mod:`.grpc_transport`), MQTT 5 (:mod:`.mqtt_transport`), in-process (:mod:`.memory_transport`) — maps
its own library's failures onto :class:`~fleetloop_shared.errors.UnavailableError` (the session) or an
:data:`UploadAnswer` (an upload), so nothing above it ever sees a grpc or paho exception. What an answer
means for the segment (checkpoint it, try again later, resume from where the cloud is) is decided by the
uploader core (:mod:`.uploader`), the same for every transport.

Transports are asynchronous: one event loop holds one agent's link or a simulator's thousands.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeAlias

from fleetloop_shared.errors import UnavailableError
from fleetloop_shared.wire import device_pb2, ingest_pb2

#: What one upload call carries: a whole segment, or one piece of a resumable upload.
UploadRequest: TypeAlias = ingest_pb2.UploadSegmentRequest | ingest_pb2.UploadChunkRequest

#: Cloud messages a session holds for its reader at most, where the transport has no flow control of its
#: own; overflow policy: drop the oldest (the cloud re-sends what matters: desired state, grants, jobs).
INBOX_LIMIT = 256

#: Status names (gRPC's vocabulary, which every fleetloop transport speaks) by which the cloud refuses
#: the bytes themselves: sending them again cannot help. Anything else is worth a retry — an unknown
#: device (its hello is still on the way), a refused identity (until its certificate is fixed), a busy or
#: unreachable cloud.
REFUSED_STATUSES = frozenset({"INVALID_ARGUMENT", "DATA_LOSS"})


@dataclass(frozen=True)
class Acknowledged:
    """The cloud has the segment: stored now, or (``duplicate``) by an earlier attempt."""

    duplicate: bool
    samples: int = 0


@dataclass(frozen=True)
class Progress:
    """A piece was taken; the cloud wants the next one from ``next_offset``."""

    next_offset: int


@dataclass(frozen=True)
class Refused:
    """The cloud refused the bytes for good (``status``: why, in gRPC's words)."""

    status: str
    detail: str


@dataclass(frozen=True)
class RetryLater:
    """The attempt failed in a way a later one can fix: timeout, lost link, cloud down or busy."""

    reason: str


@dataclass(frozen=True)
class PiecesUnsupported:
    """The far side takes whole segments only (an older cloud): send this one whole."""

    reason: str


UploadAnswer: TypeAlias = Acknowledged | Progress | Refused | RetryLater | PiecesUnsupported


def answer_for_status(status: str, detail: str) -> Refused | RetryLater:
    """A failed upload's meaning, from its status name: refused for good or worth a retry."""
    if status in REFUSED_STATUSES:
        return Refused(status, detail)
    return RetryLater(f"{status}: {detail}")


def no_answer(timeout_s: float) -> RetryLater:
    """A transport's answer when the far side said nothing within ``timeout_s``: worded like the gRPC
    status, so every transport's timeout reads (and is retried) the same."""
    return RetryLater(f"DEADLINE_EXCEEDED: no answer within {timeout_s:g} s")


#: What the cloud answers to one upload that went through.
UploadReply: TypeAlias = ingest_pb2.UploadSegmentResponse | ingest_pb2.UploadChunkResponse


def answer_for_reply(reply: UploadReply) -> Acknowledged | Progress:
    """A successful upload's meaning, from the cloud's reply: every transport reads it the same way (a
    piece short of the end asks for the next one; the last piece carries the whole segment's answer)."""
    if isinstance(reply, ingest_pb2.UploadChunkResponse):
        if not reply.complete:
            return Progress(int(reply.next_offset))
        reply = reply.result
    return Acknowledged(reply.duplicate, reply.samples)


class ControlSession(Protocol):
    """One connection's control channel. Both calls raise ``UnavailableError`` once it has ended."""

    async def receive(self) -> device_pb2.CloudMessage:
        """The next message from the cloud (waits for it)."""
        ...

    async def send(self, msg: device_pb2.DeviceMessage) -> None:
        """Hand ``msg`` to the connection (waits while the connection pushes back)."""
        ...

    async def close(self) -> None:
        """End the session (idempotent); the transport may connect again."""
        ...


class UplinkTransport(Protocol):
    """How a device reaches the cloud. One transport per device; used from one event loop."""

    #: Where it connects, for log lines and the health check ("cloud unreachable at ...").
    target: str
    #: Whether :meth:`upload` takes pieces (``UploadChunkRequest``) as well as whole segments.
    takes_pieces: bool

    async def connect(self, greeting: Sequence[device_pb2.DeviceMessage]) -> ControlSession:
        """Open a control session that starts with ``greeting`` (a hello first); raises
        ``UnavailableError`` when the cloud cannot be reached now."""
        ...

    async def upload(self, request: UploadRequest, timeout_s: float) -> UploadAnswer:
        """Send one upload request and say what the cloud answered; never raises for the network's or the
        cloud's failures (those are answers too)."""
        ...

    async def close(self) -> None:
        """Release the connection for good (the device is stopping)."""
        ...


class SessionInbox:
    """Cloud messages waiting for :meth:`ControlSession.receive`, for transports whose library delivers
    them by callback. Used on the loop only; bounded (``INBOX_LIMIT``, drop-oldest, counted in
    ``dropped``); once :meth:`end` is called, ``get`` raises ``UnavailableError`` with the reason."""

    def __init__(self, limit: int = INBOX_LIMIT) -> None:
        self._messages: collections.deque[device_pb2.CloudMessage] = collections.deque(maxlen=limit)
        self._ready = asyncio.Event()
        self._ended: str | None = None
        self.dropped = 0

    @property
    def ended(self) -> bool:
        return self._ended is not None

    def put(self, msg: device_pb2.CloudMessage) -> None:
        if self._ended is not None:
            return
        if len(self._messages) == self._messages.maxlen:
            self.dropped += 1
        self._messages.append(msg)
        self._ready.set()

    def end(self, reason: str) -> None:
        if self._ended is None:
            self._ended = reason
        self._ready.set()

    async def get(self, timeout_s: float | None = None) -> device_pb2.CloudMessage | None:
        """The next message (those that arrived before the end first); None when ``timeout_s`` passed
        without one."""
        while True:
            if self._messages:
                return self._messages.popleft()
            if self._ended is not None:
                raise UnavailableError(self._ended)
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), timeout_s)
            except TimeoutError:
                return None
