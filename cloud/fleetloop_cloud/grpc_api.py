"""The coordinator's gRPC surface: the device control stream and segment ingest.

The only cloud module that imports grpc. Errors from the domain are mapped once, by their class's
``grpc_code``; anything else is an INTERNAL error logged with its traceback. The server also answers the
standard ``grpc.health.v1.Health`` service (overall and per service) and server reflection
(``grpc.reflection.v1alpha``), so load balancers, ``grpc_health_probe`` and ``grpcurl`` work unchanged.
The wire contract, with the status codes each RPC returns, is ``docs/wire.md``.

Why asyncio (issue 6): every device holds one ``Connect`` stream for as long as it is online. A
synchronous gRPC server spends a worker thread per open stream, so a fleet larger than its pool waits at
the door (it was 128). The server here is ``grpc.aio`` on an event loop in a thread of its own: an open
stream costs two suspended coroutines, not a thread. The coordinator's domain calls (hello: metadata;
ingest: decode + Parquet + fsync + metadata) block, so they never run on the loop: they go to a bounded
executor (:class:`DomainExecutor`), and the loop keeps serving every other stream meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

# Not in grpc-stubs (yet): the end-of-stream marker context.read() returns, the asyncio health servicer.
from grpc.aio import EOF  # type: ignore[attr-defined]
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fleetloop_cloud.coordinator import Coordinator
from fleetloop_cloud.sessions import Session
from fleetloop_shared.errors import FleetloopError
from fleetloop_shared.wire import MAX_MESSAGE_BYTES, device_pb2, ingest_pb2

log = logging.getLogger("fleetloop.cloud.grpc")
T = TypeVar("T")

#: RPCs served at once (open control streams + uploads in flight + health/reflection). Overflow policy:
#: gRPC itself answers RESOURCE_EXHAUSTED to the call beyond it; the device retries with backoff.
MAX_CONCURRENT_RPCS = 20_000
#: Threads running the coordinator's blocking domain calls (SQLite/PostgreSQL, Parquet, fsync).
DOMAIN_THREADS = 8
#: Domain calls queued or running at once. Overflow policy: the caller waits (backpressure: its stream
#: is not read meanwhile; an upload's own deadline bounds the wait, DEADLINE_EXCEEDED, then a retry).
DOMAIN_QUEUE = 256
#: What a request that does not decode is answered, with INTERNAL: gRPC's own words for a failing request
#: deserializer (the synchronous server's answer, docs/wire.md), kept by this server.
UNDECODABLE_DETAILS = "Exception deserializing request!"
#: The fleetloop services this server implements (full protobuf names), as health and reflection list them.
SERVICE_NAMES: tuple[str, ...] = (
    device_pb2.DESCRIPTOR.services_by_name["DeviceService"].full_name,
    ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name,
)


class _Undecodable:
    """What the counting deserializer hands the handler instead of raising: grpc.aio would answer a raising
    deserializer UNKNOWN with the parser's message, where the wire contract says INTERNAL."""


UNDECODABLE = _Undecodable()


class DomainExecutor:
    """Runs blocking coordinator calls off the event loop: ``DOMAIN_THREADS`` threads, at most
    ``DOMAIN_QUEUE`` calls queued or running; beyond that the awaiting coroutine waits for a slot.

    A slot is given back when the call *finishes* in its thread, not when its awaiting coroutine is
    cancelled (a client deadline), so cancelled calls still count against the bound."""

    def __init__(self, loop: asyncio.AbstractEventLoop, threads: int, limit: int) -> None:
        self._loop = loop
        self._pool = futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grpc-domain")
        self._slots = asyncio.Semaphore(limit)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        await self._slots.acquire()
        try:
            done = self._pool.submit(functools.partial(fn, *args))
        except BaseException:
            self._slots.release()
            raise
        done.add_done_callback(lambda _: self._loop.call_soon_threadsafe(self._slots.release))
        return await asyncio.wrap_future(done, loop=self._loop)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _waker(loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> Callable[[], None]:
    """Set ``event`` on ``loop`` from any thread; a no-op once the loop is closed (the stream is gone)."""

    def wake() -> None:
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(event.set)

    return wake


async def _abort(context: grpc.aio.ServicerContext[Any, Any], code: str, details: str) -> NoReturn:
    await context.abort(grpc.StatusCode[code], details)
    raise AssertionError("unreachable: abort raises")


class DeviceServicer:
    """``DeviceService.Connect``: one coroutine writes the device's outbox, one task reads its messages."""

    def __init__(self, coordinator: Coordinator, domain: DomainExecutor) -> None:
        self.c = coordinator
        self.domain = domain
        self._background: set[asyncio.Task[None]] = set()

    async def Connect(
        self,
        request_iterator: Any,
        context: grpc.aio.ServicerContext[device_pb2.DeviceMessage, device_pb2.CloudMessage],
    ) -> None:
        first: object = await context.read()
        if first is EOF:
            return  # closed before any message: OK
        if isinstance(first, _Undecodable):
            await _abort(context, "INTERNAL", UNDECODABLE_DETAILS)
        assert isinstance(first, device_pb2.DeviceMessage)
        if first.WhichOneof("kind") != "hello":
            await _abort(context, "INVALID_ARGUMENT", "the first message on the stream must be a hello")
        device_id = first.hello.device_id
        await _check_identity(self.c, context, device_id)
        failure: tuple[str, str] | None = None
        try:
            await self.domain.run(self.c.on_hello, first.hello)
        except FleetloopError as exc:
            failure = (exc.grpc_code, str(exc))
        except Exception:
            log.exception("hello from %s failed", device_id)
            failure = ("INTERNAL", "internal error handling the hello (logged)")
        if failure is not None:
            await _abort(context, *failure)
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        # A push or a close (from any thread) wakes this coroutine: an idle stream holds no thread.
        session = self.c.sessions.open(device_id, wake=_waker(loop, wake))
        reader = asyncio.create_task(self._read(device_id, context, session))
        try:
            for msg in await self.domain.run(self.c.welcome_messages, device_id):
                await context.write(msg)
            while not session.closed.is_set():
                try:
                    msg = session.outbox.get_nowait()
                except queue.Empty:
                    wake.clear()
                    if session.outbox.empty() and not session.closed.is_set():
                        await wake.wait()
                    continue
                await context.write(msg)
            failure = reader.result() if reader.done() and not reader.cancelled() else None
            if failure is not None:
                await _abort(context, *failure)
        finally:
            reader.cancel()
            if self.c.sessions.close(session):
                # not awaited here: the handler may be ending because it was cancelled
                task = loop.create_task(self._disconnected(device_id))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def _read(
        self,
        device_id: str,
        context: grpc.aio.ServicerContext[device_pb2.DeviceMessage, device_pb2.CloudMessage],
        session: Session,
    ) -> tuple[str, str] | None:
        """The device's messages, in order (each applied before the next is read). Returns the status
        to end the stream with when a message does not decode (the writer side ends the call)."""
        try:
            while True:
                msg: object = await context.read()
                if msg is EOF:
                    return None
                if isinstance(msg, _Undecodable):
                    return ("INTERNAL", UNDECODABLE_DETAILS)
                assert isinstance(msg, device_pb2.DeviceMessage)
                try:
                    await self.domain.run(self.c.on_device_message, device_id, msg)
                except FleetloopError as exc:
                    log.warning("device %s: %s", device_id, exc)
        except (grpc.RpcError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("device %s: reader failed", device_id)
        finally:
            session.close()  # wakes the writer side, which ends the call
        return None

    async def _disconnected(self, device_id: str) -> None:
        try:
            await self.domain.run(self.c.on_disconnect, device_id)
        except Exception:
            log.exception("device %s: recording the disconnect failed", device_id)


class IngestServicer:
    def __init__(self, coordinator: Coordinator, domain: DomainExecutor) -> None:
        self.c = coordinator
        self.domain = domain

    async def _store(
        self, device_id: str, context: grpc.aio.ServicerContext[Any, Any], what: str, call: Callable[[], T]
    ) -> T:
        """One upload's domain call, off the loop, for the device the peer proved to be; the caller's
        fault or ours becomes the call's status."""
        await _check_identity(self.c, context, device_id)
        try:
            return await self.domain.run(call)
        except FleetloopError as exc:
            log.warning("%s from %s refused: %s", what, device_id, exc)
            failure = (exc.grpc_code, str(exc))
        except Exception:
            log.exception("%s from %s failed", what, device_id)
            failure = ("INTERNAL", f"internal error storing the {what} (logged)")
        await _abort(context, *failure)

    async def UploadSegment(
        self,
        request: ingest_pb2.UploadSegmentRequest | _Undecodable,
        context: grpc.aio.ServicerContext[ingest_pb2.UploadSegmentRequest, ingest_pb2.UploadSegmentResponse],
    ) -> ingest_pb2.UploadSegmentResponse:
        if isinstance(request, _Undecodable):
            await _abort(context, "INTERNAL", UNDECODABLE_DETAILS)
        r = request
        ack = await self._store(
            r.device_id,
            context,
            "segment",
            functools.partial(
                self.c.ingest, r.device_id, r.segment_id, r.capture_id, r.campaign, r.priority, r.segment
            ),
        )
        return ingest_pb2.UploadSegmentResponse(
            segment_id=r.segment_id, duplicate=ack.duplicate, samples=ack.samples
        )

    async def UploadChunk(
        self,
        request: ingest_pb2.UploadChunkRequest | _Undecodable,
        context: grpc.aio.ServicerContext[ingest_pb2.UploadChunkRequest, ingest_pb2.UploadChunkResponse],
    ) -> ingest_pb2.UploadChunkResponse:
        """One piece of a resumable upload (upload_staging.py); the last one is acked like UploadSegment."""
        if isinstance(request, _Undecodable):
            await _abort(context, "INTERNAL", UNDECODABLE_DETAILS)
        r = request
        ack = await self._store(
            r.device_id,
            context,
            "upload piece",
            functools.partial(
                self.c.ingest_chunk,
                r.device_id,
                r.segment_id,
                offset=r.offset,
                total_bytes=r.total_bytes,
                total_sha256=r.total_sha256,
                data=r.data,
            ),
        )
        out = ingest_pb2.UploadChunkResponse(next_offset=ack.next_offset, complete=ack.ack is not None)
        if ack.ack is not None:
            out.result.segment_id = r.segment_id
            out.result.duplicate = ack.ack.duplicate
            out.result.samples = ack.ack.samples
        return out


@dataclass(frozen=True)
class GrpcTls:
    """mTLS for the device port: the server's certificate and key, and the CA device certificates
    must chain to. A device's certificate CN is its device id."""

    ca: Path
    cert: Path
    key: Path


def _peer_device(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The device id the peer's client certificate proves (its CN), or None without mTLS."""
    names = context.auth_context().get("x509_common_name")
    if not names or isinstance(names, bytes):
        return None
    return bytes(next(iter(names))).decode("utf-8", "replace")


async def _check_identity(c: Coordinator, context: grpc.aio.ServicerContext[Any, Any], claimed: str) -> None:
    """Refuse (PERMISSION_DENIED, counted) a message naming another device than the certificate."""
    peer = _peer_device(context)
    if peer is not None and claimed != peer:
        c.refused["impersonation"] += 1
        log.warning("device %s claimed to be %r: refused", peer, claimed)
        await _abort(context, "PERMISSION_DENIED", f"this connection is device {peer}, not {claimed!r}")


def _counting(parse: Callable[[bytes], T], c: Coordinator, what: str) -> Callable[[bytes], T | _Undecodable]:
    """A request deserializer that counts undecodable (hostile or corrupt) protobufs and hands the
    handler :data:`UNDECODABLE`, which refuses them (INTERNAL); the server keeps serving everyone else."""

    def deserialize(data: bytes) -> T | _Undecodable:
        try:
            return parse(data)
        except DecodeError:
            c.refused["undecodable"] += 1
            log.warning("undecodable %s refused (%d bytes)", what, len(data))
            return UNDECODABLE

    return deserialize


def _add_services(server: grpc.aio.Server, c: Coordinator, domain: DomainExecutor) -> None:
    device, ingest = DeviceServicer(c, domain), IngestServicer(c, domain)
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
                    ),
                    "UploadChunk": grpc.unary_unary_rpc_method_handler(
                        ingest.UploadChunk,
                        request_deserializer=_counting(
                            ingest_pb2.UploadChunkRequest.FromString, c, "UploadChunkRequest"
                        ),
                        response_serializer=ingest_pb2.UploadChunkResponse.SerializeToString,
                    ),
                },
            ),
        )
    )


async def _add_health_and_reflection(server: grpc.aio.Server) -> None:
    """``grpc.health.v1.Health`` reporting SERVING for the server ("") and each fleetloop service, and
    server reflection over those services, health and reflection itself. Both are coroutines on the
    loop like the device services: an open ``Watch`` holds no thread."""
    servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ("", *SERVICE_NAMES):
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflected = (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(reflected, server)


class GrpcServer:
    """The running asyncio gRPC server and the thread its event loop runs in.

    ``stop(grace)`` returns an event that is set once the server has stopped (the same shape as
    ``grpc.Server.stop``, so callers write ``server.stop(grace=2).wait(3)``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        self._loop = loop
        self._thread = thread
        self._server: grpc.aio.Server | None = None
        self._domain: DomainExecutor | None = None
        self._stopped = threading.Event()
        self._stopping = False

    def stop(self, grace: float | None) -> threading.Event:
        if self._stopping:
            return self._stopped
        self._stopping = True
        if self._server is None or not self._thread.is_alive():
            self._stopped.set()
            return self._stopped

        async def shutdown() -> None:
            try:
                assert self._server is not None
                await self._server.stop(grace)
            finally:
                if self._domain is not None:
                    self._domain.shutdown()
                self._stopped.set()
                self._loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
        return self._stopped


def start_grpc_server(
    coordinator: Coordinator, host: str, port: int, *, tls: GrpcTls | None = None
) -> tuple[GrpcServer, int]:
    """Start serving on an event loop in a new thread; returns the server and the bound port (``port`` 0
    picks a free one). With ``tls`` every device must present a client certificate of the CA (mTLS;
    identity = certificate CN).

    The server answers ``grpc.health.v1.Health`` (SERVING for "" and for each of :data:`SERVICE_NAMES`)
    and server reflection. Health and reflection are not device RPCs: they carry no device identity and,
    with mTLS, need a client certificate of the CA like everything else on the port."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=_run_loop, args=(loop,), name="grpc-aio", daemon=True)
    handle = GrpcServer(loop, thread)

    async def start() -> int:
        domain = DomainExecutor(loop, DOMAIN_THREADS, DOMAIN_QUEUE)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ],
            maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
        )
        handle._server, handle._domain = server, domain
        _add_services(server, coordinator, domain)
        await _add_health_and_reflection(server)
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
        await server.start()
        return bound

    thread.start()
    try:
        bound = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    except BaseException:
        handle.stop(grace=0)
        raise
    return handle, bound


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        loop.close()
