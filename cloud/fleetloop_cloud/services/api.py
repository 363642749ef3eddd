"""What each kind of surface calls, as it sees the coordinator: device surfaces (gRPC, MQTT) the device
and ingest services, the operator surface (HTTP) the operator services; both the clock every ``now``
comes from. ``server.Coordinator`` is what they are handed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from fleetloop_cloud.services.access import Access, Refusals
from fleetloop_cloud.services.audit import AuditService
from fleetloop_cloud.services.campaigns import CampaignService
from fleetloop_cloud.services.captures import CaptureService
from fleetloop_cloud.services.catalogs import FleetCatalogService
from fleetloop_cloud.services.devices import DeviceService
from fleetloop_cloud.services.ingest import IngestService
from fleetloop_cloud.services.lifecycle import DataLifecycle
from fleetloop_cloud.services.query import QueryService
from fleetloop_cloud.services.releases import ReleaseService
from fleetloop_cloud.services.rollouts import RolloutService
from fleetloop_cloud.services.tokens import TokenService


class DeviceApi(Protocol):
    """The device-facing services, the refusal counts and the clock."""

    devices: DeviceService
    ingest: IngestService
    refusals: Refusals
    clock: Callable[[], float]


class MetricsText(Protocol):
    """The coordinator's metrics as ``GET /metrics`` serves them: the body and its content type."""

    def exposition(self) -> tuple[bytes, str]: ...


class OperatorApi(Protocol):
    """The operator-facing services (tokens and the audit log among them), the access checks the
    surface makes before it reads a request's body, the metrics, and the clock."""

    access: Access
    tokens: TokenService
    audit: AuditService
    devices: DeviceService
    campaigns: CampaignService
    releases: ReleaseService
    rollouts: RolloutService
    queries: QueryService
    captures: CaptureService
    lifecycle: DataLifecycle
    catalogs: FleetCatalogService
    clock: Callable[[], float]

    @property
    def metrics(self) -> MetricsText: ...
