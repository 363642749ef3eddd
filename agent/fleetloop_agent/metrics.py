"""The agent's Prometheus metrics (``fleetloop_`` prefix, base units, no device-id labels).

Each agent owns its registry, so several agents in one process (tests, fleet simulation) never collide.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

#: Running totals every live source keeps (``SourceCounters``), exported per source name.
SOURCE_TOTALS = {
    "samples": "Samples a source handed to the agent",
    "errors": "Faults of a source: refused requests, malformed input, lost connections",
    "missed_polls": "Polls that did not happen or failed",
    "reconnects": "Connections re-established after a loss",
    "dropped": "Samples lost to a source's overflow policy or refused",
}


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
        self.catalog_local_ids = Gauge(
            "fleetloop_agent_catalog_local_ids", "Device-local catalog ids the cache keeps", registry=r
        )
        self.ring_buffer_bytes = Gauge("fleetloop_agent_ring_buffer_bytes", "Ring buffer memory", registry=r)
        self.clock_offset = Gauge(
            "fleetloop_agent_clock_offset_seconds",
            "The device clock minus the cloud's, best of the recent exchanges (what uploads carry)",
            registry=r,
        )
        self.clock_round_trip = Gauge(
            "fleetloop_agent_clock_round_trip_seconds",
            "Round trip of the exchange the offset comes from (the offset is within half of it)",
            registry=r,
        )
        self.clock_pongs_ignored = Counter(
            "fleetloop_agent_clock_pongs_ignored",
            "Clock answers not taken: unknown or repeated pings, impossible stamps, round trips over 10 s",
            registry=r,
        )
        # Totals the pure cores keep as plain integers (they do no I/O), mirrored by sync_totals().
        self._mirrored = {
            name: Counter(f"fleetloop_agent_{name}", help_text, registry=r)
            for name, help_text in (
                ("ring_buffer_dropped_samples", "Samples dropped at the buffer memory cap (drop-oldest)"),
                ("ring_buffer_late_samples", "Samples older than their group's newest, not kept (drop-late)"),
                ("trigger_evaluations", "Campaign evaluations (campaign x evaluation time)"),
                ("trigger_late_evaluations", "Evaluation times skipped as not later than the last one"),
                ("privacy_suppressed_captures", "Captures not stored: a position inside a privacy geofence"),
                ("privacy_dropped_signals", "Signal columns dropped from captures by privacy policies"),
                ("privacy_hashed_values", "Identifier values hashed by privacy policies"),
                ("privacy_removed_positions", "Positions removed by privacy policies (geofence, min_speed)"),
                ("privacy_unkeyed_signals", "Identifier columns dropped for want of a privacy key"),
                ("catalog_local_ids_dropped", "Device-local catalog ids dropped at the cache's bound"),
                ("store_upgrade_rewritten", "Segments of an older agent rewritten to this agent's ids"),
                ("store_upgrade_held", "Segments of an older agent kept unsent: ids it cannot explain"),
            )
        }
        self._mirrored_seen: dict[str, int] = dict.fromkeys(self._mirrored, 0)
        # Live sources' totals, labelled by source name (a config's name, never a device id).
        self._sources = {
            name: Counter(f"fleetloop_agent_source_{name}", help_text, ["source"], registry=r)
            for name, help_text in SOURCE_TOTALS.items()
        }
        self._sources_seen: dict[tuple[str, str], int] = {}

    def sync_totals(self, **totals: int) -> None:
        """Bring the mirrored counters up to the cores' running totals (``trigger_evaluations=...``)."""
        for name, total in totals.items():
            delta = total - self._mirrored_seen[name]
            if delta > 0:
                self._mirrored[name].inc(delta)
                self._mirrored_seen[name] = total

    def sync_source(self, source: str, totals: Mapping[str, int]) -> None:
        """Bring source ``source``'s counters up to its running totals (keys of :data:`SOURCE_TOTALS`)."""
        for name, total in totals.items():
            counter = self._sources.get(name)
            if counter is None:
                continue
            delta = total - self._sources_seen.get((source, name), 0)
            if delta > 0:
                counter.labels(source=source).inc(delta)
                self._sources_seen[(source, name)] = total

    def serve(self, port: int) -> None:
        start_http_server(port, addr="127.0.0.1", registry=self.registry)
