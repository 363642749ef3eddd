"""The clock estimator: four timestamps per exchange, the least delayed exchange kept, everything bounded.

Exchanges are simulated from a true offset and two one-way delays, so the property checked is the one the
design rests on: whatever the delays, an estimate is within half its round trip of the truth, and the
best of several is the one with the least round trip.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fleetloop_shared.clock import OUTSTANDING, ClockEstimator, exchange
from fleetloop_shared.wire import device_pb2

S = 1_000_000_000
offsets = st.integers(-100 * 365 * 86400 * S, 100 * 365 * 86400 * S)
delays = st.integers(0, 5 * S)
int64 = st.integers(-(2**63), 2**63 - 1)


def run(est: ClockEstimator, theta: int, cloud_t: int, d1: int, hold: int, d2: int) -> int:
    """One exchange starting at cloud time ``cloud_t`` with the device ``theta`` ahead; returns when the
    answer arrived, on the cloud's clock."""
    ping = est.ping(cloud_t + theta).clock_ping
    t2 = cloud_t + d1
    pong = device_pb2.ClockPong(
        device_send_ns=ping.device_send_ns, cloud_receive_ns=t2, cloud_send_ns=t2 + hold
    )
    arrived = t2 + hold + d2
    est.pong(pong, arrived + theta)
    return arrived


@given(offsets, delays, delays, st.integers(0, S))
def test_one_exchange_is_within_half_its_round_trip(theta: int, d1: int, d2: int, hold: int) -> None:
    t1 = 1_700_000_000 * S + theta
    t2 = t1 - theta + d1
    t3 = t2 + hold
    sample = exchange(t1, t2, t3, t3 + theta + d2)
    assert sample is not None
    assert sample.round_trip_ns == d1 + d2
    assert abs(sample.offset_ns - theta) <= sample.round_trip_ns // 2 + 1


@given(offsets, st.lists(st.tuples(delays, delays, st.integers(0, S // 10)), min_size=1, max_size=40))
def test_the_best_is_the_least_delayed_of_the_recent_window(
    theta: int, legs: list[tuple[int, int, int]]
) -> None:
    est = ClockEstimator(window=8)
    t = 1_700_000_000 * S
    for d1, d2, hold in legs:
        t = run(est, theta, t, d1, hold, d2) + S
    best = est.best(t + theta)
    assert best is not None
    kept = legs[-8:]
    assert best.round_trip_ns == min(d1 + d2 for d1, d2, _ in kept)
    assert abs(best.offset_ns - theta) <= best.round_trip_ns // 2 + 1
    report = est.report(t + theta)
    assert report is not None and report.offset_ns == best.offset_ns and report.exchanges == len(kept)


@given(offsets, int64, int64, int64)
def test_an_answer_to_no_ping_of_ours_changes_nothing(theta: int, t1: int, t2: int, t3: int) -> None:
    est = ClockEstimator()
    t = 1_700_000_000 * S
    run(est, theta, t, 1000, 10, 1000)
    before = est.best(t + theta)
    stray = device_pb2.ClockPong(device_send_ns=t1, cloud_receive_ns=t2, cloud_send_ns=t3)
    assert est.pong(stray, t + theta + 5000) is None
    assert est.best(t + theta) == before and est.ignored == 1


def test_an_answer_counts_once_and_impossible_stamps_are_ignored() -> None:
    est = ClockEstimator()
    ping = est.ping(1000).clock_ping
    pong = device_pb2.ClockPong(device_send_ns=ping.device_send_ns, cloud_receive_ns=500, cloud_send_ns=600)
    assert est.pong(pong, 1300) is not None
    assert est.pong(pong, 1400) is None  # a replay
    ping = est.ping(2000).clock_ping
    held_too_long = device_pb2.ClockPong(
        device_send_ns=ping.device_send_ns, cloud_receive_ns=0, cloud_send_ns=10_000
    )
    assert est.pong(held_too_long, 2100) is None  # the cloud says it held the ping longer than the trip took
    assert exchange(10, 0, 5, 9) is None  # an answer before its ping
    assert est.ignored == 2


def test_pings_waiting_and_exchanges_kept_are_bounded() -> None:
    est = ClockEstimator(window=4, max_round_trip_ns=S)
    sent = [est.ping(k).clock_ping.device_send_ns for k in range(OUTSTANDING + 3)]
    assert len(set(sent)) == len(sent)
    for t1 in sent[:3]:  # forgotten: overflow drops the oldest
        late = device_pb2.ClockPong(device_send_ns=t1, cloud_receive_ns=t1, cloud_send_ns=t1)
        assert est.pong(late, t1 + 10) is None
    for t1 in sent[3:]:
        assert est.pong(
            device_pb2.ClockPong(device_send_ns=t1, cloud_receive_ns=t1, cloud_send_ns=t1), t1 + 10
        )
    assert (r := est.report(100)) is not None and r.exchanges == 4
    slow = est.ping(10 * S).clock_ping
    assert (
        est.pong(
            device_pb2.ClockPong(
                device_send_ns=slow.device_send_ns, cloud_receive_ns=10 * S, cloud_send_ns=10 * S
            ),
            12 * S,
        )
        is None
    )  # over the round-trip bound


def test_old_exchanges_age_out() -> None:
    est = ClockEstimator(max_age_ns=10 * S)
    ping = est.ping(0).clock_ping
    est.pong(
        device_pb2.ClockPong(device_send_ns=ping.device_send_ns, cloud_receive_ns=5, cloud_send_ns=5), 10
    )
    assert est.best(5 * S) is not None
    assert est.best(11 * S) is None and est.report(11 * S) is None
