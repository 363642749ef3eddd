"""The agent's link to the cloud over gRPC: one control stream and segment uploads.

This adapter is the only agent module that imports grpc; it maps every gRPC failure to a log line, a
metric and a retry with jittered, bounded backoff. What reaches the rest of the agent is plain callbacks
(``on_message``) and :meth:`CloudLink.send`. Segments are checkpointed (``mark_uploaded``) only after the
cloud's ack, so a cut link or a killed process never loses an acknowledged-or-pending segment.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import random
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from fleetloop_agent.control_outbox import ControlOutbox
from fleetloop_agent.local_store import LocalStore, StoredSegment
from fleetloop_agent.metrics import AgentMetrics
from fleetloop_agent.upload_protocol import UploadGrants, acknowledged, upload_request
from fleetloop_shared.errors import NotFoundError
from fleetloop_shared.wire import MAX_MESSAGE_BYTES, device_pb2, device_pb2_grpc, ingest_pb2, ingest_pb2_grpc

log = logging.getLogger("fleetloop.agent.uplink")

BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 5.0
#: Upload failures with these codes are the cloud refusing the bytes themselves; retrying cannot help.
PERMANENT_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DATA_LOSS}
#: Uploads larger than this go in pieces of this size (``UploadChunk``): a cut link costs one piece, not
#: the whole segment, and a segment may exceed the gRPC message limit.
DEFAULT_CHUNK_BYTES = 256 * 1024
#: Segments whose chunked upload was cut, remembered to ask the cloud where it is before sending again.
#: Overflow policy: forget the oldest (it then starts with a question all the same, see _upload_pieces).
MAX_INTERRUPTED = 64

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.initial_reconnect_backoff_ms", 300),
    ("grpc.max_reconnect_backoff_ms", 3000),
]


class CloudLink(ControlOutbox):
    """Keeps the control stream up and drains the local store to the cloud."""

    def __init__(
        self,
        target: str,
        device_id: str,
        *,
        store: LocalStore,
        metrics: AgentMetrics,
        greeting: Callable[[], list[device_pb2.DeviceMessage]],
        on_message: Callable[[device_pb2.CloudMessage], None],
        upload_deadline_s: float = 10.0,
        on_ack: Callable[[StoredSegment, bool], None] | None = None,
        tls: tuple[Path, Path, Path] | None = None,
        grants: bool = False,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        self._chunk_bytes = chunk_bytes
        self._chunked = True  # False once the cloud answers UNIMPLEMENTED (an older coordinator)
        self._interrupted: OrderedDict[bytes, None] = OrderedDict()
        # grants (issue 6): upload only what the cloud's upload scheduler granted (see grant())
        self._grants = grants
        self._budget = UploadGrants()
        # on_ack(segment, duplicate) runs once per cloud acknowledgement, before the checkpoint; the
        # fleet simulator counts acknowledged samples with it.
        self._on_ack = on_ack
        self.target = target
        self.device_id = device_id
        self._store = store
        super().__init__(metrics)
        self._greeting = greeting
        self._on_message = on_message
        self._deadline = upload_deadline_s
        self._stop = threading.Event()
        self.last_error = ""
        if tls is not None:  # mTLS (issue 6): (ca, cert, key); the certificate's CN is the device id
            ca, cert, key = (Path(x).read_bytes() for x in tls)
            creds = grpc.ssl_channel_credentials(ca, private_key=key, certificate_chain=cert)
            self._channel = grpc.secure_channel(target, creds, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._device = device_pb2_grpc.DeviceServiceStub(self._channel)
        self._ingest = ingest_pb2_grpc.IngestServiceStub(self._channel)
        self._threads = [
            threading.Thread(target=self._control_loop, name="uplink-control", daemon=True),
            threading.Thread(target=self._upload_loop, name="uplink-upload", daemon=True),
        ]
        self._upload_wakeup = threading.Event()

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        self._upload_wakeup.set()
        self._channel.close()
        for t in self._threads:
            t.join(timeout=5)

    def grant(self, max_bytes: int, min_priority: int) -> None:
        """An UploadGrant from the cloud: upload up to ``max_bytes`` more of priority >= ``min_priority``
        (a segment larger than what is left still goes; the overdraft is paid by the next grants)."""
        self._budget.add(max_bytes, min_priority)
        self._upload_wakeup.set()

    def kick_upload(self) -> None:
        """A new segment is in the store; upload without waiting for the next poll."""
        self._upload_wakeup.set()

    # -- control stream ---------------------------------------------------------------------------
    def _requests(self, generation: threading.Event) -> Iterator[device_pb2.DeviceMessage]:
        yield from self._greeting()
        while not self._stop.is_set() and not generation.is_set():
            try:
                yield self._outbox.get(timeout=0.5)
            except queue.Empty:
                continue

    def _control_loop(self) -> None:
        backoff = BACKOFF_MIN_S
        while not self._stop.is_set():
            ended = threading.Event()
            try:
                responses = self._device.Connect(self._requests(ended))
                for msg in responses:
                    if not self.connected.is_set():
                        self.connected.set()
                        self._metrics.reconnects.inc()
                        self._upload_wakeup.set()
                        if self.last_error:
                            log.info("cloud at %s reachable again", self.target)
                        self.last_error = ""
                        backoff = BACKOFF_MIN_S
                    self._on_message(msg)
                self._note_error("cloud closed the control stream")
            except grpc.RpcError as exc:
                self._note_error(describe_rpc_error(exc))
            except Exception as exc:  # a handler bug must not kill the link thread
                log.exception("control message handler failed: %s", exc)
                self._note_error(f"handler failed: {exc}")
            finally:
                ended.set()
                self.connected.clear()
            if self._stop.wait(backoff * random.uniform(0.8, 1.2)):
                return
            backoff = min(BACKOFF_MAX_S, backoff * 2)

    def _note_error(self, what: str) -> None:
        if self._stop.is_set():
            return
        if what != self.last_error:
            log.warning("cannot reach cloud at %s: %s (retrying)", self.target, what)
        self.last_error = what

    # -- uploads ----------------------------------------------------------------------------------
    def _upload_loop(self) -> None:
        backoff = BACKOFF_MIN_S
        while not self._stop.is_set():
            self._upload_wakeup.wait(timeout=1.0)
            self._upload_wakeup.clear()
            if self._stop.is_set():
                return
            if not self.connected.is_set():
                continue
            try:
                self._drain()
                backoff = BACKOFF_MIN_S
            except grpc.RpcError as exc:
                self._metrics.upload_errors.inc()
                log.warning("upload to %s failed: %s (retrying)", self.target, describe_rpc_error(exc))
                if self._stop.wait(backoff * random.uniform(0.8, 1.2)):
                    return
                backoff = min(BACKOFF_MAX_S, backoff * 2)
                self._upload_wakeup.set()

    def _drain(self) -> None:
        while not self._stop.is_set():
            batch = self._store.pending(limit=32)
            if not batch:
                return
            for seg in batch:
                if self._grants and not self._budget.take(seg):
                    return  # wait for the next grant
                try:
                    data = self._store.read(seg.segment_id)
                except NotFoundError:
                    continue  # evicted by the quota between pending() and read()
                req = upload_request(self.device_id, seg, data)
                try:
                    resp = self._upload(req)
                except grpc.RpcError as exc:
                    if not refused_for_good(exc, seg, self._metrics):
                        raise
                else:
                    acknowledged(seg, resp, self._metrics, self._on_ack)
                self._store.mark_uploaded(seg.segment_id)
            self._metrics.store_pending_bytes.set(self._store.stats().bytes_pending)


    def _upload(self, req: ingest_pb2.UploadSegmentRequest) -> ingest_pb2.UploadSegmentResponse:
        whole = req.SerializeToString()
        if self._chunked and len(whole) > self._chunk_bytes:
            try:
                return self._upload_pieces(req.segment_id, whole)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                log.info("the cloud at %s takes no chunked uploads; sending segments whole", self.target)
                self._chunked = False
        return self._ingest.UploadSegment(req, timeout=self._deadline)

    def _upload_pieces(self, segment_id: bytes, whole: bytes) -> ingest_pb2.UploadSegmentResponse:
        """``whole`` in pieces, from where the cloud is. After a cut the first request carries no data and
        only asks for the cloud's offset (its staging survives its restarts), so nothing is sent twice."""
        sha = hashlib.sha256(whole).digest()
        offset, ask = 0, segment_id in self._interrupted
        if ask:
            self._metrics.upload_resumes.inc()
        # Each answer moves forward or says where to go back to; a cloud that does neither for this
        # many requests is treated as a failed attempt (retried later with backoff), never a busy loop.
        for _ in range(2 * (len(whole) // self._chunk_bytes) + 8):
            piece = b"" if ask else whole[offset : offset + self._chunk_bytes]
            request = ingest_pb2.UploadChunkRequest(
                device_id=self.device_id,
                segment_id=segment_id,
                offset=offset,
                total_bytes=len(whole),
                total_sha256=sha,
                data=piece,
            )
            try:
                answer = self._ingest.UploadChunk(request, timeout=self._deadline)
            except grpc.RpcError:
                self._interrupted[segment_id] = None
                self._interrupted.move_to_end(segment_id)
                while len(self._interrupted) > MAX_INTERRUPTED:
                    self._interrupted.popitem(last=False)
                raise
            if piece:
                self._metrics.upload_pieces.inc()
            ask = False
            if answer.complete:
                self._interrupted.pop(segment_id, None)
                return answer.result
            offset = min(int(answer.next_offset), len(whole))
        self._interrupted[segment_id] = None
        raise StalledUpload(f"segment {segment_id.hex()}: the cloud's offsets made no progress")


def refused_for_good(exc: grpc.RpcError, seg: StoredSegment, metrics: AgentMetrics) -> bool:
    """True (logged, counted) when the cloud refused the segment's bytes themselves: keeping it would
    block the queue forever, so the caller checkpoints it. False: a transient failure, retry later."""
    if exc.code() not in PERMANENT_CODES:
        return False
    log.error("cloud refused segment %s: %s", seg.segment_id.hex(), describe_rpc_error(exc))
    metrics.segments_refused.inc()
    return True


class StalledUpload(grpc.RpcError):
    """A chunked upload that did not advance: handled like any failed upload call (backoff, retry)."""

    def __init__(self, details: str) -> None:
        super().__init__(details)
        self._details = details

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._details


def describe_rpc_error(exc: grpc.RpcError) -> str:
    """``STATUS: details`` of a failed call, for log lines and ``last_error``."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    name = code.name if code is not None else "ERROR"
    return f"{name}: {details}"
