"""The coordinator's gRPC surface: the device control stream and segment ingest.

The only cloud module that imports grpc. Errors from the domain are mapped once, by their class's
``grpc_code``; anything else is an INTERNAL error logged with its traceback.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc

from fleetloop_cloud.coordinator import Coordinator
from fleetloop_shared.errors import FleetloopError
from fleetloop_shared.wire import MAX_MESSAGE_BYTES, device_pb2, device_pb2_grpc, ingest_pb2, ingest_pb2_grpc

log = logging.getLogger("fleetloop.cloud.grpc")

#: Devices holding a control stream each occupy one worker thread (sync gRPC); bounded.
MAX_WORKERS = 128


def _abort(context: grpc.ServicerContext, exc: FleetloopError) -> None:
    context.abort(grpc.StatusCode[exc.grpc_code], str(exc))


class DeviceServicer(device_pb2_grpc.DeviceServiceServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator

    def Connect(
        self, request_iterator: Iterator[device_pb2.DeviceMessage], context: grpc.ServicerContext
    ) -> Iterator[device_pb2.CloudMessage]:
        try:
            first = next(request_iterator)
        except StopIteration:
            return
        if first.WhichOneof("kind") != "hello":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message on the stream must be a hello")
        try:
            self.c.on_hello(first.hello)
        except FleetloopError as exc:
            _abort(context, exc)
        device_id = first.hello.device_id
        session = self.c.sessions.open(device_id)

        def read() -> None:
            try:
                for msg in request_iterator:
                    try:
                        self.c.on_device_message(device_id, msg)
                    except FleetloopError as exc:
                        log.warning("device %s: %s", device_id, exc)
            except grpc.RpcError:
                pass
            except Exception:
                log.exception("device %s: reader failed", device_id)
            finally:
                session.closed.set()

        reader = threading.Thread(target=read, name=f"read-{device_id}", daemon=True)
        reader.start()
        try:
            yield from self.c.welcome_messages(device_id)
            while not session.closed.is_set() and context.is_active():
                try:
                    yield session.outbox.get(timeout=0.5)
                except queue.Empty:
                    continue
        finally:
            if self.c.sessions.close(session):
                self.c.on_disconnect(device_id)


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator

    def UploadSegment(
        self, request: ingest_pb2.UploadSegmentRequest, context: grpc.ServicerContext
    ) -> ingest_pb2.UploadSegmentResponse:
        try:
            ack = self.c.ingest(
                request.device_id,
                request.segment_id,
                request.capture_id,
                request.campaign,
                request.priority,
                request.segment,
            )
        except FleetloopError as exc:
            log.warning("upload from %s refused: %s", request.device_id, exc)
            _abort(context, exc)
            raise  # unreachable: abort raises
        return ingest_pb2.UploadSegmentResponse(
            segment_id=request.segment_id, duplicate=ack.duplicate, samples=ack.samples
        )


def start_grpc_server(coordinator: Coordinator, host: str, port: int) -> tuple[grpc.Server, int]:
    """Start serving; returns the server and the bound port (``port`` 0 picks a free one)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="grpc"),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ],
    )
    device_pb2_grpc.add_DeviceServiceServicer_to_server(DeviceServicer(coordinator), server)
    ingest_pb2_grpc.add_IngestServiceServicer_to_server(IngestServicer(coordinator), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC to {host}:{port}")
    server.start()
    return server, bound
