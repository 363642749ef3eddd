"""Thousands of simulated MQTT 5 devices that hold their sessions, from one process.

Every device is its own paho client — its own TLS client certificate (CN = device id = MQTT username),
its own connection, the shipped broker config and ACLs — and runs the agent's own link with the MQTT
transport, all on one event loop (:class:`~fleetloop_fwsim.swarm.Swarm`): the client's socket is watched
by the loop, so a device costs one descriptor and no thread. Each connects, subscribes to its ``down/#``
topics and says hello; it counts as *welcomed* when the coordinator's ``Welcome`` arrives.

Connections are admitted at a bounded rate (``connect_rate`` per second, token bucket of
``CONNECT_BURST``), and every failure — refused, timed out, dropped — retries after its own exponential
backoff with wide jitter, so a broker that falls behind sees a steady ramp instead of every client
retrying at once. Run as a process:
``python -m fleetloop_fwsim.mqtt_swarm --host H --port P --certs DIR --first N --count K --status FILE``
(what ``benchmarks/ingest.py`` does, a few processes of a few thousand devices each).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fleetloop_agent.metrics import AgentMetrics
from fleetloop_agent.uplink import BackoffPolicy, Greeting, Link
from fleetloop_agent.uplink.mqtt_transport import KEEPALIVE_S, MqttSettings, MqttTransport
from fleetloop_fwsim.swarm import Swarm

#: New connections (TCP + TLS handshake + CONNECT) per second per swarm; overflow policy: the device
#: waits for its turn.
CONNECT_RATE = 150.0
#: Connections admitted in one burst at most (token bucket size).
CONNECT_BURST = 20
#: Retry backoff after a failed or lost connection: doubles from 1 s to 30 s, times a jitter of 0.5–1.5
#: (wider than an agent's: thousands of devices failed together).
SWARM_BACKOFF = BackoffPolicy(1.0, 30.0, jitter=(0.5, 1.5))
#: Seconds before an unanswered hello is said again (then doubling): longer than an agent's, since a
#: coordinator welcoming thousands at once is slow, and every repeated hello is another write for it.
HELLO_RETRY_S = 30.0


class MqttSwarm:
    """Many device sessions on one event loop (:meth:`run` holds them until told to stop)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ca: Path,
        certs: Path,
        fleet: str,
        device_ids: Sequence[str],
        connect_rate: float = CONNECT_RATE,
        keepalive_s: int = KEEPALIVE_S,
    ) -> None:
        self.swarm = Swarm(connect_rate=connect_rate, connect_burst=CONNECT_BURST)
        metrics = AgentMetrics()  # one registry for the whole swarm: its counters are the swarm's totals
        self.links = [
            Link(
                MqttTransport(
                    MqttSettings(host, port, ca, certs / f"{did}.pem", certs / f"{did}.key"),
                    did,
                    fleet=fleet,
                    keepalive_s=keepalive_s,
                    hello_retry_s=HELLO_RETRY_S,
                ),
                device_id=did,
                metrics=metrics,
                greeting=Greeting(did, fleet).messages,
                on_message=lambda msg: None,
                backoff=SWARM_BACKOFF,
                loop=self.swarm,
                measure_clock=False,  # it holds sessions; thousands of ping bursts would be its load
            )
            for did in device_ids
        ]

    @property
    def welcomed(self) -> int:
        return sum(1 for link in self.links if link.connected.is_set())

    def status(self) -> dict[str, Any]:
        in_session = sum(1 for link in self.links if link.in_session)
        return {
            "devices": len(self.links),
            "welcomed": self.welcomed,
            "broker_connected": in_session,
            "attempts": sum(link.attempts for link in self.links),
            "connect_failures": sum(link.connect_failures for link in self.links),
            "disconnects": sum(link.sessions_ended for link in self.links),
            "waiting_to_connect": len(self.links) - in_session,
        }

    def run(
        self,
        stop: threading.Event,
        report: Callable[[dict[str, Any]], None] | None = None,
        report_every_s: float = 1.0,
    ) -> None:
        """Start every device and hold them until ``stop`` is set (``report`` gets :meth:`status`)."""
        for link in self.links:
            link.start()
        try:
            while not stop.wait(report_every_s):
                if report is not None:
                    report(self.status())
        finally:
            self.swarm.close()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="hold many simulated MQTT 5 devices from one loop")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--certs", required=True, help="directory with ca.pem and <device>.pem/.key")
    ap.add_argument("--fleet", default="bench")
    ap.add_argument("--prefix", default="m")
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--rate", type=float, default=CONNECT_RATE, help="new connections per second")
    ap.add_argument("--status", help="file rewritten every second with this swarm's counts (JSON)")
    args = ap.parse_args(argv)
    # thousands of devices retrying through a broker restart would drown the log; the counts say it
    logging.getLogger("fleetloop.agent.uplink").setLevel(logging.ERROR)
    certs = Path(args.certs)
    ids = [f"{args.prefix}-{i:05d}" for i in range(args.first, args.first + args.count)]
    swarm = MqttSwarm(
        args.host, args.port, ca=certs / "ca.pem", certs=certs, fleet=args.fleet, device_ids=ids,
        connect_rate=args.rate,
    )  # fmt: skip
    status = Path(args.status) if args.status else None

    def report(counts: dict[str, Any]) -> None:
        if status is not None:
            tmp = status.with_suffix(".tmp")
            tmp.write_text(json.dumps({**counts, "pid": os.getpid()}))
            os.replace(tmp, status)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    swarm.run(stop, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
