"""The agent's Prometheus metrics (``fleetloop_`` prefix, base units, no device-id labels).

Each agent owns its registry, so several agents in one process (tests, fleet simulation) never collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class AgentMetrics:
    """Counters and gauges the runtime and the uplink update; served on ``metrics_port`` when set."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.samples_read = Counter("fleetloop_agent_samples_read", "Samples read from sources", registry=r)
        self.fires = Counter("fleetloop_agent_trigger_fires", "Trigger fires", registry=r)
        self.captures = Counter("fleetloop_agent_captures", "Captures written to the store", registry=r)
        self.segments_uploaded = Counter(
            "fleetloop_agent_segments_uploaded", "Segments acknowledged by the cloud", registry=r
        )
        self.segments_refused = Counter(
            "fleetloop_agent_segments_refused", "Segments the cloud refused as invalid", registry=r
        )
        self.upload_errors = Counter("fleetloop_agent_upload_errors", "Failed upload attempts", registry=r)
        self.upload_pieces = Counter(
            "fleetloop_agent_upload_pieces", "Pieces of resumable (chunked) uploads sent", registry=r
        )
        self.upload_resumes = Counter(
            "fleetloop_agent_upload_resumes",
            "Chunked uploads continued from where the cloud was after a cut",
            registry=r,
        )
        self.outbox_dropped = Counter(
            "fleetloop_agent_outbox_dropped",
            "Control messages dropped (outbox full, drop-oldest)",
            registry=r,
        )
        self.reconnects = Counter(
            "fleetloop_agent_cloud_reconnects", "Control stream (re)connects", registry=r
        )
        self.store_pending_bytes = Gauge(
            "fleetloop_agent_store_pending_bytes", "Bytes waiting for upload", registry=r
        )
        self.ring_buffer_bytes = Gauge("fleetloop_agent_ring_buffer_bytes", "Ring buffer memory", registry=r)

    def serve(self, port: int) -> None:
        start_http_server(port, addr="127.0.0.1", registry=self.registry)
