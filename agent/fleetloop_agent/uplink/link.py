"""The link driver: one device's control session and uploads as coroutines, around the uploader core.

:class:`Link` is the only place where pending → grant → read → upload → settle is walked. It owns the
I/O and the timing; the decisions are the pure :class:`~fleetloop_agent.uplink.uploader.Uploader`'s,
the network is an :class:`~fleetloop_agent.uplink.transport.UplinkTransport`'s. Per device it runs:

- the session: connect with the greeting (a hello first), read cloud messages, mark the link up on the
  cloud's welcome, reconnect after jittered backoff when the session ends;
- the sender: the :class:`~fleetloop_agent.uplink.outbox.ControlOutbox` (a member) drained into the
  session once the cloud welcomed it;
- the clock: when the welcome says the cloud answers clock pings, a burst of pings at once and again
  every ``CLOCK_INTERVAL_S``; the :class:`~fleetloop_shared.clock.ClockEstimator` keeps the best
  exchange, and every upload carries its offset;
- the uploads (when the device has a store): the store's pending segments, most urgent first, each
  checkpointed (``mark_uploaded``) only after the cloud acknowledged it or refused it for good, so a cut
  link or a killed process never loses an acknowledged-or-pending segment.

Links live on a :class:`LinkLoop`, an event loop in a thread of its own: an agent's link gets one to
itself, so the rest of the agent sees plain thread-safe calls (``send``, ``grant``, ``kick_upload``,
``connected``, ``flush``, ``stop``); the fleet simulator puts thousands of links on one loop, with new
connections admitted at a bounded rate. Local-store calls block (SQLite, files), so they run in the
loop's bounded executor, never on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent import futures
from typing import Any, TypeVar

from fleetloop_agent.local_store import LocalStore, StoredSegment
from fleetloop_agent.metrics import AgentMetrics
from fleetloop_agent.uplink.outbox import ControlOutbox
from fleetloop_agent.uplink.pacing import LINK_BACKOFF, Backoff, BackoffPolicy, TokenBucket
from fleetloop_agent.uplink.transport import (
    ControlSession,
    RetryLater,
    UplinkTransport,
    UploadAnswer,
    UploadRequest,
)
from fleetloop_agent.uplink.uploader import DEFAULT_CHUNK_BYTES, Send, Settle, Uploader, Wait
from fleetloop_shared.clock import ClockEstimator
from fleetloop_shared.errors import NotFoundError, UnavailableError
from fleetloop_shared.wire import device_pb2

log = logging.getLogger("fleetloop.agent.uplink")
T = TypeVar("T")

#: Seconds an idle link waits for a wake-up before it looks at its store again.
UPLOAD_POLL_S = 1.0
#: Pending segments fetched from the store at once.
PENDING_BATCH = 32
#: Seconds past the upload deadline (at most the deadline again) the link itself waits for a transport's
#: answer before it counts the attempt failed: the bound that holds when a transport's own does not.
ANSWER_GRACE_S = 5.0
#: Seconds ``stop`` gives a link to hang up.
STOP_TIMEOUT_S = 5.0
#: Store calls queued or running at once per loop; overflow policy: the calling coroutine waits.
IO_QUEUE = 256
#: Clock pings per measurement, the pause between them, and the pause between measurements: several
#: round trips each time (the least delayed is kept), again before the two clocks drift apart.
CLOCK_BURST = 8
CLOCK_SPACING_S = 0.05
CLOCK_INTERVAL_S = 600.0
#: Seconds uploads wait, on a link whose cloud answers pings, for the first measurement (so the first
#: segments after a connect carry an offset too); past it they go without one.
CLOCK_WAIT_S = 2.0


class LinkLoop:
    """An event loop in a thread of its own, running links: one for an agent, thousands for a simulator.

    ``io_threads`` run blocking store calls (at most ``IO_QUEUE`` queued or running); ``connect_threads``
    are the loop's default executor, where a transport runs what its library only does blocking (a TLS
    handshake). With ``connect_rate``, new connections are admitted at that rate (token bucket of
    ``connect_burst``; overflow policy: the device waits its turn)."""

    def __init__(
        self,
        *,
        name: str = "uplink",
        io_threads: int = 1,
        connect_threads: int = 2,
        connect_rate: float | None = None,
        connect_burst: int = 1,
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_default_executor(
            futures.ThreadPoolExecutor(max_workers=connect_threads, thread_name_prefix=f"{name}-connect")
        )
        self._admission = TokenBucket(connect_rate, connect_burst) if connect_rate else None
        self._io = futures.ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix=f"{name}-io")
        self._io_slots = asyncio.Semaphore(IO_QUEUE)
        #: The links made on this loop (``Link(..., loop=this)``).
        self.links: list[Link] = []
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> futures.Future[T]:
        """Run ``coro`` on the loop (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, fn: Callable[..., object], *args: Any) -> None:
        """Call ``fn(*args)`` on the loop, from any thread; a no-op once the loop is closed."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(fn, *args)

    async def io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking store call in the bounded executor; the slot is freed when the call ends."""
        await self._io_slots.acquire()
        try:
            done = self._io.submit(functools.partial(fn, *args))
        except BaseException:
            self._io_slots.release()
            raise
        done.add_done_callback(lambda _: self.call(self._io_slots.release))
        return await asyncio.wrap_future(done, loop=self.loop)

    async def admit(self) -> None:
        """Wait for this device's turn to open a connection."""
        if self._admission is not None:
            delay = self._admission.delay(self.loop.time())
            if delay > 0:
                await asyncio.sleep(delay)

    def stop_links(self, links: Sequence[Link], timeout_s: float = 30.0) -> None:
        """Hang up many links at once (their sessions ended and transports closed concurrently)."""

        async def stop_all() -> None:
            await asyncio.gather(*(link.aclose() for link in links), return_exceptions=True)

        if self._thread.is_alive() and links:
            with contextlib.suppress(futures.TimeoutError, RuntimeError):
                self.submit(stop_all()).result(timeout=timeout_s)

    def close(self) -> None:
        """Hang up every link on the loop (at once), then stop the loop and its executors."""
        self.stop_links(self.links)
        self.call(self.loop.stop)
        self._thread.join(timeout=10)
        self._io.shutdown(wait=False, cancel_futures=True)


class Link:
    """One device's link to the cloud over ``transport`` (see the module doc for what it runs).

    ``greeting`` is called at every connect (the hello and the state the cloud should learn at once);
    ``on_message`` gets every cloud message, on the loop (it must not block); ``on_ack(segment,
    duplicate)`` runs once per acknowledged segment, before its checkpoint. With ``scheduled``, uploads
    wait for the cloud's grants (:meth:`grant`). ``store=None``: a device that only holds its session.
    ``device_clock`` reads the device's wall clock in ns (the one its samples are stamped with);
    ``measure_clock=False`` sends no clock pings even to a cloud that answers them (a swarm that only
    holds sessions)."""

    def __init__(
        self,
        transport: UplinkTransport,
        *,
        device_id: str,
        metrics: AgentMetrics,
        greeting: Callable[[], Sequence[device_pb2.DeviceMessage]],
        on_message: Callable[[device_pb2.CloudMessage], None],
        store: LocalStore | None = None,
        on_ack: Callable[[StoredSegment, bool], None] | None = None,
        upload_deadline_s: float = 10.0,
        scheduled: bool = False,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        backoff: BackoffPolicy = LINK_BACKOFF,
        rng: random.Random | None = None,
        loop: LinkLoop | None = None,
        device_clock: Callable[[], int] = time.time_ns,
        measure_clock: bool = True,
    ) -> None:
        self.transport = transport
        self.target = transport.target
        self.device_id = device_id
        self._metrics = metrics
        self._greeting = greeting
        self._on_message = on_message
        self._store = store
        self._on_ack = on_ack
        self._deadline = upload_deadline_s
        rng = rng if rng is not None else random.Random()
        self._reconnect = Backoff(backoff, rng)
        self.uploader = (
            Uploader(
                device_id,
                takes_pieces=transport.takes_pieces,
                scheduled=scheduled,
                chunk_bytes=chunk_bytes,
                backoff=Backoff(backoff, rng),
            )
            if store is not None
            else None
        )
        self._host = loop
        self._own_loop = loop is None
        if loop is not None:
            loop.links.append(self)
        self._outbox_wake = asyncio.Event()
        self._upload_wake = asyncio.Event()
        self._outbox = ControlOutbox(metrics, on_put=functools.partial(self._wake, self._outbox_wake))
        #: A message whose send failed with its session: it goes first on the next one.
        self._unsent: device_pb2.DeviceMessage | None = None
        self._device_clock = device_clock
        self._pings_wanted = measure_clock
        #: The device's offset to the cloud's clock, measured over the control session.
        self.clock = ClockEstimator()
        self._pings_due = 0
        #: Set once a measurement burst has had its answers (or when the cloud answers no pings).
        self._clock_settled = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False
        #: Set while the cloud has welcomed the current session (from any thread: wait on it).
        self.connected = threading.Event()
        self.last_error = ""
        #: Connection attempts, the ones that failed, and sessions that ended (for simulator reports).
        self.attempts = 0
        self.connect_failures = 0
        self.sessions_ended = 0
        #: A session is open (the transport connected, the cloud may not have welcomed it yet).
        self.in_session = False

    # -- from any thread --------------------------------------------------------------------------
    def start(self) -> None:
        if self._host is None:
            self._host = LinkLoop(name=f"uplink-{self.device_id}")
            self._host.links.append(self)
        self._host.submit(self._start())

    def stop(self) -> None:
        host = self._host
        if host is None:
            return
        if self._own_loop:
            host.close()
        elif not self._stopped:
            with contextlib.suppress(futures.TimeoutError, RuntimeError):
                host.submit(self.aclose()).result(timeout=STOP_TIMEOUT_S)

    def send(self, msg: device_pb2.DeviceMessage) -> None:
        """Queue ``msg`` for the cloud (drop-oldest when the outbox is full)."""
        self._outbox.put(msg)

    def flush(self, timeout_s: float) -> None:
        """Give queued control messages up to ``timeout_s`` to leave (used before a reboot)."""
        deadline = time.monotonic() + timeout_s
        while (
            self.connected.is_set()
            and (not self._outbox.empty() or self._unsent is not None)
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        time.sleep(0.2)

    def grant(self, max_bytes: int, min_priority: int) -> None:
        """An upload grant from the cloud: ``max_bytes`` more of priority >= ``min_priority``."""
        self._on_loop(self._grant, max_bytes, min_priority)

    def kick_upload(self) -> None:
        """A new segment is in the store: upload without waiting for the next poll."""
        self._wake(self._upload_wake)

    # -- on the loop ------------------------------------------------------------------------------
    def _on_loop(self, fn: Callable[..., object], *args: Any) -> None:
        if self._host is None:
            fn(*args)  # not started: no loop runs yet, nothing to race with
        else:
            self._host.call(fn, *args)

    def _wake(self, event: asyncio.Event) -> None:
        self._on_loop(event.set)

    def _grant(self, max_bytes: int, min_priority: int) -> None:
        if self.uploader is not None:
            self.uploader.grant(max_bytes, min_priority)
            self._upload_wake.set()

    async def _start(self) -> None:
        if self._stopped:
            return
        self._tasks.append(asyncio.create_task(self._hold_session()))
        if self.uploader is not None:
            self._tasks.append(asyncio.create_task(self._upload_loop()))

    async def aclose(self) -> None:
        """End the session, stop uploading and close the transport (idempotent)."""
        self._stopped = True
        await self._close_transport()  # first, while the session is up: a transport may say goodbye on it
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._close_transport()  # again, should a connect have finished meanwhile
        self.connected.clear()

    async def _close_transport(self) -> None:
        try:
            await self.transport.close()
        except Exception:
            log.exception("%s: closing the transport failed", self.device_id)

    def _note_error(self, what: str) -> None:
        if self._stopped:
            return
        if what != self.last_error:
            log.warning("%s: cannot reach cloud at %s: %s (retrying)", self.device_id, self.target, what)
        self.last_error = what

    async def _hold_session(self) -> None:
        assert self._host is not None
        while not self._stopped:
            await self._host.admit()
            self.attempts += 1
            try:
                session = await self.transport.connect(self._greeting())
            except UnavailableError as exc:
                self.connect_failures += 1
                self._note_error(str(exc))
            else:
                await self._serve(session)
            await asyncio.sleep(self._reconnect.next_delay())

    async def _serve(self, session: ControlSession) -> None:
        self.in_session = True
        welcomed = asyncio.Event()
        sender = asyncio.create_task(self._send_loop(session, welcomed))
        clock: asyncio.Task[None] | None = None
        try:
            while True:
                msg = await session.receive()
                kind = msg.WhichOneof("kind")
                if kind == "clock_pong":
                    self._clock_pong(msg.clock_pong)
                    continue
                if kind == "welcome" and not welcomed.is_set():
                    welcomed.set()
                    self._on_welcome()
                    if msg.welcome.answers_clock_ping and self._pings_wanted and clock is None:
                        clock = asyncio.create_task(self._measure_clock())
                    else:
                        self._clock_settled.set()  # an older cloud: nothing to wait for
                try:
                    self._on_message(msg)
                except Exception as exc:  # a handler bug must not end the device's link
                    log.exception("%s: control message handler failed: %s", self.device_id, exc)
        except UnavailableError as exc:
            self._note_error(str(exc))
        finally:
            self.in_session = False
            self.sessions_ended += 1
            self.connected.clear()
            self._pings_due = 0
            busy = [sender] if clock is None else [sender, clock]
            for task in busy:
                task.cancel()
            await asyncio.gather(*busy, return_exceptions=True)
            await session.close()

    def _clock_pong(self, pong: device_pb2.ClockPong) -> None:
        now = self._device_clock()
        if self.clock.pong(pong, now) is None:
            self._metrics.clock_pongs_ignored.inc()
            return
        best = self.clock.best(now)
        if best is not None:
            self._metrics.clock_offset.set(best.offset_ns / 1e9)
            self._metrics.clock_round_trip.set(best.round_trip_ns / 1e9)

    def _on_welcome(self) -> None:
        if self.last_error:
            log.info("%s: cloud at %s reachable again", self.device_id, self.target)
        self.last_error = ""
        self._metrics.reconnects.inc()
        self._reconnect.reset()
        self.connected.set()
        self._upload_wake.set()

    async def _measure_clock(self) -> None:
        """Ask the sender for a burst of clock pings now and every ``CLOCK_INTERVAL_S``."""
        while True:
            for _ in range(CLOCK_BURST):
                self._pings_due = 1
                self._outbox_wake.set()
                await asyncio.sleep(CLOCK_SPACING_S)
            await asyncio.sleep(CLOCK_SPACING_S)  # the last answer's way back
            self._clock_settled.set()
            await asyncio.sleep(CLOCK_INTERVAL_S)

    async def _send_loop(self, session: ControlSession, welcomed: asyncio.Event) -> None:
        """The outbox into the session, once the cloud is there (a message sent before the welcome might
        reach a broker with no coordinator behind it). A clock ping goes before queued messages and is
        stamped as it leaves; one that fails with its session is not sent again (its stamp is stale)."""
        await welcomed.wait()
        while True:
            if self._unsent is None and self._pings_due:
                self._pings_due = 0
                try:
                    await session.send(self.clock.ping(self._device_clock()))
                except UnavailableError as exc:
                    self._note_error(str(exc))
                    return
                continue
            msg = self._unsent if self._unsent is not None else self._outbox.take()
            if msg is None:
                self._outbox_wake.clear()
                if self._outbox.empty() and not self._pings_due:
                    await self._outbox_wake.wait()
                continue
            self._unsent = msg
            try:
                await session.send(msg)
            except UnavailableError as exc:
                self._note_error(str(exc))
                return  # the session is over; receive() says so to _serve
            self._unsent = None

    async def _upload_loop(self) -> None:
        uploader = self.uploader
        assert uploader is not None and self._host is not None
        loop = self._host.loop
        while not self._stopped:
            now = loop.time()
            timeout = UPLOAD_POLL_S if uploader.due(now) else uploader.retry_at - now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._upload_wake.wait(), timeout)
            self._upload_wake.clear()
            if self._stopped or not self.connected.is_set() or not uploader.due(loop.time()):
                continue
            try:
                await self._drain(uploader)
            except asyncio.CancelledError:
                if self._cancelled_here():
                    raise
                # not a stop: a library cancelled something under the drain; the loop must go on
                log.warning("%s: an upload was cancelled under the link (retrying)", self.device_id)
                self._metrics.upload_errors.inc()
                uploader.defer(loop.time())
            except Exception as exc:  # a bug must not stop uploads for good: counted, retried later
                log.exception("%s: upload failed: %s", self.device_id, exc)
                self._metrics.upload_errors.inc()
                uploader.defer(loop.time())

    async def _drain(self, uploader: Uploader) -> None:
        """Pending → grant → read → upload → settle, until the store is empty, a grant is used up or an
        attempt failed (then the uploader says when to try again)."""
        store = self._store
        assert store is not None and self._host is not None
        io = self._host.io
        if self.clock.best(self._device_clock()) is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._clock_settled.wait(), CLOCK_WAIT_S)
        while not self._stopped:
            batch = await io(store.pending, PENDING_BATCH)
            if not batch:
                break
            for seg in batch:
                if not uploader.admit(seg):
                    return  # wait for the next grant
                try:
                    data = await io(store.read, seg.segment_id)
                except NotFoundError:
                    continue  # evicted by the quota between pending() and read()
                if not await self._upload(uploader, seg, data):
                    return
            stats = await io(store.stats)
            self._metrics.store_pending_bytes.set(stats.bytes_pending)

    async def _upload(self, uploader: Uploader, seg: StoredSegment, data: bytes) -> bool:
        """One segment, whole or in pieces, until it is settled (True) or the attempt failed (False)."""
        assert self._store is not None and self._host is not None
        transfer = uploader.begin(seg, data, self.clock.report(self._device_clock()))
        if transfer.resumed:
            self._metrics.upload_resumes.inc()
        while True:
            answer = await self._answer(uploader.request(transfer))
            verdict = uploader.answer(transfer, answer, self._host.loop.time())
            if isinstance(verdict, Wait):
                self._metrics.upload_errors.inc()
                log.warning(
                    "%s: upload to %s failed: %s (retrying)", self.device_id, self.target, verdict.reason
                )
                return False
            if verdict.piece_landed:
                self._metrics.upload_pieces.inc()
            if isinstance(verdict, Send):
                if verdict.note:
                    log.info("%s: %s: %s", self.device_id, self.target, verdict.note)
                continue
            self._settled(seg, verdict)
            await self._host.io(self._store.mark_uploaded, seg.segment_id)
            return True

    async def _answer(self, request: UploadRequest) -> UploadAnswer:
        """The transport's answer to ``request``, bounded here as well as by the transport: a call its
        library never completes (past its own deadline) or cancels under the link (grpc.aio raises
        ``CancelledError`` for a call it cancelled itself) is a failed attempt, logged and retried, never
        an upload loop that waits forever with the segment pending."""
        limit = self._deadline + min(self._deadline, ANSWER_GRACE_S)
        try:
            return await asyncio.wait_for(self.transport.upload(request, self._deadline), limit)
        except TimeoutError:
            return RetryLater(f"DEADLINE_EXCEEDED: the transport gave no answer within {limit:g} s")
        except asyncio.CancelledError:
            if self._cancelled_here():
                raise
            return RetryLater("CANCELLED: the upload's call was cancelled under the link")

    def _cancelled_here(self) -> bool:
        """Whether a ``CancelledError`` seen now is this link's own cancellation (a stop), not a call's."""
        task = asyncio.current_task()
        return self._stopped or task is None or task.cancelling() > 0

    def _settled(self, seg: StoredSegment, verdict: Settle) -> None:
        if verdict.acknowledged:
            self._metrics.segments_uploaded.inc()
            if self._on_ack is not None:
                self._on_ack(seg, verdict.duplicate)
        else:
            log.error(
                "%s: cloud refused segment %s: %s", self.device_id, seg.segment_id.hex(), verdict.reason
            )
            self._metrics.segments_refused.inc()
