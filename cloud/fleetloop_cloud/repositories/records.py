"""What the repositories hand out and take in: plain frozen records, the same for every backend.

The SQL repositories and the in-memory fakes return these, so a service or a test cannot tell which one
it talks to. A record is a snapshot: changing the stored state goes through a repository method.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple


@dataclass(frozen=True)
class Inventory:
    """What a device reports it runs (its ``Inventory`` message)."""

    hardware_id: str
    firmware_version: str
    firmware_sha256: str
    active_slot: str
    campaigns_version: int
    #: The IANA time zone the device reports ("" when it reports none): maintenance windows in
    #: device-local time are computed in it.
    time_zone: str = ""
    #: OTA delta formats the device applies, preferred first (known names only; empty when it did not
    #: say: such a device predates the report and reads FLDELTA1 only).
    delta_formats: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class DeviceRecord(Inventory):
    """What the coordinator knows of one device: its hello, its inventory (the fields it inherits: the
    device's latest report, blank before the first) and its campaign shadow.

    ``session_owner`` is the coordinator holding the device's session ('' when none does); whether that
    coordinator is still alive is the coordinator leases' to say, so "online" is decided by the caller
    with its ``now`` (``services.devices``), never stored as a flag that a crash would leave set.
    """

    device_id: str
    fleet: str
    labels: dict[str, str]
    catalog: list[dict[str, Any]]
    agent_version: str
    data_origin: str
    campaigns_running: list[str]
    campaigns_refused: dict[str, str]
    captures_total: int
    session_owner: str
    last_seen: float
    registered_at: float

    def selector_labels(self) -> dict[str, str]:
        """Labels a selector is matched against: the device's own labels plus ``fleet`` and ``hardware_id``.

        The implicit ones let an operator write ``fleet=taxi`` without every device repeating its fleet
        as a label; explicit labels of the same key win.
        """
        implicit = {"fleet": self.fleet}
        if self.hardware_id:
            implicit["hardware_id"] = self.hardware_id
        return implicit | self.labels


@dataclass(frozen=True)
class DeviceTelemetry:
    """What a device's latest heartbeat said of its store and clock, and when it came."""

    reported_at: float
    segments_pending: int
    bytes_pending: int
    store_bytes: int
    store_quota_bytes: int
    #: The device's clock minus the coordinator's when the heartbeat arrived (transport delay included).
    clock_offset_ms: float
    network: str


@dataclass(frozen=True)
class Registration:
    """What a device's hello says about it (inventory and campaign status come in later messages)."""

    fleet: str
    labels: Mapping[str, str]
    catalog: Sequence[Mapping[str, Any]]
    agent_version: str
    data_origin: str


@dataclass(frozen=True)
class SegmentReceipt:
    """One ingested segment as the ledger records it; folded into its capture."""

    capture_id: str
    campaign: str
    priority: int
    samples: int
    #: The samples' time span, on the cloud's clock when the device's offset was applied.
    first_ns: int
    last_ns: int
    #: The privacy policy the capture was taken under (``NAME@VERSION#KEYID``), "" for none.
    privacy: str = ""
    #: The clock offset the device sent (device minus cloud, clamped; None: none), its round trip, and
    #: what became of it: ``applied``, ``unmeasured`` or ``refused`` (``uploads.clock_check``).
    clock_offset_ns: int | None = None
    clock_round_trip_ns: int | None = None
    clock_status: str = ""


@dataclass(frozen=True)
class CaptureRecord:
    """One capture as assembled from its uploaded segments (a capture may span several segments)."""

    capture_id: str
    device_id: str
    campaign: str
    first_ns: int
    last_ns: int
    samples: int
    segments: int
    first_received: float
    last_received: float
    #: The privacy policy the capture was taken under (``NAME@VERSION#KEYID``), "" for none.
    privacy: str = ""


@dataclass(frozen=True)
class IngestTotals:
    segments: int
    samples: int
    captures: int


@dataclass(frozen=True)
class CampaignDocument:
    """A desired campaign: its name, its own revision (bumped when its document changes) and the YAML."""

    name: str
    revision: int
    document: str


@dataclass(frozen=True)
class CampaignSet:
    """The desired state every device converges to: the global version and the campaigns by name."""

    version: int
    campaigns: tuple[CampaignDocument, ...]


@dataclass(frozen=True)
class ReleaseRecord:
    """A signed release as registered by the artifact store (manifest bytes are exactly what was signed)."""

    name: str
    version: str
    hardware_id: str
    manifest: bytes
    signature: bytes
    created_at: float


@dataclass(frozen=True)
class RolloutRecord:
    """A rollout's persisted state; ``policy`` is the policy as a plain dict (``policy_to_dict``).

    ``revision`` numbers the rollouts of one release name (1, 2, ...: what ``rollout undo
    --to-revision`` names); ``parent_id`` is the rollout this one rolls back ('' for none).
    """

    rollout_id: str
    release_version: str
    policy: dict[str, Any]
    state: str
    phase: int
    phase_started_at: float
    reason: str
    accepted_failures: frozenset[str]
    created_at: float
    updated_at: float
    revision: int = 0
    parent_id: str = ""


@dataclass(frozen=True)
class NewRollout:
    """A rollout as created: its device snapshot (device → phase) and its first audit rows.

    ``initial`` overrides ``device_state`` for some devices as (state, reason), e.g. devices that
    already run the release; ``from_versions`` is the version each device ran when the rollout was made
    (what a roll-back returns it to). The revision is assigned by the repository.
    """

    rollout_id: str
    release_version: str
    policy: Mapping[str, Any]
    state: str
    phase: int
    reason: str
    devices: Mapping[str, int]
    device_state: str
    audit: Sequence[tuple[str, str]] = ()
    initial: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    from_versions: Mapping[str, str] = field(default_factory=dict)
    release_name: str = ""
    parent_id: str = ""


class RolloutDeviceRecord(NamedTuple):
    """One device's execution in a rollout: its phase, state, whether the job reached it, and the
    terms of its current offer (attempt, install windows, hold). A tuple: the controller reads every
    device of a rollout on each tick, and a tuple is built from a row several times faster than a frozen
    dataclass."""

    rollout_id: str
    device_id: str
    phase: int
    state: str
    reason: str
    delivered: bool
    updated_at: float
    attempt: int = 0
    #: When the state last changed (``updated_at`` also moves when only the reason does).
    changed_at: float = 0.0
    offered_at: float | None = None
    #: PENDING after a retryable failure: not offered again before this (0: no wait).
    retry_at: float = 0.0
    windows: tuple[tuple[float, float], ...] = ()
    hold: bool = False
    from_version: str = ""
    #: The version the device says it runs after this execution (after an A/B fallback: the old one).
    running_version: str = ""
    #: A release manager took the device out of the rollout (``rollout remove``) at this time (0: never):
    #: it is not offered the update again and no longer counts in its phase; ``state`` goes on showing
    #: what the device itself did.
    removed_at: float = 0.0
    removed_by: str = ""
    removed_reason: str = ""


@dataclass(frozen=True)
class AuditRecord:
    """One audit row: every rollout transition and every device state change leaves one."""

    seq: int
    rollout_id: str
    at: float
    event: str
    detail: str


@dataclass(frozen=True)
class DeviceChange:
    """A change to one device of a rollout, applied in the same transaction as its rollout update.

    A field left None stays as it is (e.g. only ``delivered`` changes).
    """

    state: str | None = None
    reason: str | None = None
    delivered: bool | None = None
    #: Apply only while the device is still in this state (an offer is for a PENDING device; another
    #: coordinator may have moved it since the caller looked).
    only_from: str | None = None
    attempt: int | None = None
    offered_at: float | None = None
    retry_at: float | None = None
    windows: tuple[tuple[float, float], ...] | None = None
    hold: bool | None = None
    running_version: str | None = None
    #: Apply only while the device is still on this attempt (a report for an older job is stale).
    only_attempt: int | None = None
    #: Take the device out of the rollout: (when, by whom, why); a device removed already keeps its first
    #: removal (removing twice changes nothing).
    removal: tuple[float, str, str] | None = None


@dataclass(frozen=True)
class Fence:
    """The controller lease a write was decided under: refused unless ``holder`` still holds the lease
    with this ``token`` (a paused old leader, woken after another took over, cannot write)."""

    holder: str
    token: int


@dataclass(frozen=True)
class NewGateEvaluation:
    """One signal-gate evaluation as the controller persists it."""

    phase: int
    gate: str
    decision: str
    #: None when there is no such number (no statistic while insufficient; an infinite ratio).
    statistic: float | None
    p_value: float | None
    effect: float | None
    reason: str
    inputs: Mapping[str, float]


@dataclass(frozen=True, kw_only=True)
class GateEvaluationRecord(NewGateEvaluation):
    """A persisted signal-gate evaluation: the evaluation as made (inputs, statistic, p-value and
    decision), with its rollout, its time and its sequence number."""

    seq: int
    rollout_id: str
    at: float


@dataclass(frozen=True)
class RolloutUpdate:
    """Everything one controller step persists at once: rollout fields, device changes, audit rows,
    gate evaluations, devices joining (continuous targets) and rollouts it spawns (a roll-back)."""

    state: str | None = None
    phase: int | None = None
    phase_started_at: float | None = None
    reason: str | None = None
    accepted_failures: frozenset[str] | None = None
    devices: Mapping[str, DeviceChange] = field(default_factory=dict)
    audit: Sequence[tuple[str, str]] = ()
    #: Optimistic concurrency: apply only if the rollout still has this (state, phase). Coordinators
    #: sharing the database decide from what they read; a decision made from a state an operator (or
    #: another coordinator) has changed since is dropped, not written over the newer state.
    expect: tuple[str, int] | None = None
    #: Apply only under this controller lease (see :class:`Fence`).
    fence: Fence | None = None
    gates: Sequence[NewGateEvaluation] = ()
    #: Devices joining the rollout: device → (phase, version it runs).
    joined: Mapping[str, tuple[int, str]] = field(default_factory=dict)
    #: Rollouts created in the same transaction (a roll-back is never lost nor made twice).
    spawn: Sequence[NewRollout] = ()


def device_transition_detail(device_id: str, old: str, new: str, reason: str | None) -> str:
    """The audit detail every backend writes for a device's state change in a rollout."""
    detail = f"{device_id}: {old} -> {new}"
    return f"{detail} ({reason})" if reason else detail


@dataclass(frozen=True)
class TokenRecord:
    """An API token as stored: never the secret, only its SHA-256."""

    name: str
    role: str
    token_hash: str
    created_at: float
    created_by: str
    expires_at: float | None
    revoked_at: float | None
    last_used_at: float | None


@dataclass(frozen=True)
class NewAuditEntry:
    """One write as the audit log takes it; the log adds the sequence number and the chain."""

    at: float
    actor: str
    role: str
    transport: str
    address: str
    request_id: str
    action: str
    target: str
    before: str
    after: str
    detail: str


@dataclass(frozen=True, kw_only=True)
class AuditEntry(NewAuditEntry):
    """One entry of the audit log: the write as taken, with its place in the hash chain."""

    seq: int
    prev_hash: str
    hash: str

    def fields(self) -> dict[str, Any]:
        """Every field, the sequence number first (the order entries are shown and exported in)."""
        return {"seq": self.seq} | {f: getattr(self, f) for f in self.__dataclass_fields__}


@dataclass(frozen=True)
class AuditFilter:
    """Which entries a read returns: after a sequence number, since a time, of an actor, of an action
    kind (``rollouts`` or ``rollouts.create``), at most ``limit``."""

    after_seq: int = 0
    since: float | None = None
    actor: str | None = None
    kind: str | None = None
    limit: int = 1000


@dataclass(frozen=True)
class ErasureRecord:
    """An erasure of one device's data: asked for at ``requested_at`` by ``requested_by``; the device's
    data from before then is erased (and refused when it arrives again); ``done_at`` None while it runs
    (or was interrupted: the next pass resumes it), ``detail`` what it removed."""

    device_id: str
    requested_at: float
    requested_by: str
    done_at: float | None = None
    detail: str = ""
