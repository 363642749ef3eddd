"""The coordinator's gRPC surface: the device control stream and segment ingest.

The only cloud module that imports grpc. Errors from the domain are mapped once, by their class's
``grpc_code``; anything else is an INTERNAL error logged with its traceback. The server also answers the
standard ``grpc.health.v1.Health`` service (overall and per service) and server reflection
(``grpc.reflection.v1alpha``), so load balancers, ``grpc_health_probe`` and ``grpcurl`` work unchanged.
The wire contract, with the status codes each RPC returns, is ``docs/wire.md``.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fleetloop_cloud.coordinator import Coordinator
from fleetloop_shared.errors import FleetloopError
from fleetloop_shared.wire import MAX_MESSAGE_BYTES, device_pb2, device_pb2_grpc, ingest_pb2, ingest_pb2_grpc

log = logging.getLogger("fleetloop.cloud.grpc")
T = TypeVar("T")

#: Devices holding a control stream each occupy one worker thread (sync gRPC); bounded.
MAX_WORKERS = 128
#: The fleetloop services this server implements (full protobuf names), as health and reflection list them.
SERVICE_NAMES: tuple[str, ...] = (
    device_pb2.DESCRIPTOR.services_by_name["DeviceService"].full_name,
    ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name,
)


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
        _check_identity(self.c, context, first.hello.device_id)
        try:
            self.c.on_hello(first.hello)
        except FleetloopError as exc:
            _abort(context, exc)
        except Exception:
            log.exception("hello from %s failed", first.hello.device_id)
            context.abort(grpc.StatusCode.INTERNAL, "internal error handling the hello (logged)")
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
        _check_identity(self.c, context, request.device_id)
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
        except Exception:
            log.exception("upload from %s failed", request.device_id)
            context.abort(grpc.StatusCode.INTERNAL, "internal error storing the segment (logged)")
            raise  # unreachable: abort raises
        return ingest_pb2.UploadSegmentResponse(
            segment_id=request.segment_id, duplicate=ack.duplicate, samples=ack.samples
        )


@dataclass(frozen=True)
class GrpcTls:
    """mTLS for the device port: the server's certificate and key, and the CA device certificates
    must chain to. A device's certificate CN is its device id."""

    ca: Path
    cert: Path
    key: Path


def _peer_device(context: grpc.ServicerContext) -> str | None:
    """The device id the peer's client certificate proves (its CN), or None without mTLS."""
    names = context.auth_context().get("x509_common_name")
    if not names or isinstance(names, bytes):
        return None
    return bytes(names[0]).decode("utf-8", "replace")


def _check_identity(c: Coordinator, context: grpc.ServicerContext, claimed: str) -> None:
    """Refuse (PERMISSION_DENIED, counted) a message naming another device than the certificate."""
    peer = _peer_device(context)
    if peer is not None and claimed != peer:
        c.refused["impersonation"] += 1
        log.warning("device %s claimed to be %r: refused", peer, claimed)
        context.abort(grpc.StatusCode.PERMISSION_DENIED, f"this connection is device {peer}, not {claimed!r}")


def _counting(parse: Callable[[bytes], T], c: Coordinator, what: str) -> Callable[[bytes], T]:
    """A request deserializer that counts undecodable (hostile or corrupt) protobufs before gRPC
    refuses them; the server keeps serving everyone else."""

    def deserialize(data: bytes) -> T:
        try:
            return parse(data)
        except DecodeError:
            c.refused["undecodable"] += 1
            log.warning("undecodable %s refused (%d bytes)", what, len(data))
            raise

    return deserialize


def _add_services(server: grpc.Server, c: Coordinator) -> None:
    device, ingest = DeviceServicer(c), IngestServicer(c)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "fleetloop.device.v1.DeviceService",
                {
                    "Connect": grpc.stream_stream_rpc_method_handler(
                        device.Connect,
                        request_deserializer=_counting(
                            device_pb2.DeviceMessage.FromString, c, "DeviceMessage"
                        ),
                        response_serializer=device_pb2.CloudMessage.SerializeToString,
                    )
                },
            ),
            grpc.method_handlers_generic_handler(
                "fleetloop.ingest.v1.IngestService",
                {
                    "UploadSegment": grpc.unary_unary_rpc_method_handler(
                        ingest.UploadSegment,
                        request_deserializer=_counting(
                            ingest_pb2.UploadSegmentRequest.FromString, c, "UploadSegmentRequest"
                        ),
                        response_serializer=ingest_pb2.UploadSegmentResponse.SerializeToString,
                    )
                },
            ),
        )
    )


def _add_health_and_reflection(server: grpc.Server) -> health.HealthServicer:
    """``grpc.health.v1.Health`` reporting SERVING for the server ("") and each fleetloop service, and
    server reflection over those services, health and reflection itself."""
    # Watch is non-blocking: an open watch holds none of the server's worker threads (updates are sent
    # from a small pool of its own). Check is unary and quick, on the server's pool like any call.
    servicer = health.HealthServicer(
        experimental_non_blocking=True,
        experimental_thread_pool=futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="grpc-health"),
    )
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ("", *SERVICE_NAMES):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflected = (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(reflected, server)
    return servicer


def start_grpc_server(
    coordinator: Coordinator, host: str, port: int, *, tls: GrpcTls | None = None
) -> tuple[grpc.Server, int]:
    """Start serving; returns the server and the bound port (``port`` 0 picks a free one). With ``tls``
    every device must present a client certificate of the CA (mTLS; identity = certificate CN).

    The server answers ``grpc.health.v1.Health`` (SERVING for "" and for each of :data:`SERVICE_NAMES`)
    and server reflection. Health and reflection are not device RPCs: they carry no device identity and,
    with mTLS, need a client certificate of the CA like everything else on the port."""
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
    _add_services(server, coordinator)
    _add_health_and_reflection(server)
    if tls is not None:
        creds = grpc.ssl_server_credentials(
            [(tls.key.read_bytes(), tls.cert.read_bytes())],
            root_certificates=tls.ca.read_bytes(),
            require_client_auth=True,
        )
        bound = server.add_secure_port(f"{host}:{port}", creds)
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC to {host}:{port}")
    server.start()
    return server, bound
