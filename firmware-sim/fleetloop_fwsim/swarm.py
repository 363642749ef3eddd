"""Many simulated devices' links on one event loop: a fleet of thousands from one thread.

Each simulated device runs the agent's own link (:class:`~fleetloop_agent.uplink.Link`: the same driver,
uploader core and transports as a real agent, over gRPC or MQTT 5), so what the simulator measures is
what devices do. An agent gives its link an event loop of its own; the swarm puts every device's link on
one, which is what lets one process hold 10,000 devices where a thread per device would not fit a small
machine.

Each device keeps its own identity and its own connection (and, with TLS, its own client certificate).
New connections are admitted at a bounded rate (``connect_rate`` per second, token bucket), so a fleet
starting at once — or all reconnecting after a coordinator restart, with jittered backoff on top —
arrives as a ramp, not a storm. Store calls (SQLite, files) run in a bounded executor, TLS handshakes in
a few threads of their own, never on the loop.
"""

from __future__ import annotations

import contextlib
import resource

from fleetloop_agent.uplink import LinkLoop

#: New connections per second for the whole swarm (token bucket; overflow policy: the device waits its
#: turn). Chosen so a coordinator's hello handling (a metadata write each) keeps up on 2 cores.
CONNECT_RATE = 500.0
#: Threads for the devices' local-store calls.
IO_THREADS = 4
#: Threads for TLS handshakes (paho connects blocking; gRPC handshakes on its own threads).
CONNECT_THREADS = 4


def raise_open_files_limit() -> int:
    """Lift this process's soft open-files limit to the hard one (each device holds a socket); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


class Swarm(LinkLoop):
    """The event loop (one thread) that runs every device link of a simulated fleet: each is a
    :class:`~fleetloop_agent.uplink.Link` made with ``loop=swarm``; :meth:`close` hangs them all up."""

    def __init__(
        self, *, connect_rate: float = CONNECT_RATE, connect_burst: int = 1, io_threads: int = IO_THREADS
    ) -> None:
        raise_open_files_limit()
        super().__init__(
            name="swarm",
            io_threads=io_threads,
            connect_threads=CONNECT_THREADS,
            connect_rate=connect_rate,
            connect_burst=connect_burst,
        )
