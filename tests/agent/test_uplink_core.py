"""The uploader core on its own: no network, no clock, no threads — only decisions.

A Hypothesis state machine plays a cloud (honest staging of pieces, cuts before and after the cloud took a
piece, refusals, duplicates, an older cloud without pieces, offsets that go nowhere) against the core and
checks after every step what a device must never do: upload what was not granted, send a piece that is
not the segment's bytes at the cloud's offset, retry before its backoff is over, settle a segment the
cloud did not acknowledge or refuse, loop without progress, or send more than the piece in flight again
after a cut.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fleetloop_agent.local_store import StoredSegment
from fleetloop_agent.uplink.pacing import LINK_BACKOFF, Backoff, BackoffPolicy, TokenBucket
from fleetloop_agent.uplink.transport import (
    Acknowledged,
    PiecesUnsupported,
    Progress,
    Refused,
    RetryLater,
    UploadAnswer,
    answer_for_status,
)
from fleetloop_agent.uplink.uploader import Send, Settle, Transfer, Uploader, Wait
from fleetloop_shared.wire import ingest_pb2

MAX_INTERRUPTED = 3


def stored(n: int, *, priority: int = 5, size: int = 100) -> StoredSegment:
    return StoredSegment(
        segment_id=n.to_bytes(16, "big"), capture_id=f"c{n}", campaign="c", priority=priority, group="g",
        samples=10, size_bytes=size, first_ns=0, last_ns=0, created_ns=0,
    )  # fmt: skip


# -- backoff, admission, answers -------------------------------------------------------------------


def test_backoff_doubles_to_its_cap_with_jitter_and_resets() -> None:
    backoff = Backoff(BackoffPolicy(0.5, 4.0, jitter=(0.8, 1.2)), random.Random(7))
    delays = [backoff.next_delay() for _ in range(6)]
    for delay, base in zip(delays, [0.5, 1.0, 2.0, 4.0, 4.0, 4.0], strict=True):
        assert 0.8 * base <= delay <= 1.2 * base
    backoff.reset()
    assert 0.4 <= backoff.next_delay() <= 0.6
    # seeded: the same draws again
    again = Backoff(BackoffPolicy(0.5, 4.0, jitter=(0.8, 1.2)), random.Random(7))
    assert [again.next_delay() for _ in range(6)] == delays


def test_a_bad_backoff_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="min <= max"):
        BackoffPolicy(5.0, 1.0)


def test_token_bucket_admits_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=10.0, burst=3)
    assert [bucket.delay(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.delay(100.0) == pytest.approx(0.1)
    assert bucket.delay(100.0) == pytest.approx(0.2)
    # after a quiet second the burst is back
    assert [bucket.delay(102.0) for _ in range(3)] == [0.0, 0.0, 0.0]


def test_what_a_failed_upload_means_by_its_status() -> None:
    assert answer_for_status("INVALID_ARGUMENT", "bad segment") == Refused("INVALID_ARGUMENT", "bad segment")
    assert answer_for_status("DATA_LOSS", "checksum") == Refused("DATA_LOSS", "checksum")
    for retryable in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "NOT_FOUND", "PERMISSION_DENIED", "INTERNAL"):
        assert isinstance(answer_for_status(retryable, "x"), RetryLater)


# -- grants and the plain cases ---------------------------------------------------------------------


def test_grants_admit_by_bytes_and_priority_with_one_overdraft() -> None:
    up = Uploader("car-1", takes_pieces=False, scheduled=True)
    assert not up.admit(stored(1, priority=9))  # nothing granted
    up.grant(150, 5)
    assert not up.admit(stored(2, priority=3))  # below the granted priority
    assert up.admit(stored(3, priority=9, size=100))
    assert up.admit(stored(4, priority=5, size=100))  # 50 left: it still goes (overdraft)
    assert up.granted_bytes == -50
    assert not up.admit(stored(5, priority=9))
    up.grant(60, 0)  # pays the overdraft, 10 left
    assert up.admit(stored(6, priority=1, size=100))
    assert Uploader("car-1", takes_pieces=False).admit(stored(7, priority=0))  # unscheduled: always


def test_a_whole_segment_is_settled_on_ack_or_refusal_and_waits_on_failure() -> None:
    backoff = Backoff(LINK_BACKOFF, random.Random(1))
    up = Uploader("car-1", takes_pieces=True, chunk_bytes=1 << 20, backoff=backoff)
    t = up.begin(stored(1), b"segment-bytes")
    req = up.request(t)
    assert isinstance(req, ingest_pb2.UploadSegmentRequest) and req.segment == b"segment-bytes"
    assert (req.device_id, req.capture_id, req.priority) == ("car-1", "c1", 5)
    wait = up.answer(t, RetryLater("UNAVAILABLE: down"), now=10.0)
    assert isinstance(wait, Wait) and 10.4 <= wait.until <= 10.6 and "UNAVAILABLE" in wait.reason
    assert not up.due(10.3) and up.due(wait.until)
    assert up.answer(t, Acknowledged(duplicate=True), now=11.0) == Settle(True, duplicate=True)
    t = up.begin(stored(2), b"junk")
    verdict = up.answer(t, Refused("INVALID_ARGUMENT", "does not decode"), now=12.0)
    assert verdict == Settle(False, reason="INVALID_ARGUMENT: does not decode")


def test_an_older_cloud_without_pieces_gets_the_segment_whole_from_then_on() -> None:
    up = Uploader("car-1", takes_pieces=True, chunk_bytes=64)
    t = up.begin(stored(1), bytes(1000))
    assert isinstance(up.request(t), ingest_pb2.UploadChunkRequest)
    verdict = up.answer(t, PiecesUnsupported("UNIMPLEMENTED: no UploadChunk"), now=0.0)
    assert isinstance(verdict, Send) and "whole" in verdict.note
    assert isinstance(up.request(t), ingest_pb2.UploadSegmentRequest)
    assert not up.begin(stored(2), bytes(1000)).in_pieces


def test_offsets_that_go_nowhere_are_a_failed_attempt_not_a_busy_loop() -> None:
    up = Uploader("car-1", takes_pieces=True, chunk_bytes=100)
    t = up.begin(stored(1), bytes(1000))
    verdicts = []
    for _ in range(100):
        up.request(t)
        verdicts.append(up.answer(t, Progress(0), now=0.0))
        if isinstance(verdicts[-1], Wait):
            break
    assert isinstance(verdicts[-1], Wait) and "no progress" in verdicts[-1].reason
    assert len(verdicts) <= 2 * (len(t.encoded) // 100) + 8
    assert up.interrupted() == [stored(1).segment_id]  # the next attempt asks first


# -- the state machine -----------------------------------------------------------------------------


class UploaderMachine(RuleBasedStateMachine):
    """A core against a cloud that stages pieces honestly but may cut, refuse, or misbehave."""

    @initialize(
        pieces=st.booleans(),
        scheduled=st.booleans(),
        chunk=st.integers(16, 256),
        seed=st.integers(0, 2**16),
    )
    def setup(self, pieces: bool, scheduled: bool, chunk: int, seed: int) -> None:
        self.policy = BackoffPolicy(0.5, 4.0, jitter=(0.8, 1.2))
        self.up = Uploader(
            "car-1", takes_pieces=pieces, scheduled=scheduled, chunk_bytes=chunk,
            backoff=Backoff(self.policy, random.Random(seed)), max_interrupted=MAX_INTERRUPTED,
        )  # fmt: skip
        self.chunk = chunk
        self.now = 0.0
        self.next_id = 0
        self.pending: dict[bytes, tuple[StoredSegment, bytes]] = {}
        self.staged: dict[bytes, int] = {}  # the cloud's staging: bytes of the encoded upload it holds
        self.stored: set[bytes] = set()
        self.transfer: Transfer | None = None
        self.requests_since_progress = 0
        self.sent_bytes: dict[bytes, int] = {}
        self.cuts: dict[bytes, int] = {}
        self.misled: set[bytes] = set()  # segments the cloud sent back with offsets that go nowhere
        self.expected_offset: int | None = None  # where the cloud said to go on
        self.max_size = 0
        self.failures_in_a_row = 0

    # -- the device's side --------------------------------------------------------------------
    @rule(size=st.integers(1, 2000), priority=st.integers(0, 9))
    def capture(self, size: int, priority: int) -> None:
        self.next_id += 1
        seg = stored(self.next_id, priority=priority, size=size)
        self.pending[seg.segment_id] = (seg, random.Random(self.next_id).randbytes(size))
        self.max_size = max(self.max_size, size)

    @rule(max_bytes=st.integers(0, 5000), min_priority=st.integers(0, 9))
    def grant(self, max_bytes: int, min_priority: int) -> None:
        self.up.grant(max_bytes, min_priority)

    @rule(dt=st.floats(0.0, 3.0))
    def time_passes(self, dt: float) -> None:
        self.now += dt

    @precondition(lambda self: self.transfer is None and self.pending)
    @rule(pick=st.integers(0, 10_000))
    def begin(self, pick: int) -> None:
        if not self.up.due(self.now):
            return  # the driver waits out the backoff
        seg, data = list(self.pending.values())[pick % len(self.pending)]
        left, floor = self.up.granted_bytes, self.up.min_priority
        admitted = self.up.admit(seg)
        if self.up.scheduled:
            assert admitted == (left > 0 and seg.priority >= floor)
        else:
            assert admitted
        if not admitted:
            return
        resume = seg.segment_id in self.up.interrupted()
        self.transfer = self.up.begin(seg, data)
        t = self.transfer
        assert t.in_pieces == (self.up.pieces and len(t.encoded) > self.chunk)
        assert t.ask == (t.in_pieces and resume)
        self.requests_since_progress = 0
        self.expected_offset = 0
        self.honest_only = True  # every answer of this transfer so far was the honest cloud's

    # -- the cloud's answers ------------------------------------------------------------------
    def _exchange(self, answer_of: str) -> None:
        t = self.transfer
        assert t is not None
        sid = t.segment.segment_id
        req = self.up.request(t)
        total = len(t.encoded)
        answer: UploadAnswer
        if isinstance(req, ingest_pb2.UploadChunkRequest):
            assert t.in_pieces and 0 <= req.offset <= total and req.total_bytes == total
            assert len(req.data) <= self.chunk
            assert req.offset == self.expected_offset  # where the cloud said (or 0 at the start)
            assert req.data == t.encoded[req.offset : req.offset + len(req.data)]
            if t.ask:
                assert req.data == b""
            self.sent_bytes[sid] = self.sent_bytes.get(sid, 0) + len(req.data)
            staged = self.staged.get(sid, 0)
            took = bool(req.data) and req.offset == staged
            if took and answer_of != "cut_before":
                staged = self.staged[sid] = staged + len(req.data)
            if answer_of in ("cut_before", "cut_after"):
                answer = RetryLater("UNAVAILABLE: cut")
            elif answer_of == "unsupported":
                answer = PiecesUnsupported("UNIMPLEMENTED")
            elif answer_of == "refuse":
                answer = Refused("DATA_LOSS", "checksum")
            elif answer_of == "stuck":
                answer = Progress(0)
                self.misled.add(sid)
            elif staged == total:
                answer = Acknowledged(sid in self.stored)
            else:
                answer = Progress(staged)
        else:
            assert isinstance(req, ingest_pb2.UploadSegmentRequest) and not t.in_pieces
            assert req.segment_id == sid and req.SerializeToString() == t.encoded
            if answer_of in ("cut_before", "cut_after", "stuck"):
                answer = RetryLater("DEADLINE_EXCEEDED: no answer")
                if answer_of == "cut_after":
                    self.stored.add(sid)
            elif answer_of == "refuse":
                answer = Refused("INVALID_ARGUMENT", "does not decode")
            else:
                answer = Acknowledged(sid in self.stored)
        self._judge(answer, self.up.answer(t, answer, self.now))

    def _judge(self, answer: UploadAnswer, verdict: Send | Settle | Wait) -> None:
        t = self.transfer
        assert t is not None
        sid = t.segment.segment_id
        if isinstance(verdict, Settle):
            assert isinstance(answer, (Acknowledged, Refused))
            assert verdict.acknowledged == isinstance(answer, Acknowledged)
            assert sid not in self.up.interrupted()
            if verdict.acknowledged:
                self.stored.add(sid)
            # a cut costs at most the piece in flight: every cut (and the very start) may repeat one piece
            if sid not in self.misled:
                repeats = self.cuts.get(sid, 0) + 1
                assert self.sent_bytes.get(sid, 0) <= len(t.encoded) + self.chunk * repeats
            del self.pending[sid]
            self.transfer = None
            self.failures_in_a_row = 0
        elif isinstance(verdict, Wait):
            assert isinstance(answer, (RetryLater, Progress))
            low = self.policy.min_s * (2 ** min(self.failures_in_a_row, 3))
            high = min(self.policy.max_s, low)
            assert self.now + 0.8 * min(low, high) <= verdict.until <= self.now + 1.2 * high + 1e-9
            assert not self.up.due(self.now) or verdict.until <= self.now
            self.failures_in_a_row += 1
            if t.in_pieces:
                assert sid in self.up.interrupted() or len(self.up.interrupted()) == MAX_INTERRUPTED
            self.cuts[sid] = self.cuts.get(sid, 0) + 1
            self.transfer = None
        else:
            if isinstance(answer, Progress):
                self.expected_offset = min(answer.next_offset, len(t.encoded))
            self.requests_since_progress += 1
            assert self.requests_since_progress <= 2 * (len(t.encoded) // self.chunk) + 9
            if self.honest_only:  # an honest cloud and no cut: one request per piece, and a question
                assert self.requests_since_progress <= -(-len(t.encoded) // self.chunk) + 1
            if isinstance(answer, PiecesUnsupported):
                assert not self.up.pieces and not t.in_pieces

    @precondition(lambda self: self.transfer is not None)
    @rule(
        answer_of=st.sampled_from(
            ["honest", "honest", "honest", "cut_before", "cut_after", "refuse", "unsupported", "stuck"]
        )
    )
    def exchange(self, answer_of: str) -> None:
        self.honest_only = self.honest_only and answer_of == "honest"
        self._exchange(answer_of)

    @invariant()
    def bounded(self) -> None:
        if hasattr(self, "up"):
            assert len(self.up.interrupted()) <= MAX_INTERRUPTED
            if self.up.scheduled:
                assert self.up.granted_bytes > -max(1, self.max_size)  # at most one segment's overdraft


TestUploaderMachine = UploaderMachine.TestCase
TestUploaderMachine.settings = settings(
    max_examples=300, stateful_step_count=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
