"""How far a device's clock is from the cloud's, NTP-style: the pure core both sides share.

A device stamps a ping when it leaves (t1, device clock); the cloud stamps it when taken (t2) and when
answered (t3, cloud clock); the device stamps the answer when it arrives (t4). With the device's clock
ahead of the cloud's by θ and the two legs taking d1 and d2,

    offset = ((t1 - t2) + (t4 - t3)) / 2 = θ + (d2 - d1) / 2,   round trip = (t4 - t1) - (t3 - t2) = d1 + d2,

so one exchange is off by at most half its round trip, whatever the legs were. Of several exchanges the
one with the least round trip is the best (NTP's clock filter): a queue on either side (a busy broker,
an executor) only lengthens the round trip, which ranks that exchange below the quiet ones.
:class:`ClockEstimator` keeps the recent exchanges (bounded, oldest dropped) and answers the best; it
takes ``now`` from its caller and does no I/O, so the link drives it and tests drive it by hand.

Offsets are *device minus cloud*: a time the device stamped is ``t - offset`` on the cloud's clock.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from fleetloop_shared.wire import device_pb2, ingest_pb2

#: Exchanges an estimator keeps; overflow policy: the oldest is dropped.
WINDOW = 16
#: Pings waiting for their answer at most; overflow policy: the oldest is forgotten (its late answer is
#: then ignored, counted in ``ClockEstimator.ignored``).
OUTSTANDING = 8
#: An exchange whose round trip is longer than this is no measurement worth keeping (its error bound
#: would be seconds); it is ignored.
MAX_ROUND_TRIP_NS = 10_000_000_000
#: Exchanges older than this (device clock) no longer count: the two clocks drift apart over hours.
MAX_AGE_NS = 3600 * 1_000_000_000


@dataclass(frozen=True)
class ClockSample:
    """One exchange's estimate: ``offset_ns`` (device minus cloud), within ``round_trip_ns / 2``;
    ``at_ns``: when it completed, on the device's clock."""

    offset_ns: int
    round_trip_ns: int
    at_ns: int


def exchange(t1: int, t2: int, t3: int, t4: int) -> ClockSample | None:
    """The estimate from one exchange's four timestamps; None when they cannot be true (the answer
    arrived before the ping left, or the cloud answered before it took the ping)."""
    if t4 < t1 or t3 < t2:
        return None
    round_trip = (t4 - t1) - (t3 - t2)
    if round_trip < 0:
        # the cloud held the ping longer than the whole exchange took: its stamps or ours are wrong
        return None
    return ClockSample(offset_ns=((t1 - t2) + (t4 - t3)) // 2, round_trip_ns=round_trip, at_ns=t4)


def pong_for(ping: device_pb2.ClockPing, received_ns: int, sent_ns: int) -> device_pb2.CloudMessage:
    """The cloud's answer to ``ping``: what every cloud (coordinator, in-process fake) sends back."""
    return device_pb2.CloudMessage(
        clock_pong=device_pb2.ClockPong(
            device_send_ns=ping.device_send_ns, cloud_receive_ns=received_ns, cloud_send_ns=sent_ns
        )
    )


def stamp_transmit(msg: device_pb2.CloudMessage, now_ns: int) -> device_pb2.CloudMessage:
    """``msg`` as it leaves: a pong gets its send time now (NTP's transmit stamp), so the time it waited in
    the cloud's queues counts as the cloud's hold, not as the way back, which would skew the estimate."""
    if msg.WhichOneof("kind") == "clock_pong" and now_ns > msg.clock_pong.cloud_send_ns:
        msg.clock_pong.cloud_send_ns = now_ns
    return msg


class ClockEstimator:
    """The device's side: the pings it sent, the exchanges they completed, and the best of those.

    Only answers to pings this estimator sent are taken (matched on their send time): a stray or
    replayed pong changes nothing. Everything is bounded (``window`` exchanges, ``OUTSTANDING`` pings)."""

    def __init__(
        self,
        *,
        window: int = WINDOW,
        max_round_trip_ns: int = MAX_ROUND_TRIP_NS,
        max_age_ns: int = MAX_AGE_NS,
    ) -> None:
        self._samples: collections.deque[ClockSample] = collections.deque(maxlen=window)
        self._outstanding: collections.deque[int] = collections.deque(maxlen=OUTSTANDING)
        self._max_round_trip_ns = max_round_trip_ns
        self._max_age_ns = max_age_ns
        #: Answers not taken: unknown or repeated pings, impossible stamps, round trips too long.
        self.ignored = 0

    def ping(self, now_ns: int) -> device_pb2.DeviceMessage:
        """A ping to send now (``now_ns``: the device's clock as it leaves)."""
        if now_ns in self._outstanding:
            now_ns += 1  # two pings in one clock tick: keep the keys apart
        self._outstanding.append(now_ns)
        return device_pb2.DeviceMessage(clock_ping=device_pb2.ClockPing(device_send_ns=now_ns))

    def pong(self, pong: device_pb2.ClockPong, now_ns: int) -> ClockSample | None:
        """The cloud's answer, arrived at ``now_ns`` (device clock); the exchange it completed, or None
        when it was not taken."""
        t1 = pong.device_send_ns
        if t1 not in self._outstanding:
            self.ignored += 1
            return None
        self._outstanding.remove(t1)
        sample = exchange(t1, pong.cloud_receive_ns, pong.cloud_send_ns, now_ns)
        if sample is None or sample.round_trip_ns > self._max_round_trip_ns:
            self.ignored += 1
            return None
        self._samples.append(sample)
        return sample

    def best(self, now_ns: int) -> ClockSample | None:
        """The exchange with the least round trip among those not older than ``max_age_ns`` (the latest
        of equals); None before any."""
        best: ClockSample | None = None
        for s in self._samples:
            if now_ns - s.at_ns > self._max_age_ns:
                continue
            if best is None or s.round_trip_ns <= best.round_trip_ns:
                best = s
        return best

    def report(self, now_ns: int) -> ingest_pb2.ClockOffset | None:
        """What an upload carries: the best estimate and how many exchanges it was chosen from."""
        best = self.best(now_ns)
        if best is None:
            return None
        fresh = sum(1 for s in self._samples if now_ns - s.at_ns <= self._max_age_ns)
        return ingest_pb2.ClockOffset(
            offset_ns=best.offset_ns, round_trip_ns=best.round_trip_ns, exchanges=fresh
        )
