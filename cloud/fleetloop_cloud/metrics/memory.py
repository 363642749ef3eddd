"""The metrics in memory: the fake beside the Prometheus adapter (:mod:`.prometheus`), with the same
methods, for the services' tests and for parts built without a coordinator around them.

Bounded: counts and sums only, keyed by label values the callers take from closed sets (transport,
outcome, route name, status) — never a device id.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence

from fleetloop_cloud.metrics.readings import Kind, Reading

Labels = tuple[str, ...]


class MemoryMetrics:
    """What was observed, as plain counters; safe from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: (transport, outcome) → segments
        self.segments: Counter[Labels] = Counter()
        #: transport → samples / bytes of stored segments
        self.samples: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        #: (histogram name, *labels) → observations and their sum in seconds
        self.observations: Counter[Labels] = Counter()
        self.seconds: defaultdict[Labels, float] = defaultdict(float)
        #: (route, status) → HTTP requests, and those refused for their credentials
        self.http: Counter[tuple[str, int]] = Counter()
        self.auth_failures: Counter[tuple[str, int]] = Counter()
        #: (transport, status) → uploads by what became of their clock offset
        self.clock_offsets: Counter[Labels] = Counter()
        self._readings: dict[str, Reading] = {}

    def _observe(self, key: Labels, seconds: float) -> None:
        self.observations[key] += 1
        self.seconds[key] += seconds

    # -- IngestMetrics -------------------------------------------------------------------------------
    def segment(
        self, transport: str, outcome: str, *, samples: int = 0, size: int = 0, seconds: float | None = None
    ) -> None:
        with self._lock:
            self.segments[(transport, outcome)] += 1
            self.samples[transport] += samples
            self.bytes[transport] += size
            if seconds is not None:
                self._observe(("ingest", transport), seconds)

    def upload(self, transport: str, kind: str, seconds: float) -> None:
        with self._lock:
            self._observe(("upload", transport, kind), seconds)

    def clock_offset(self, transport: str, status: str) -> None:
        with self._lock:
            self.clock_offsets[(transport, status)] += 1

    # -- QueryMetrics --------------------------------------------------------------------------------
    def query(self, outcome: str, seconds: float) -> None:
        with self._lock:
            self._observe(("query", outcome), seconds)

    # -- HttpMetrics ---------------------------------------------------------------------------------
    def http_request(self, route: str, status: int, seconds: float, *, auth_failure: bool) -> None:
        with self._lock:
            self.http[(route, status)] += 1
            self._observe(("http", route), seconds)
            if auth_failure:
                self.auth_failures[(route, status)] += 1

    # -- read at scrape time -------------------------------------------------------------------------
    def watch(
        self, name: str, help_text: str, kind: Kind, labels: Sequence[str],
        read: Callable[[], Mapping[Labels, float]],
    ) -> None:  # fmt: skip
        with self._lock:
            self._readings[name] = Reading(name, help_text, kind, tuple(labels), read)

    def read(self, name: str) -> Mapping[Labels, float]:
        """The current values of the reading ``name`` (KeyError when nothing watches it)."""
        with self._lock:
            reading = self._readings[name]
        return reading.read()

    def exposition(self) -> tuple[bytes, str]:
        """The readings and counters as ``name{labels} value`` lines (not the Prometheus format's
        every detail: the adapter renders that)."""
        with self._lock:
            readings = list(self._readings.values())
            lines = [f"segments{{{t},{o}}} {n}" for (t, o), n in sorted(self.segments.items())]
            lines += [f"http{{{r},{s}}} {n}" for (r, s), n in sorted(self.http.items())]
        for reading in readings:
            lines += [f"{reading.name}{{{','.join(k)}}} {v:g}" for k, v in sorted(reading.read().items())]
        return ("\n".join(lines) + "\n").encode(), "text/plain; charset=utf-8"
