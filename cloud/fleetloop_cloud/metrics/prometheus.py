"""The coordinator's metrics for Prometheus: the one module that imports prometheus_client.

One :class:`PrometheusMetrics` per coordinator, with its own registry (several coordinators in one
process — tests, benchmarks — never share a series). It has the methods of every narrow metrics
interface the parts own — ``IngestMetrics`` (services.ingest), ``QueryMetrics`` (services.query),
``HttpMetrics`` (http_api.metrics) — counts as they happen, takes :class:`~.readings.Reading`\\ s read
at each scrape, and renders the text exposition ``GET /metrics`` answers.

Naming: ``fleetloop_`` prefix, base units (seconds, bytes), ``_total`` for counters (the client adds
it). Labels come from closed sets only — transport, outcome, route name (the OpenAPI operationId, never
the raw path), status code, rollout state — and never name a device: a fleet of 100,000 devices must
not make 100,000 series.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fleetloop_cloud.metrics.readings import Kind, Labels, Reading

log = logging.getLogger("fleetloop.cloud.metrics")

#: Seconds: from a fast segment write (~1 ms) to a slow disk or a large chunked upload.
FAST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Seconds: SQL queries and HTTP requests, up to the longest query and a large download.
SLOW_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _Readings(Collector):
    """The scrape-time readings as one collector. A reading that fails (its database unreachable) is
    logged and left out of that scrape; the others are served."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._readings: dict[str, Reading] = {}

    def add(self, reading: Reading) -> None:
        with self._lock:
            self._readings[reading.name] = reading

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            readings = list(self._readings.values())
        for r in readings:
            try:
                values = r.read()
            except Exception:
                log.exception("metrics: cannot read %s", r.name)
                continue
            family: CounterMetricFamily | GaugeMetricFamily
            if r.kind == "counter":
                family = CounterMetricFamily(r.name, r.help_text, labels=r.labels)
            else:
                family = GaugeMetricFamily(r.name, r.help_text, labels=r.labels)
            for label_values, value in sorted(values.items()):
                family.add_metric(list(label_values), float(value))
            yield family


class PrometheusMetrics:
    """Every metric of one coordinator, in its own registry."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self._segments = Counter(
            "fleetloop_ingest_segments", "Segments uploaded by devices, by outcome: stored, duplicate "
            "(already ingested; acknowledged again), refused (corrupt, unknown device or signal, forged)",
            ["transport", "outcome"], registry=r,
        )  # fmt: skip
        self._samples = Counter(
            "fleetloop_ingest_samples", "Samples written to the fleet store", ["transport"], registry=r
        )
        self._bytes = Counter(
            "fleetloop_ingest_bytes", "Encoded segment bytes stored", ["transport"], registry=r
        )
        self._ingest_seconds = Histogram(
            "fleetloop_ingest_duration_seconds", "Time to make one new segment durable: decode, check, "
            "Parquet, ingest ledger", ["transport"], buckets=FAST_BUCKETS, registry=r,
        )  # fmt: skip
        self._upload_seconds = Histogram(
            "fleetloop_upload_request_duration_seconds", "Time to answer one upload request from a device "
            "(kind segment: a whole segment; chunk: one piece of a resumable upload)",
            ["transport", "kind"], buckets=FAST_BUCKETS, registry=r,
        )  # fmt: skip
        self._clock_offsets = Counter(
            "fleetloop_ingest_clock_offsets", "New segments by what became of the device's clock offset: "
            "applied (times stored on the cloud's clock), unmeasured (none sent), refused (impossible; "
            "times stored as stamped)", ["transport", "status"], registry=r,
        )  # fmt: skip
        self._query_seconds = Histogram(
            "fleetloop_query_duration_seconds", "SQL query run time, by outcome: ok, error, timeout",
            ["outcome"], buckets=SLOW_BUCKETS, registry=r,
        )  # fmt: skip
        self._http_requests = Counter(
            "fleetloop_http_requests", "HTTP requests by route (operationId; unmatched for no route) "
            "and status", ["route", "status"], registry=r,
        )  # fmt: skip
        self._http_seconds = Histogram(
            "fleetloop_http_request_duration_seconds", "HTTP request time until the response was sent",
            ["route"], buckets=SLOW_BUCKETS, registry=r,
        )  # fmt: skip
        self._auth_failures = Counter(
            "fleetloop_http_auth_failures", "HTTP requests refused for their credentials: 401 (no valid "
            "token) or 403 (role not allowed)", ["route", "status"], registry=r,
        )  # fmt: skip
        self._readings = _Readings()
        r.register(self._readings)

    # -- IngestMetrics -------------------------------------------------------------------------------
    def segment(
        self, transport: str, outcome: str, *, samples: int = 0, size: int = 0, seconds: float | None = None
    ) -> None:
        self._segments.labels(transport, outcome).inc()
        if samples:
            self._samples.labels(transport).inc(samples)
        if size:
            self._bytes.labels(transport).inc(size)
        if seconds is not None:
            self._ingest_seconds.labels(transport).observe(seconds)

    def upload(self, transport: str, kind: str, seconds: float) -> None:
        self._upload_seconds.labels(transport, kind).observe(seconds)

    def clock_offset(self, transport: str, status: str) -> None:
        self._clock_offsets.labels(transport, status).inc()

    # -- QueryMetrics --------------------------------------------------------------------------------
    def query(self, outcome: str, seconds: float) -> None:
        self._query_seconds.labels(outcome).observe(seconds)

    # -- HttpMetrics ---------------------------------------------------------------------------------
    def http_request(self, route: str, status: int, seconds: float, *, auth_failure: bool) -> None:
        self._http_requests.labels(route, str(status)).inc()
        self._http_seconds.labels(route).observe(seconds)
        if auth_failure:
            self._auth_failures.labels(route, str(status)).inc()

    # -- read at scrape time -------------------------------------------------------------------------
    def watch(
        self, name: str, help_text: str, kind: Kind, labels: Sequence[str],
        read: Callable[[], Mapping[Labels, float]],
    ) -> None:  # fmt: skip
        self._readings.add(Reading(name, help_text, kind, tuple(labels), read))

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition of every metric, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
