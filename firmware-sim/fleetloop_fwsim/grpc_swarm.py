"""Many simulated devices' gRPC links on one asyncio event loop: a fleet of thousands from one thread.

The agent's :class:`~fleetloop_agent.uplink.CloudLink` spends a gRPC channel and two threads per device,
which is right for one agent and wrong for a simulator that must put 10,000 devices in front of one
coordinator (issue 6): 20,000 threads do not fit a small machine. :class:`SwarmLink` speaks exactly the
same protocol — a ``DeviceService.Connect`` stream that opens with the device's greeting, then the
outbox; ``IngestService.UploadSegment`` of the local store's pending segments, checkpointed only after
the cloud's ack; the same channel options, backoff, permanent codes, grant rule and request builder,
imported from the agent's uplink — but as coroutines on one event loop (:class:`GrpcSwarm`).

Each device keeps its own identity and its own connection: its own channel (a local subchannel pool, so
gRPC does not fold the devices' channels onto one shared TCP connection) and, with mTLS, its own client
certificate. New control streams are admitted at a bounded rate (``connect_rate`` per second, token
bucket), so a fleet starting at once — or all reconnecting after a coordinator restart, with jittered
backoff on top — arrives as a ramp, not a storm. Local-store calls (SQLite, files) block, so they run in a
bounded executor, never on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import random
import resource
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio

from fleetloop_agent.control_outbox import ControlOutbox
from fleetloop_agent.local_store import LocalStore, StoredSegment
from fleetloop_agent.metrics import AgentMetrics
from fleetloop_agent.uplink import (
    BACKOFF_MAX_S,
    BACKOFF_MIN_S,
    CHANNEL_OPTIONS,
    describe_rpc_error,
    refused_for_good,
)
from fleetloop_agent.upload_protocol import UploadGrants, acknowledged, upload_request
from fleetloop_shared.errors import NotFoundError
from fleetloop_shared.wire import device_pb2, ingest_pb2

log = logging.getLogger("fleetloop.fwsim.grpc_swarm")
T = TypeVar("T")

#: New control streams per second, for the whole swarm (token bucket; overflow policy: the device waits
#: its turn). Chosen so a coordinator's hello handling (a metadata write each) keeps up on 2 cores.
CONNECT_RATE = 500.0
#: Threads for the devices' local-store calls.
IO_THREADS = 4
#: Store calls queued or running at once; overflow policy: the device's coroutine waits for a slot.
IO_QUEUE = 256
#: Seconds a link waits for an upload wake-up before looking at its store again (as CloudLink does).
UPLOAD_POLL_S = 1.0
CONNECT_PATH = "/fleetloop.device.v1.DeviceService/Connect"
UPLOAD_PATH = "/fleetloop.ingest.v1.IngestService/UploadSegment"
#: Each device's channel gets its own connection, like a real device (gRPC would otherwise share one
#: subchannel between channels of equal target and options).
SWARM_CHANNEL_OPTIONS = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]


def raise_open_files_limit() -> int:
    """Lift this process's soft open-files limit to the hard one (each device holds a socket); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


class GrpcSwarm:
    """The event loop (one thread) that runs every :class:`SwarmLink` of a simulated fleet."""

    def __init__(self, *, connect_rate: float = CONNECT_RATE, io_threads: int = IO_THREADS) -> None:
        raise_open_files_limit()
        self.loop = asyncio.new_event_loop()
        self._connect_interval = 1.0 / connect_rate
        self._next_admit = 0.0
        self._io = futures.ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="swarm-io")
        self._io_slots = asyncio.Semaphore(IO_QUEUE)
        self._thread = threading.Thread(target=self._run, name="grpc-swarm", daemon=True)
        self._thread.start()
        self.links: list[SwarmLink] = []

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> futures.Future[T]:
        """Run ``coro`` on the swarm's loop (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def wake(self, event: asyncio.Event) -> None:
        """Set ``event`` on the loop, from any thread."""
        self.loop.call_soon_threadsafe(event.set)

    async def admit(self) -> None:
        """Wait for this device's turn to open a control stream (token bucket, ``connect_rate``/s)."""
        now = self.loop.time()
        turn = max(self._next_admit, now)
        self._next_admit = turn + self._connect_interval
        if turn > now:
            await asyncio.sleep(turn - now)

    async def io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking store call in the bounded executor; the slot is freed when the call ends."""
        await self._io_slots.acquire()
        try:
            done = self._io.submit(functools.partial(fn, *args))
        except BaseException:
            self._io_slots.release()
            raise
        done.add_done_callback(lambda _: self.loop.call_soon_threadsafe(self._io_slots.release))
        return await asyncio.wrap_future(done, loop=self.loop)

    def link(
        self,
        target: str,
        device_id: str,
        *,
        store: LocalStore | None,
        metrics: AgentMetrics,
        greeting: Callable[[], list[device_pb2.DeviceMessage]],
        on_message: Callable[[device_pb2.CloudMessage], None],
        upload_deadline_s: float = 10.0,
        on_ack: Callable[[StoredSegment, bool], None] | None = None,
        tls: tuple[Path, Path, Path] | None = None,
        grants: bool = False,
    ) -> SwarmLink:
        """A device's link on this swarm (same arguments as ``CloudLink``; ``store=None``: a device
        that only holds its control stream, with nothing to upload)."""
        link = SwarmLink(
            self, target, device_id, store=store, metrics=metrics, greeting=greeting,
            on_message=on_message, upload_deadline_s=upload_deadline_s, on_ack=on_ack, tls=tls,
            grants=grants,
        )  # fmt: skip
        self.links.append(link)
        return link

    def stop_links(self, links: Sequence[SwarmLink], timeout_s: float = 30.0) -> None:
        """Stop many links at once (their streams cancelled, channels closed concurrently)."""

        async def stop_all() -> None:
            await asyncio.gather(*(link.aclose() for link in links), return_exceptions=True)

        with contextlib.suppress(futures.TimeoutError):
            self.submit(stop_all()).result(timeout=timeout_s)

    def close(self) -> None:
        self.stop_links(self.links)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self._io.shutdown(wait=False, cancel_futures=True)


class SwarmLink(ControlOutbox):
    """One simulated device's link: the agent's gRPC protocol as two coroutines on the swarm's loop.

    Same interface as ``CloudLink`` (``connected``, ``send``, ``flush``, ``grant``, ``kick_upload``,
    ``start``, ``stop``, ``last_error``), so the fleet simulator drives either."""

    def __init__(
        self,
        swarm: GrpcSwarm,
        target: str,
        device_id: str,
        *,
        store: LocalStore | None,
        metrics: AgentMetrics,
        greeting: Callable[[], list[device_pb2.DeviceMessage]],
        on_message: Callable[[device_pb2.CloudMessage], None],
        upload_deadline_s: float,
        on_ack: Callable[[StoredSegment, bool], None] | None,
        tls: tuple[Path, Path, Path] | None,
        grants: bool,
    ) -> None:
        super().__init__(metrics)
        self._swarm = swarm
        self.target = target
        self.device_id = device_id
        self._store = store
        self._greeting = greeting
        self._on_message = on_message
        self._deadline = upload_deadline_s
        self._on_ack = on_ack
        self._tls = tls
        self._grants = grants
        self._budget = UploadGrants()
        self.last_error = ""
        self._stopped = False
        self._outbox_wake = asyncio.Event()
        self._upload_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._channel: grpc.aio.Channel | None = None

    # -- from any thread --------------------------------------------------------------------------
    def start(self) -> None:
        self._swarm.submit(self._start())

    def stop(self) -> None:
        if not self._stopped:
            with contextlib.suppress(futures.TimeoutError, RuntimeError):
                self._swarm.submit(self.aclose()).result(timeout=5)

    def send(self, msg: device_pb2.DeviceMessage) -> None:
        super().send(msg)
        self._swarm.wake(self._outbox_wake)

    def grant(self, max_bytes: int, min_priority: int) -> None:
        """An UploadGrant from the cloud (the agent's rule, :class:`UploadGrants`)."""
        self._budget.add(max_bytes, min_priority)
        self._swarm.wake(self._upload_wake)

    def kick_upload(self) -> None:
        self._swarm.wake(self._upload_wake)

    # -- on the loop ------------------------------------------------------------------------------
    async def _start(self) -> None:
        if self._stopped:
            return
        if self._tls is not None:  # mTLS: (ca, cert, key); the certificate's CN is the device id
            ca, cert, key = (Path(x).read_bytes() for x in self._tls)
            creds = grpc.ssl_channel_credentials(ca, private_key=key, certificate_chain=cert)
            self._channel = grpc.aio.secure_channel(self.target, creds, options=SWARM_CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.insecure_channel(self.target, options=SWARM_CHANNEL_OPTIONS)
        self._tasks.append(asyncio.create_task(self._control_loop()))
        if self._store is not None:
            self._tasks.append(asyncio.create_task(self._upload_loop()))

    async def aclose(self) -> None:
        """Cancel the device's coroutines and close its channel (idempotent)."""
        self._stopped = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close(None)
        self.connected.clear()

    def _note_error(self, what: str) -> None:
        if self._stopped:
            return
        if what != self.last_error:
            log.debug("%s: cannot reach cloud at %s: %s (retrying)", self.device_id, self.target, what)
        self.last_error = what

    async def _requests(self, ended: asyncio.Event) -> AsyncIterator[device_pb2.DeviceMessage]:
        for msg in self._greeting():
            yield msg
        while not self._stopped and not ended.is_set():
            try:
                yield self._outbox.get_nowait()
                continue
            except queue.Empty:
                pass
            self._outbox_wake.clear()
            if self._outbox.empty():
                await self._outbox_wake.wait()

    async def _control_loop(self) -> None:
        assert self._channel is not None
        connect = self._channel.stream_stream(
            CONNECT_PATH,
            request_serializer=device_pb2.DeviceMessage.SerializeToString,
            response_deserializer=device_pb2.CloudMessage.FromString,
        )
        backoff = BACKOFF_MIN_S
        while not self._stopped:
            await self._swarm.admit()
            ended = asyncio.Event()
            call = connect(self._requests(ended))
            try:
                async for msg in call:
                    if not self.connected.is_set():
                        self.connected.set()
                        self._metrics.reconnects.inc()
                        self._upload_wake.set()
                        self.last_error = ""
                        backoff = BACKOFF_MIN_S
                    self._on_message(msg)
                self._note_error("cloud closed the control stream")
            except grpc.RpcError as exc:
                self._note_error(describe_rpc_error(exc))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a handler bug must not end the device's link
                log.exception("%s: control message handler failed: %s", self.device_id, exc)
                self._note_error(f"handler failed: {exc}")
            finally:
                ended.set()
                self._outbox_wake.set()
                self.connected.clear()
                call.cancel()
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(BACKOFF_MAX_S, backoff * 2)

    async def _upload_loop(self) -> None:
        assert self._channel is not None
        upload = self._channel.unary_unary(
            UPLOAD_PATH,
            request_serializer=ingest_pb2.UploadSegmentRequest.SerializeToString,
            response_deserializer=ingest_pb2.UploadSegmentResponse.FromString,
        )
        backoff = BACKOFF_MIN_S
        while not self._stopped:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._upload_wake.wait(), UPLOAD_POLL_S)
            self._upload_wake.clear()
            if self._stopped:
                return
            if not self.connected.is_set():
                continue
            try:
                await self._drain(upload)
                backoff = BACKOFF_MIN_S
            except grpc.RpcError as exc:
                self._metrics.upload_errors.inc()
                log.debug("%s: upload failed: %s (retrying)", self.device_id, describe_rpc_error(exc))
                await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
                backoff = min(BACKOFF_MAX_S, backoff * 2)
                self._upload_wake.set()

    async def _drain(self, upload: Any) -> None:
        """CloudLink._drain on the loop: pending → (grant) → read → upload → ack → checkpoint."""
        store = self._store
        assert store is not None
        while not self._stopped:
            batch = await self._swarm.io(store.pending, 32)
            if not batch:
                return
            for seg in batch:
                if self._grants and not self._budget.take(seg):
                    return  # wait for the next grant
                try:
                    data = await self._swarm.io(store.read, seg.segment_id)
                except NotFoundError:
                    continue  # evicted by the quota between pending() and read()
                req = upload_request(self.device_id, seg, data)
                try:
                    resp = await upload(req, timeout=self._deadline)
                except grpc.RpcError as exc:
                    if not refused_for_good(exc, seg, self._metrics):
                        raise
                else:
                    acknowledged(seg, resp, self._metrics, self._on_ack)
                await self._swarm.io(store.mark_uploaded, seg.segment_id)
            stats = await self._swarm.io(store.stats)
            self._metrics.store_pending_bytes.set(stats.bytes_pending)
