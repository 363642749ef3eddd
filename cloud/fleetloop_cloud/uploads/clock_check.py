"""Whether the clock offset a device sent with an upload is applied to its times: a pure judgement.

The device measures its offset (``fleetloop_shared.clock``) and says it with every upload; the cloud
does not take it on trust. An offset is applied only when it is a measurement at all (a round trip from
0 to ``MAX_ROUND_TRIP_NS``, at least one exchange), when it is within ``MAX_OFFSET_NS`` (which also keeps
the arithmetic on int64 times safe), and when the times it yields are possible: no corrected sample may
lie after the upload arrived (beyond the estimate's own error and ``FUTURE_SLACK_NS``), and none before
``EARLIEST_NS`` when the device's own times were later. Otherwise the times are stored as the device
stamped them and the refusal is recorded with the reported offset (clamped to ``MAX_OFFSET_NS``), so an
operator sees a device whose clock cannot be trusted instead of silently shifted data.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleetloop_shared.clock import MAX_ROUND_TRIP_NS
from fleetloop_shared.segment import Segment
from fleetloop_shared.wire import ingest_pb2

_NS_PER_S = 1_000_000_000
#: Largest offset applied or stored (±100 years): a device whose clock reset to 1970 is still
#: corrected; anything beyond is nonsense, and ``t - offset`` stays far from int64's limits.
MAX_OFFSET_NS = 100 * 366 * 86400 * _NS_PER_S
#: How far after its arrival a corrected sample may lie (besides half the round trip): the device's
#: stamps and the cloud's receive time are read on different machines.
FUTURE_SLACK_NS = 2 * _NS_PER_S
#: A corrected time before this is no wall-clock time (2000-01-01).
EARLIEST_NS = 946_684_800 * _NS_PER_S

APPLIED = "applied"
UNMEASURED = "unmeasured"
REFUSED = "refused"


@dataclass(frozen=True)
class ClockVerdict:
    """What ingest does with a segment's times: subtract ``applied_ns`` (None: store them as stamped).
    ``reported_ns``/``round_trip_ns`` are what the device said (clamped), ``status`` one of ``applied``,
    ``unmeasured``, ``refused``; ``reason`` says why a refusal."""

    applied_ns: int | None
    reported_ns: int | None
    round_trip_ns: int | None
    status: str
    reason: str = ""


def _clamp(value: int, limit: int) -> int:
    return max(-limit, min(limit, value))


def judge(
    report: ingest_pb2.ClockOffset | None, first_ns: int | None, last_ns: int | None, received_ns: int
) -> ClockVerdict:
    """The verdict on ``report`` for a segment whose device times span ``first_ns``..``last_ns`` (None:
    no samples), received at ``received_ns`` on the cloud's clock."""
    if report is None:
        return ClockVerdict(None, None, None, UNMEASURED)
    offset = _clamp(report.offset_ns, MAX_OFFSET_NS)
    rtt = _clamp(report.round_trip_ns, MAX_ROUND_TRIP_NS + 1)

    def refused(reason: str) -> ClockVerdict:
        return ClockVerdict(None, offset, rtt, REFUSED, reason)

    if report.exchanges < 1:
        return refused("the offset names no exchange it was measured by")
    if not 0 <= report.round_trip_ns <= MAX_ROUND_TRIP_NS:
        return refused(f"round trip {report.round_trip_ns} ns is no measurement (0..{MAX_ROUND_TRIP_NS})")
    if abs(report.offset_ns) > MAX_OFFSET_NS:
        return refused(f"offset {report.offset_ns} ns is beyond ±{MAX_OFFSET_NS} ns")
    if last_ns is not None and last_ns - offset > received_ns + rtt // 2 + FUTURE_SLACK_NS:
        late = (last_ns - offset - received_ns) / _NS_PER_S
        return refused(f"corrected by it, samples would lie {late:.3f} s after the upload arrived")
    if first_ns is not None and first_ns >= EARLIEST_NS and first_ns - offset < EARLIEST_NS:
        return refused("corrected by it, samples would lie before 2000")
    return ClockVerdict(offset, offset, rtt, APPLIED)


def cloud_span(segment: Segment, applied_ns: int | None) -> tuple[int, int]:
    """The first and last sample time of ``segment`` on the cloud's clock (``applied_ns`` taken off, as
    the fleet store stores its rows); (0, 0) for a segment without samples. The one place a span is
    corrected, so the ledger's receipts and the fleet store's agree."""
    span = segment.time_range()
    if span is None:
        return 0, 0
    shift = applied_ns or 0
    return span[0] - shift, span[1] - shift
