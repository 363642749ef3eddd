"""The upload policy of every fleetloop link, as a pure core: no I/O, no clock, no threads.

A link driver (:mod:`.link`) asks it, segment after segment, in the local store's order (most urgent,
then oldest):

1. :meth:`Uploader.admit` — may this segment go now? Without scheduling, always; with it (the cloud's
   upload scheduler), only while granted bytes are left and the segment's priority is high enough. One
   larger than what is left still goes; the overdraft is paid by the next grants.
2. :meth:`Uploader.begin` — the segment becomes a :class:`Transfer`: one request with the whole segment, or
   pieces of ``chunk_bytes`` when the transport takes pieces and the segment is larger than one. After a
   cut, a segment's first piece carries no data and only asks where the cloud is (its staging survives
   restarts), so nothing is sent twice.
3. :meth:`Uploader.request` / :meth:`Uploader.answer` — what to send next, and what the transport's answer
   means: :class:`Settle` (acknowledged — or refused for good — so the driver checkpoints the segment),
   :class:`Send` (the next piece), or :class:`Wait` (retry no earlier than ``until``, jittered backoff).

A cloud whose offsets do not move is a failed attempt (a :class:`Wait`), never a busy loop.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import TypeAlias

from fleetloop_agent.local_store import StoredSegment
from fleetloop_agent.uplink.pacing import Backoff
from fleetloop_agent.uplink.transport import (
    Acknowledged,
    PiecesUnsupported,
    Progress,
    Refused,
    RetryLater,
    UploadAnswer,
    UploadRequest,
)
from fleetloop_shared.privacy import PolicyStamp
from fleetloop_shared.wire import ingest_pb2

#: Uploads larger than this go in pieces of this size: a cut link costs one piece, not the segment, and a
#: segment may exceed a transport's message limit.
DEFAULT_CHUNK_BYTES = 256 * 1024
#: Segments whose upload in pieces was cut, remembered to ask the cloud where it is before sending again.
#: Overflow policy: forget the oldest (that segment then starts from offset 0; the cloud answers with its
#: own offset, so at most one piece goes twice).
MAX_INTERRUPTED = 64


def upload_request(
    device_id: str, seg: StoredSegment, data: bytes, clock: ingest_pb2.ClockOffset | None = None
) -> ingest_pb2.UploadSegmentRequest:
    """The upload of one stored segment, exactly as every fleetloop link sends it (with the privacy policy
    its capture was taken under, when there was one, and ``clock``, the device's measured offset to the
    cloud's clock)."""
    stamp = PolicyStamp.parse(seg.privacy)
    return ingest_pb2.UploadSegmentRequest(
        device_id=device_id,
        segment_id=seg.segment_id,
        capture_id=seg.capture_id,
        campaign=seg.campaign,
        priority=seg.priority,
        segment=data,
        privacy_policy=stamp.name if stamp else "",
        privacy_policy_version=stamp.version if stamp else 0,
        privacy_key_id=stamp.key_id if stamp else "",
        clock=clock,
    )


@dataclass
class Transfer:
    """One segment on its way: the whole request and, when it goes in pieces, where the cloud is."""

    segment: StoredSegment
    whole: ingest_pb2.UploadSegmentRequest
    encoded: bytes
    sha256: bytes
    in_pieces: bool
    #: The next piece starts here (the cloud's answer moves it, forward or back).
    offset: int = 0
    #: The next request asks where the cloud is instead of sending data (after a cut).
    ask: bool = False
    #: Requests left before a transfer that makes no progress counts as a failed attempt.
    requests_left: int = 0
    #: Bytes of data in the request last made (0: a whole segment or a question).
    piece_bytes: int = 0

    @property
    def resumed(self) -> bool:
        """It began by asking where the cloud is: an earlier attempt was cut mid-way."""
        return self.in_pieces and self.ask


@dataclass(frozen=True)
class Send:
    """Send :meth:`Uploader.request` next; ``note`` says why the plan changed, if it did."""

    #: The last request carried a piece of data and the cloud took it.
    piece_landed: bool = False
    note: str = ""


@dataclass(frozen=True)
class Settle:
    """The segment is done with: checkpoint it. ``acknowledged`` False: the cloud refused it for good."""

    acknowledged: bool
    duplicate: bool = False
    reason: str = ""
    #: The last request carried a piece of data and the cloud took it.
    piece_landed: bool = False


@dataclass(frozen=True)
class Wait:
    """The attempt failed; try again no earlier than ``until`` (the caller's clock)."""

    until: float
    reason: str


Verdict: TypeAlias = Send | Settle | Wait


class Uploader:
    """Which segment goes, in what pieces, and what each answer means, for one device."""

    def __init__(
        self,
        device_id: str,
        *,
        takes_pieces: bool,
        scheduled: bool = False,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        backoff: Backoff | None = None,
        max_interrupted: int = MAX_INTERRUPTED,
    ) -> None:
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self.device_id = device_id
        self.chunk_bytes = chunk_bytes
        #: False once the far side answered that it takes no pieces (then every segment goes whole).
        self.pieces = takes_pieces
        self.scheduled = scheduled
        self.backoff = backoff if backoff is not None else Backoff()
        self._max_interrupted = max_interrupted
        #: Segments cut mid-upload, with the clock offset their pieces carried: a resumed upload sends
        #: the same whole again (the cloud keeps its pieces by the whole's checksum).
        self._interrupted: OrderedDict[bytes, ingest_pb2.ClockOffset | None] = OrderedDict()
        #: Granted bytes not spent yet (may go negative by one segment: the overdraft).
        self.granted_bytes = 0
        self.min_priority = 0
        #: No upload before this time (the caller's clock): the backoff after a failed attempt.
        self.retry_at = float("-inf")

    # -- grants -----------------------------------------------------------------------------------
    def grant(self, max_bytes: int, min_priority: int) -> None:
        """An upload grant from the cloud: ``max_bytes`` more, of priority >= ``min_priority``."""
        self.granted_bytes += max(0, max_bytes)
        self.min_priority = min_priority

    def admit(self, seg: StoredSegment) -> bool:
        """True (and, when scheduled, the segment's bytes are spent) when ``seg`` may go now."""
        if not self.scheduled:
            return True
        if self.granted_bytes <= 0 or seg.priority < self.min_priority:
            return False
        self.granted_bytes -= seg.size_bytes
        return True

    # -- one segment ------------------------------------------------------------------------------
    def due(self, now: float) -> bool:
        """Whether uploads may go at ``now`` (no backoff pending)."""
        return now >= self.retry_at

    def interrupted(self) -> list[bytes]:
        """Segments whose upload in pieces was cut (oldest first)."""
        return list(self._interrupted)

    def begin(self, seg: StoredSegment, data: bytes, clock: ingest_pb2.ClockOffset | None = None) -> Transfer:
        """Start uploading ``seg`` (its stored bytes ``data``), with the device's clock offset ``clock``."""
        if seg.segment_id in self._interrupted:
            clock = self._interrupted[seg.segment_id]
        whole = upload_request(self.device_id, seg, data, clock)
        encoded = whole.SerializeToString()
        in_pieces = self.pieces and len(encoded) > self.chunk_bytes
        return Transfer(
            segment=seg,
            whole=whole,
            encoded=encoded,
            sha256=hashlib.sha256(encoded).digest() if in_pieces else b"",
            in_pieces=in_pieces,
            ask=in_pieces and seg.segment_id in self._interrupted,
            requests_left=self._request_budget(len(encoded)),
        )

    def request(self, transfer: Transfer) -> UploadRequest:
        """The next request of ``transfer``."""
        if not transfer.in_pieces:
            transfer.piece_bytes = 0
            return transfer.whole
        piece = (
            b"" if transfer.ask else transfer.encoded[transfer.offset : transfer.offset + self.chunk_bytes]
        )
        transfer.piece_bytes = len(piece)
        return ingest_pb2.UploadChunkRequest(
            device_id=self.device_id,
            segment_id=transfer.segment.segment_id,
            offset=transfer.offset,
            total_bytes=len(transfer.encoded),
            total_sha256=transfer.sha256,
            data=piece,
        )

    def answer(self, transfer: Transfer, answer: UploadAnswer, now: float) -> Verdict:
        """What ``answer`` to the last :meth:`request` means, at ``now``."""
        sid = transfer.segment.segment_id
        if isinstance(answer, Acknowledged):
            self._interrupted.pop(sid, None)
            self.backoff.reset()
            return Settle(True, duplicate=answer.duplicate, piece_landed=transfer.piece_bytes > 0)
        if isinstance(answer, Refused):
            self._interrupted.pop(sid, None)
            self.backoff.reset()
            return Settle(False, reason=f"{answer.status}: {answer.detail}")
        if isinstance(answer, PiecesUnsupported):
            self.pieces = False
            transfer.in_pieces = False
            return Send(note=f"the cloud takes no pieces ({answer.reason}); segments go whole")
        if isinstance(answer, Progress) and transfer.in_pieces:
            transfer.ask = False
            transfer.offset = max(0, min(answer.next_offset, len(transfer.encoded)))
            transfer.requests_left -= 1
            if transfer.requests_left > 0:
                return Send(piece_landed=transfer.piece_bytes > 0)
            return self._fail(transfer, f"segment {sid.hex()}: the cloud's offsets made no progress", now)
        if isinstance(answer, Progress):
            return self._fail(transfer, "the cloud answered a whole segment with an offset", now)
        assert isinstance(answer, RetryLater)
        return self._fail(transfer, answer.reason, now)

    def defer(self, now: float) -> float:
        """An attempt failed outside any answer (the driver's own fault): back off all the same."""
        self.retry_at = now + self.backoff.next_delay()
        return self.retry_at

    # -- internals --------------------------------------------------------------------------------
    def _request_budget(self, size: int) -> int:
        # each answer moves forward or says where to go back to: twice the pieces and some slack
        return 2 * (size // self.chunk_bytes) + 8

    def _fail(self, transfer: Transfer, reason: str, now: float) -> Wait:
        if transfer.in_pieces:
            sid = transfer.segment.segment_id
            self._interrupted[sid] = transfer.whole.clock if transfer.whole.HasField("clock") else None
            self._interrupted.move_to_end(sid)
            while len(self._interrupted) > self._max_interrupted:
                self._interrupted.popitem(last=False)
        return Wait(self.defer(now), reason)
