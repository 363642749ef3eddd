"""What one coordinator exports at scrape time, read from the parts that hold it: connected devices by
transport (the sessions), rollouts by state (the rollout repository), refusals, resumable-upload staging,
the upload scheduler's totals and the change feed's notices. The composition root calls
:func:`watch_coordinator` once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from fleetloop_cloud.changes import ChangeFollower, Topic
from fleetloop_cloud.metrics.readings import Labels, Watcher
from fleetloop_cloud.repositories.interfaces import RolloutRepository
from fleetloop_cloud.rollout.planner import RolloutState
from fleetloop_cloud.services.access import Refusals
from fleetloop_cloud.services.catalogs import FleetCatalogService
from fleetloop_cloud.services.devices import DeviceService
from fleetloop_cloud.services.ingest import UploadGrants
from fleetloop_cloud.sessions import DeviceSessions
from fleetloop_cloud.uploads.staging import UploadStaging

#: Device transports a coordinator serves: exported at 0 too, so a series does not vanish at 0.
TRANSPORTS = ("grpc", "mqtt")


def watch_coordinator(
    metrics: Watcher,
    *,
    sessions: DeviceSessions,
    rollouts: RolloutRepository,
    refusals: Refusals,
    staging: UploadStaging,
    grants: UploadGrants,
    changes: ChangeFollower | None = None,
    devices: DeviceService | None = None,
    catalogs: FleetCatalogService | None = None,
) -> None:
    """Register every scrape-time reading of one coordinator's parts with ``metrics``."""

    def connected() -> Mapping[Labels, float]:
        return {(t,): n for t, n in (dict.fromkeys(TRANSPORTS, 0) | sessions.by_transport()).items()}

    def by_state() -> Mapping[Labels, float]:
        counts = Counter(dict.fromkeys((s.value for s in RolloutState), 0))
        counts.update(r.state for r in rollouts.all())
        return {(state,): n for state, n in counts.items()}

    def refused() -> Mapping[Labels, float]:
        return {(transport, reason): n for (transport, reason), n in refusals.snapshot().items()}

    def staging_events() -> Mapping[Labels, float]:
        return {(event,): n for event, n in staging.counters.items()}

    w = metrics.watch
    w("fleetloop_devices_connected", "Devices whose control session this coordinator holds, by transport",
      "gauge", ["transport"], connected)  # fmt: skip
    w("fleetloop_rollouts", "Rollouts by state, fleet-wide", "gauge", ["state"], by_state)
    w("fleetloop_device_refusals", "Messages refused from devices (forged identity, undecodable, ...)",
      "counter", ["transport", "reason"], refused)  # fmt: skip
    w("fleetloop_upload_staging_events", "Resumable upload staging: pieces, completed, restarted, "
      "evicted (per-device bound), refused_full (total bound), expired, gaps", "counter", ["event"],
      staging_events)  # fmt: skip
    w("fleetloop_upload_staged_bytes", "Bytes of partial resumable uploads held on disk", "gauge", [],
      lambda: {(): staging.staged_bytes()})  # fmt: skip
    w("fleetloop_upload_granted_bytes", "Bytes granted to devices by the upload scheduler", "counter", [],
      lambda: {(): grants.scheduler.granted_bytes_total})  # fmt: skip
    w("fleetloop_upload_backlogs_tracked", "Device backlogs the upload scheduler tracks", "gauge", [],
      lambda: {(): grants.scheduler.tracked()})  # fmt: skip
    w("fleetloop_upload_backlogs_refused", "Device backlogs refused at the scheduler's max_devices bound",
      "counter", [], lambda: {(): grants.scheduler.refused_devices})  # fmt: skip
    w("fleetloop_session_pushes_dropped", "Pushes to devices dropped from full outboxes (drop-oldest)",
      "counter", [], lambda: {(): sessions.dropped_total})  # fmt: skip
    if devices is not None:
        dev = devices
        w("fleetloop_catalog_assignments_pending", "Catalog assignments waiting for their device's welcome",
          "gauge", [], lambda: {(): dev.pending_assignments()})  # fmt: skip
        w("fleetloop_catalog_assignments_dropped", "Catalog assignments dropped at the pending bound "
          "(drop-oldest; the device's next hello asks again)", "counter", [],
          lambda: {(): dev.assignments_dropped})  # fmt: skip
    if catalogs is not None:
        cat = catalogs
        w("fleetloop_catalog_aliases_dropped", "Device-local ids no longer kept as aliases of a path "
          "(oldest beyond the per-path bound)", "counter", [], lambda: {(): cat.aliases_dropped})  # fmt: skip
    if changes is None:
        return
    follower = changes

    def heard() -> Mapping[Labels, float]:
        return {(topic.value,): n for topic, n in (dict.fromkeys(Topic, 0) | follower.heard).items()}

    def feed_events() -> Mapping[Labels, float]:
        events = {"coalesced": follower.coalesced, "catch_ups": follower.catch_ups}
        return {(event,): n for event, n in (events | follower.feed_counters()).items()}

    w("fleetloop_change_notices_heard", "Change notices from other coordinators, by topic", "counter",
      ["topic"], heard)  # fmt: skip
    w("fleetloop_change_feed_events", "The change feed: coalesced (a notice folded into one pending), "
      "catch_ups (timer re-reads), received, ignored, publish_failures, reconnects (PostgreSQL)",
      "counter", ["event"], feed_events)  # fmt: skip
