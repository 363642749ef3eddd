"""The coordinator's gRPC surface: the device control stream and segment ingest.

The cloud's grpc adapter (with ``grpc_health`` and ``grpc_reflection``, the only cloud module importing
them). Each call's :class:`~fleetloop_cloud.services.access.Caller` is built here once — the client
certificate's CN with mTLS, else the device id the request claims — and handed to the services, which
check it. Errors from the domain are mapped once, by their class's ``grpc_code``; anything else is an
INTERNAL error logged with its traceback. The server also answers the standard ``grpc.health.v1.Health``
service (``Check``, ``Watch`` and ``List``) and server reflection (``grpc.reflection.v1`` and
``v1alpha``), so load balancers, ``grpc_health_probe`` and ``grpcurl`` work unchanged. The wire
contract, with the status codes each RPC returns, is ``docs/wire.md``.

Why asyncio: every device holds one ``Connect`` stream for as long as it is online. A synchronous gRPC
server spends a worker thread per open stream, so a fleet larger than its pool waits at the door. The
server here is ``grpc.aio`` on an event loop in a thread of its own: an open stream costs two suspended
coroutines, not a thread. The services block (metadata, Parquet, fsync), so they never run on the loop:
they go to a bounded executor (:class:`DomainExecutor`), and the loop keeps serving every other stream.
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
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message import Message

# Not in grpc-stubs (yet): the end-of-stream marker context.read() returns, the asyncio health servicer.
from grpc.aio import EOF  # type: ignore[attr-defined]
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from fleetloop_cloud.services.access import Caller, Refusals
from fleetloop_cloud.services.api import DeviceApi
from fleetloop_cloud.sessions import Session
from fleetloop_shared.clock import stamp_transmit
from fleetloop_shared.errors import FleetloopError, MalformedMessageError
from fleetloop_shared.wire import MAX_MESSAGE_BYTES, device_pb2, ingest_pb2, parse

log = logging.getLogger("fleetloop.cloud.grpc")
T = TypeVar("T")
Req = TypeVar("Req", bound=Message)

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
#: How long a stopping server waits for its left-over handlers, then for the offline records, then
#: for what it had to cancel after that (so a stop takes at most three times this).
STOP_SETTLE_S = 2.0
#: The name prefix of the task recording a device offline after its stream ended (a stop awaits them).
OFFLINE_RECORD = "device-offline"
UNDECODABLE_DETAILS = "Exception deserializing request!"
#: The fleetloop services this server implements (full protobuf names), as health and reflection list them.
SERVICE_NAMES: tuple[str, ...] = (
    device_pb2.DESCRIPTOR.services_by_name["DeviceService"].full_name,
    ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name,
)
#: Server reflection v1: the same messages as v1alpha (field for field), under the released name.
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
#: Services ``Health/List`` reports at most (the standard's overflow policy: RESOURCE_EXHAUSTED).
HEALTH_LIST_LIMIT = 100


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
        done.add_done_callback(self._give_back)
        return await asyncio.wrap_future(done, loop=self._loop)

    def _give_back(self, done: futures.Future[Any]) -> None:
        """A call finished in its thread: its slot is free again (nothing to free once the loop is closed:
        the server is gone)."""
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._slots.release)

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


def _peer_device(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The device id the peer's client certificate proves (its CN), or None without mTLS."""
    names = context.auth_context().get("x509_common_name")
    if not names or isinstance(names, bytes):
        return None
    return bytes(next(iter(names))).decode("utf-8", "replace")


def _caller(context: grpc.aio.ServicerContext[Any, Any], claimed: str) -> Caller:
    """Who this call is from: the certificate's CN with mTLS (the services refuse a claim of another
    device), else the device id the request claims."""
    peer = _peer_device(context)
    return Caller.device(peer if peer is not None else claimed, transport="grpc", proven=peer is not None)


async def _call(
    domain: DomainExecutor, context: grpc.aio.ServicerContext[Any, Any], what: str, fn: Callable[[], T]
) -> T:
    """A service call off the loop; the caller's fault or ours becomes the call's status."""
    try:
        return await domain.run(fn)
    except FleetloopError as exc:
        log.warning("%s refused: %s", what, exc)
        failure = (exc.grpc_code, str(exc))
    except Exception:
        log.exception("%s failed", what)
        failure = ("INTERNAL", f"internal error handling the {what} (logged)")
    await _abort(context, *failure)


class DeviceServicer:
    """``DeviceService.Connect``: one coroutine writes the device's outbox, one task reads its messages."""

    def __init__(self, api: DeviceApi, domain: DomainExecutor) -> None:
        self.api = api
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
        caller = _caller(context, first.hello.device_id)
        devices, clock = self.api.devices, self.api.clock
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        # A push or a close (from any thread) wakes this coroutine: an idle stream holds no thread.
        waker = _waker(loop, wake)
        session = await _call(
            self.domain, context, f"hello from {caller.name}",
            lambda: devices.connect(caller, first.hello, clock(), waker),
        )  # fmt: skip
        reader = asyncio.create_task(self._read(caller, context, session))
        failure: tuple[str, str] | None = None
        try:
            for msg in await self.domain.run(devices.welcome, caller):
                await context.write(msg)
            while not session.closed.is_set():
                try:
                    msg = session.outbox.get_nowait()
                except queue.Empty:
                    wake.clear()
                    if session.outbox.empty() and not session.closed.is_set():
                        await wake.wait()
                    continue
                await context.write(stamp_transmit(msg, int(clock() * 1e9)))
            failure = reader.result() if reader.done() and not reader.cancelled() else None
            if failure is not None:
                await _abort(context, *failure)
        finally:
            reader.cancel()
            if devices.release(session):
                # not awaited here: the handler may be ending because it was cancelled
                task = loop.create_task(
                    self._disconnected(session.device_id), name=f"{OFFLINE_RECORD}:{session.device_id}"
                )
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def _read(
        self,
        caller: Caller,
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
                    await self.domain.run(self._receive, caller, msg)
                except FleetloopError as exc:
                    log.warning("device %s: %s", caller.name, exc)
        except (grpc.RpcError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("device %s: reader failed", caller.name)
        finally:
            session.close()  # wakes the writer side, which ends the call
        return None

    def _receive(self, caller: Caller, msg: device_pb2.DeviceMessage) -> None:
        self.api.devices.receive(caller, msg, self.api.clock())

    async def _disconnected(self, device_id: str) -> None:
        try:
            await self.domain.run(self.api.devices.offline, device_id)
        except Exception:
            log.exception("device %s: recording the disconnect failed", device_id)


@dataclass(frozen=True)
class _Unary:
    """One device RPC answered from one service call: its messages, how to call and how to answer."""

    name: str
    what: str
    request: type[Message]
    response: type[Message]
    call: Callable[[DeviceApi, Caller, Any, float], Any]
    answer: Callable[[Any, Any], Message]

    def handler(self, api: DeviceApi, domain: DomainExecutor) -> grpc.RpcMethodHandler[Any, Any]:
        async def serve(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Message:
            if isinstance(request, _Undecodable):
                await _abort(context, "INTERNAL", UNDECODABLE_DETAILS)
            caller = _caller(context, request.device_id)
            ack = await _call(
                domain, context, f"{self.what} from {caller.name}",
                lambda: self.call(api, caller, request, api.clock()),
            )  # fmt: skip
            return self.answer(request, ack)

        return grpc.unary_unary_rpc_method_handler(
            serve,
            request_deserializer=_counting(self.request, api.refusals),
            response_serializer=self.response.SerializeToString,
        )


INGEST_RPCS = (
    _Unary("UploadSegment", "segment", ingest_pb2.UploadSegmentRequest, ingest_pb2.UploadSegmentResponse,
           lambda api, caller, r, now: api.ingest.segment(caller, r, now),
           lambda r, ack: ack.response(r.segment_id)),
    # One piece of a resumable upload (uploads/staging.py); the last one is acked like UploadSegment.
    _Unary("UploadChunk", "upload piece", ingest_pb2.UploadChunkRequest, ingest_pb2.UploadChunkResponse,
           lambda api, caller, r, now: api.ingest.chunk(caller, r, now),
           lambda r, ack: ack.response(r.segment_id)),
)  # fmt: skip


@dataclass(frozen=True)
class GrpcTls:
    """mTLS for the device port: the server's certificate and key, and the CA device certificates
    must chain to. A device's certificate CN is its device id."""

    ca: Path
    cert: Path
    key: Path


def _counting(cls: type[Req], refusals: Refusals) -> Callable[[bytes], Req | _Undecodable]:
    """A request deserializer that counts undecodable (hostile or corrupt) protobufs and hands the
    handler :data:`UNDECODABLE`, which refuses them (INTERNAL); the server keeps serving everyone else."""

    def deserialize(data: bytes) -> Req | _Undecodable:
        try:
            return parse(cls, data)
        except MalformedMessageError:
            refusals.count("undecodable", "grpc")
            log.warning("undecodable %s refused (%d bytes)", cls.__name__, len(data))
            return UNDECODABLE

    return deserialize


def _add_services(server: grpc.aio.Server, api: DeviceApi, domain: DomainExecutor) -> None:
    device = DeviceServicer(api, domain)
    connect = grpc.stream_stream_rpc_method_handler(
        device.Connect,
        request_deserializer=_counting(device_pb2.DeviceMessage, api.refusals),
        response_serializer=device_pb2.CloudMessage.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(SERVICE_NAMES[0], {"Connect": connect}),
            grpc.method_handlers_generic_handler(
                SERVICE_NAMES[1], {rpc.name: rpc.handler(api, domain) for rpc in INGEST_RPCS}
            ),
        )
    )


class _HealthServicer(health.aio.HealthServicer):  # type: ignore[name-defined,misc]
    """The asyncio health servicer of grpcio-health-checking, plus ``List`` (a snapshot of every
    service's status), which that package's asyncio servicer does not implement yet."""

    def __init__(self) -> None:
        super().__init__()
        self._statuses: dict[str, int] = {"": health_pb2.HealthCheckResponse.SERVING}

    async def set(self, service: str, status: int) -> None:
        await super().set(service, status)
        self._statuses[service] = status

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthListResponse:
        if len(self._statuses) > HEALTH_LIST_LIMIT:
            await _abort(context, "RESOURCE_EXHAUSTED", f"more than {HEALTH_LIST_LIMIT} services")
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in self._statuses.items()
            }
        )


def _register_reflection_v1() -> None:
    """Put a ``grpc.reflection.v1`` file into the default descriptor pool, built from the installed
    v1alpha one (the released v1 renamed the package and changed nothing else), so reflection can
    describe itself under both names."""
    pool = descriptor_pool.Default()
    v1_file = "grpc/reflection/v1/reflection.proto"
    try:
        pool.FindFileByName(v1_file)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = proto.package, "grpc.reflection.v1"
    proto.name, proto.package = v1_file, new
    proto.options.Clear()
    for message in proto.message_type:
        for f in message.field:
            if f.HasField("type_name"):
                f.type_name = f.type_name.replace(f".{old}.", f".{new}.")
    for service in proto.service:
        for m in service.method:
            m.input_type = m.input_type.replace(f".{old}.", f".{new}.")
            m.output_type = m.output_type.replace(f".{old}.", f".{new}.")
    pool.Add(proto)


async def _add_health_and_reflection(server: grpc.aio.Server) -> None:
    """``grpc.health.v1.Health`` reporting SERVING for the server ("") and each fleetloop service, and
    server reflection (v1 and v1alpha) over those services, health and reflection itself. All are
    coroutines on the loop like the device services: an open ``Watch`` holds no thread."""
    servicer = _HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ("", *SERVICE_NAMES):
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    _register_reflection_v1()
    names = (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1)
    reflector = reflection.aio.ReflectionServicer(names)  # type: ignore[attr-defined]
    # v1 and v1alpha messages are the same bytes on the wire: one servicer answers both names.
    handler = grpc.stream_stream_rpc_method_handler(
        reflector.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        tuple(
            grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler})
            for name in (reflection.SERVICE_NAME, REFLECTION_V1)
        )
    )


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
                await _settle_handlers(STOP_SETTLE_S)
            finally:
                if self._domain is not None:
                    self._domain.shutdown()
                self._stopped.set()
                self._loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
        return self._stopped


def start_grpc_server(
    api: DeviceApi, host: str, port: int, *, tls: GrpcTls | None = None
) -> tuple[GrpcServer, int]:
    """Start serving on an event loop in a new thread; returns the server and the bound port (``port`` 0
    picks a free one). With ``tls`` every device must present a client certificate of the CA (mTLS;
    identity = certificate CN).

    The server answers ``grpc.health.v1.Health`` (SERVING for "" and for each of :data:`SERVICE_NAMES`)
    and server reflection (v1 and v1alpha). Health and reflection are not device RPCs: they carry no
    device identity and, with mTLS, need a client certificate of the CA like everything else on the
    port."""
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
        _add_services(server, api, domain)
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


async def _settle_handlers(timeout_s: float) -> None:
    """Let what the stopped server left on the loop end while the loop still runs.

    An idle ``Connect`` stream waits on its wake event and is not ended by ``grpc.aio.Server.stop``;
    left alone, its ``finally`` (release the session, record the device offline) would run only when
    the coroutine is garbage-collected, on a closed loop. So every left-over task but the offline
    records is cancelled; the handlers then get ``timeout_s`` to end, the offline records (those the
    stop itself started and those the cancellations start) ``timeout_s`` more to finish — they are
    never cancelled first, or the device would stay marked online — and whatever still runs after
    that is cancelled: a stop is bounded whatever a handler does."""
    me = asyncio.current_task()

    def left() -> set[asyncio.Task[Any]]:
        return {t for t in asyncio.all_tasks() if t is not me and not t.done()}

    def is_record(task: asyncio.Task[Any]) -> bool:
        return task.get_name().startswith(OFFLINE_RECORD)

    handlers = {t for t in left() if not is_record(t)}
    for task in handlers:
        task.cancel()
    if handlers:
        await asyncio.wait(handlers, timeout=timeout_s)
    if records := {t for t in left() if is_record(t)}:
        await asyncio.wait(records, timeout=timeout_s)
    if rest := left():
        for task in rest:
            task.cancel()
        await asyncio.wait(rest, timeout=timeout_s)


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        loop.close()
