"""The REST API's routes: one table, each route with the operator action it calls (and so the role it
needs, :data:`fleetloop_cloud.identity.roles.ACTIONS`), its body limit and its handler.

Handlers are plain functions of a :class:`Call` (the authenticated caller, the path and query
parameters, the body already read within the route's limit, ``now``) answering a :class:`Reply`; the
application (:mod:`.app`) runs them on its worker threads, because the services block (SQL, DuckDB,
signing). The OpenAPI document (:mod:`.openapi`) is built from this same table.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fleetloop_cloud.fleet_store.query import check_timeout
from fleetloop_cloud.http_api.render import device_json, plain, release_json, token_json
from fleetloop_cloud.identity.roles import ACTIONS, allows
from fleetloop_cloud.repositories.records import AuditFilter
from fleetloop_cloud.services.access import Caller
from fleetloop_cloud.services.api import OperatorApi
from fleetloop_cloud.services.releases import ReleaseInput
from fleetloop_shared.errors import UserError

KiB, MiB, GiB = 1024, 1024 * 1024, 1024 * 1024 * 1024
#: Largest release image accepted (the whole body is handed to the release service at once).
MAX_RELEASE_BYTES = 1 * GiB


@dataclass(frozen=True)
class Call:
    api: OperatorApi
    caller: Caller
    path: Mapping[str, str]
    query: Mapping[str, str]
    body: bytes
    now: float

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError as exc:
            raise UserError(f"request body is not valid JSON: {exc}") from None

    def json_object(self, what: str) -> dict[str, Any]:
        doc = self.json()
        if not isinstance(doc, dict):
            raise UserError(f"body must be a JSON object ({what})")
        return doc


@dataclass(frozen=True)
class Reply:
    """``body`` as JSON, or as it is when it is bytes (a file: ``media_type``, saved as ``filename``)."""

    body: Any
    status: int = 200
    media_type: str = "application/octet-stream"
    filename: str = ""


@dataclass(frozen=True)
class Route:
    """One operation: ``name`` is its OpenAPI operationId; ``action`` None makes it public."""

    name: str
    method: str
    path: str
    action: str | None
    handler: Callable[[Call], Reply]
    #: Largest body accepted, in bytes (0: none is read).
    max_body: int = 0
    #: Media type of the body, when there is one.
    body_type: str = "application/json"
    status: int = 200
    #: Media type of the answer (a route answering a file says so).
    reply_type: str = "application/json"


# -- handlers ---------------------------------------------------------------------------------------
def _whoami(c: Call) -> Reply:
    """Who the token is, and every action its role allows (what the console offers as buttons)."""
    c.api.access.operator(c.caller, "whoami")
    role = c.caller.role
    actions = sorted(a for a in ACTIONS if role is not None and allows(role, a))
    return Reply({"name": c.caller.name, "role": role.value if role is not None else "",
                  "proven": c.caller.proven, "actions": actions})  # fmt: skip


def _summary(c: Call) -> Reply:
    return Reply(plain(c.api.queries.summary(c.caller, c.now)))


def _devices(c: Call) -> Reply:
    return Reply([device_json(d) for d in c.api.devices.fleet(c.caller, c.now)])


def _device(c: Call) -> Reply:
    return Reply(device_json(c.api.devices.describe(c.caller, c.path["device_id"], c.now)))


def _device_catalog(c: Call) -> Reply:
    return Reply({"signals": c.api.devices.catalog(c.caller, c.path["device_id"]).to_records()})


def _campaigns(c: Call) -> Reply:
    desired = c.api.campaigns.desired(c.caller)
    return Reply(
        {
            "version": desired.version,
            "campaigns": [
                {"name": d.name, "version": d.revision, "document": d.document} for d in desired.campaigns
            ],
        }
    )


def _fleet_catalog(c: Call) -> Reply:
    fleet = c.path["fleet"]
    return Reply({"fleet": fleet, "signals": c.api.catalogs.list(c.caller, fleet)})


def _push_fleet_catalog(c: Call) -> Reply:
    return Reply(c.api.catalogs.push(c.caller, c.path["fleet"], c.json(), c.now))


def _campaign_text(c: Call) -> str:
    try:
        return c.body.decode()
    except UnicodeDecodeError:
        raise UserError("campaign document is not UTF-8 text") from None


def _apply_campaign(c: Call) -> Reply:
    source = c.query.get("source", "<campaign>")
    return Reply(plain(c.api.campaigns.apply(c.caller, _campaign_text(c), source=source, now=c.now)), 201)


def _validate_campaign(c: Call) -> Reply:
    source = c.query.get("source", "<campaign>")
    return Reply(plain(c.api.campaigns.validate(c.caller, _campaign_text(c), source=source)))


def _device_campaigns(c: Call) -> Reply:
    device = c.api.devices.describe(c.caller, c.path["device_id"], c.now).record
    version, desired = c.api.campaigns.desired_names(c.caller, device.device_id)
    return Reply({
        "desired_version": version,
        "desired": [{"name": n, "version": v} for n, v in desired],
        "reported_version": device.campaigns_version,
        "running": device.campaigns_running,
        "refused": device.campaigns_refused,
    })  # fmt: skip


def _device_ota(c: Call) -> Reply:
    return Reply([plain(r) for r in c.api.rollouts.device_history(c.caller, c.path["device_id"])])


def _delete_campaign(c: Call) -> Reply:
    return Reply(plain(c.api.campaigns.delete(c.caller, c.path["name"], c.now)))


def _int_field(body: Mapping[str, Any], key: str, default: int) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UserError(f"{key} must be an integer, got {value!r}")
    return int(value)


def _query(c: Call) -> Reply:
    """``{"sql": "...", "max_rows": N, "timeout_s": S}`` (docs/query.md): at most the coordinator's
    ``query.max_rows`` rows (100,000 unless configured); the query is interrupted after ``timeout_s``
    (400 with type ``QueryTimeoutError``), by default the coordinator's ``query.timeout_s``."""
    body = c.json_object('{"sql": "..."}')
    sql = body.get("sql")
    if not isinstance(sql, str) or not sql.strip():
        raise UserError('body must be {"sql": "..."}')
    max_rows = _int_field(body, "max_rows", 10000)
    timeout_s = check_timeout(body["timeout_s"]) if "timeout_s" in body else None
    result = c.api.queries.sql(c.caller, sql, max_rows=max_rows, timeout_s=timeout_s)
    return Reply({"columns": result.columns, "rows": result.rows, "truncated": result.truncated})


def _captures(c: Call) -> Reply:
    q = c.query
    limit = _integer(q, "limit", 1, 10_000)
    views = c.api.captures.list(
        c.caller, c.now, device=q.get("device") or None, campaign=q.get("campaign") or None,
        since_ns=_integer(q, "since_ns", -(2**63), 2**63 - 1),
        until_ns=_integer(q, "until_ns", -(2**63), 2**63 - 1), limit=limit or 10_000,
    )  # fmt: skip
    return Reply([plain(v.capture) | {"state": v.state} for v in views])


def _capture(c: Call) -> Reply:
    detail = c.api.captures.detail(c.caller, c.path["capture_id"], c.query.get("device") or None, c.now)
    return Reply(plain(detail.capture) | {k: plain(getattr(detail, k)) for k in (
        "state", "trigger_ns", "pre_ns", "post_ns", "windows_from", "signals", "trajectory")})  # fmt: skip


def _capture_series(c: Call) -> Reply:
    q = c.query
    signals = [s for s in q.get("signals", "").split(",") if s]
    series = c.api.captures.series(
        c.caller, c.path["capture_id"], q.get("device") or None, signals,
        from_ns=_integer(q, "from_ns", -(2**63), 2**63 - 1), to_ns=_integer(q, "to_ns", -(2**63), 2**63 - 1),
        columns=_integer(q, "columns", 1, 4000) or 1000,
    )  # fmt: skip
    return Reply(plain(series))


def _export_capture(c: Call) -> Reply:
    out = c.api.captures.export(
        c.caller, c.path["capture_id"], c.query.get("device") or None, c.query.get("format", "mcap"), c.now
    )
    return Reply(out.data, media_type="application/octet-stream", filename=out.filename)


def _releases(c: Call) -> Reply:
    return Reply([plain(r) for r in c.api.releases.all(c.caller)])


def _release_query(c: Call) -> ReleaseInput:
    missing = [k for k in ("name", "version", "hardware") if not c.query.get(k)]
    if missing:
        raise UserError(f"missing query parameter(s): {', '.join(missing)}")
    return ReleaseInput(c.body, c.query["name"], c.query["version"], c.query["hardware"], c.now)


def _upload_release(c: Call) -> Reply:
    manifest = c.api.releases.upload(c.caller, _release_query(c))
    return Reply(release_json(manifest), 201)


def _stage_release(c: Call) -> Reply:
    staged = c.api.releases.stage(c.caller, _release_query(c))
    return Reply({"staging_id": staged.staging_id, "release": release_json(staged.manifest),
                  "targets": staged.proposal}, 201)  # fmt: skip


def _publish_release(c: Call) -> Reply:
    manifest = c.api.releases.publish(c.caller, c.path["staging_id"], c.body, c.now)
    return Reply(release_json(manifest), 201)


def _rollouts(c: Call) -> Reply:
    return Reply([plain(r) for r in c.api.rollouts.all(c.caller)])


def _create_rollout(c: Call) -> Reply:
    policy = c.json_object("the rollout policy")
    return Reply(plain(c.api.rollouts.create(c.caller, policy, c.now)), 201)


def _rollout(c: Call) -> Reply:
    return Reply(plain(c.api.rollouts.status(c.caller, c.path["rollout_id"])))


def _rollout_action(action: str) -> Callable[[Call], Reply]:
    def handle(c: Call) -> Reply:
        rollouts = c.api.rollouts
        act = {"pause": rollouts.pause, "resume": rollouts.resume, "abort": rollouts.abort,
               "approve": rollouts.approve, "rollback": rollouts.rollback}[action]  # fmt: skip
        return Reply(plain(act(c.caller, c.path["rollout_id"], c.now)))

    return handle


def _rollout_executions(c: Call) -> Reply:
    return Reply([plain(e) for e in c.api.rollouts.executions(c.caller, c.path["rollout_id"])])


def _rollout_history(c: Call) -> Reply:
    return Reply(plain(c.api.rollouts.history(c.caller, c.path["rollout_id"])))


def _rollout_revisions(c: Call) -> Reply:
    return Reply([plain(r) for r in c.api.rollouts.revisions(c.caller, c.query.get("name", ""))])


def _undo_rollout(c: Call) -> Reply:
    body = c.json_object('{"to_revision": N}')
    unknown = sorted(set(body) - {"to_revision"})
    if unknown:
        raise UserError(f"undo: unknown field {unknown[0]!r}")
    revision = body.get("to_revision")
    if type(revision) is not int or revision < 1:
        raise UserError(f"undo: to_revision must be a revision number (1, 2, ...), got {revision!r}")
    return Reply(plain(c.api.rollouts.rollback(c.caller, c.path["rollout_id"], c.now, to_revision=revision)))


def _retry_rollout(c: Call) -> Reply:
    body = c.json_object('{"devices": [...]} (optional)')
    unknown = sorted(set(body) - {"devices"})
    if unknown:
        raise UserError(f"retry: unknown field {unknown[0]!r}")
    devices = body.get("devices", [])
    if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
        raise UserError("retry: devices must be a list of device ids")
    return Reply(plain(c.api.rollouts.retry(c.caller, c.path["rollout_id"], c.now, devices)))


#: A removal's reason is a note for people (status, audit), not a document.
MAX_REMOVAL_REASON_CHARS = 500


def _remove_from_rollout(c: Call) -> Reply:
    body = c.json_object('{"reason": "..."} (optional)')
    unknown = sorted(set(body) - {"reason"})
    if unknown:
        raise UserError(f"remove: unknown field {unknown[0]!r}")
    reason = body.get("reason", "")
    if not isinstance(reason, str) or len(reason) > MAX_REMOVAL_REASON_CHARS:
        raise UserError(f"remove: reason must be text of at most {MAX_REMOVAL_REASON_CHARS} characters")
    status = c.api.rollouts.remove(c.caller, c.path["rollout_id"], c.path["device_id"], c.now, reason=reason)
    return Reply(plain(status))


def _rotate_root(c: Call) -> Reply:
    body = c.json_object("{root_keys, threshold, online}")
    unknown = sorted(set(body) - {"root_keys", "threshold", "online"})
    if unknown:
        raise UserError(f"rotate: unknown field {unknown[0]!r}")
    for key in ("root_keys", "threshold"):
        if body.get(key) is not None and type(body[key]) is not int:
            raise UserError(f"rotate: {key} must be an integer, got {body[key]!r}")
    if not isinstance(body.get("online", False), bool):
        raise UserError("rotate: online must be true or false")
    result = c.api.releases.rotate_root(
        c.caller, c.path["repository"], root_keys=body.get("root_keys"), threshold=body.get("threshold"),
        online=bool(body.get("online", False)), now=c.now,
    )  # fmt: skip
    return Reply(result)


def _install_root(c: Call) -> Reply:
    return Reply(c.api.releases.install_root(c.caller, "image", c.body, c.now))


def _tokens(c: Call) -> Reply:
    return Reply([token_json(t) for t in c.api.tokens.all(c.caller, c.now)])


def _create_token(c: Call) -> Reply:
    body = c.json_object("{name, role, expires_in_s}")
    unknown = sorted(set(body) - {"name", "role", "expires_in_s"})
    if unknown:
        raise UserError(f"token: unknown field {unknown[0]!r}")
    name, role, ttl = body.get("name"), body.get("role"), body.get("expires_in_s")
    if not isinstance(name, str) or not isinstance(role, str):
        raise UserError('body must be {"name": "...", "role": "...", "expires_in_s": N (optional)}')
    bad_ttl = isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl) or ttl <= 0
    if ttl is not None and bad_ttl:
        raise UserError(f"expires_in_s must be a positive number of seconds, got {ttl!r}")
    issued = c.api.tokens.create(
        c.caller, name, role, c.now, expires_at=None if ttl is None else c.now + float(ttl)
    )
    return Reply(token_json(issued.token) | {"token": issued.secret}, 201)


def _revoke_token(c: Call) -> Reply:
    return Reply(token_json(c.api.tokens.revoke(c.caller, c.path["name"], c.now)))


def _number(q: Mapping[str, str], key: str, low: float, high: float) -> float | None:
    if key not in q:
        return None
    try:
        value = float(q[key])
    except ValueError:
        raise UserError(f"{key} must be a number, got {q[key]!r}") from None
    if not (math.isfinite(value) and low <= value <= high):
        raise UserError(f"{key} must be a number from {low:g} to {high:g}, got {q[key]!r}")
    return value


def _integer(q: Mapping[str, str], key: str, low: int, high: int) -> int | None:
    """An integer query parameter within [low, high] (exact: nanosecond times do not fit a float)."""
    if key not in q:
        return None
    try:
        value = int(q[key])
    except ValueError:
        raise UserError(f"{key} must be an integer, got {q[key]!r}") from None
    if not low <= value <= high:
        raise UserError(f"{key} must be an integer from {low} to {high}, got {q[key]!r}")
    return value


#: Largest sequence number or time a query parameter may name (an integer any database stores).
MAX_QUERY_NUMBER = 2.0**53


def _audit(c: Call) -> Reply:
    q = c.query
    after = _number(q, "after", 0, MAX_QUERY_NUMBER)
    limit = _number(q, "limit", 1, 10_000)
    where = AuditFilter(
        after_seq=int(after or 0), since=_number(q, "since", -MAX_QUERY_NUMBER, MAX_QUERY_NUMBER),
        actor=q.get("actor") or None, kind=q.get("kind") or None,
        limit=int(limit) if limit is not None else 1000,
    )  # fmt: skip
    return Reply([plain(e) for e in c.api.audit.entries(c.caller, where)])


def _audit_verify(c: Call) -> Reply:
    return Reply(plain(c.api.audit.verify(c.caller)))


def _metrics(c: Call) -> Reply:
    """The coordinator's metrics in Prometheus' text format (docs/api.md: Metrics)."""
    body, content_type = c.api.metrics.exposition()
    return Reply(body, media_type=content_type)


def _retention(c: Call) -> Reply:
    return Reply(c.api.lifecycle.retention(c.caller, c.path["fleet"], c.now))


def _set_retention(c: Call) -> Reply:
    body = c.json_object('{"days": N}')
    if "days" not in body:
        raise UserError('body must be {"days": N}')
    days = body["days"]
    if isinstance(days, bool) or not isinstance(days, int):
        raise UserError(f"days must be a whole number, got {days!r}")
    return Reply(c.api.lifecycle.set_retention(c.caller, c.path["fleet"], days, c.now))


def _clear_retention(c: Call) -> Reply:
    return Reply(c.api.lifecycle.clear_retention(c.caller, c.path["fleet"], c.now))


def _erase_device(c: Call) -> Reply:
    return Reply(plain(c.api.lifecycle.erase(c.caller, c.path["device_id"], c.now)))


def _erasure(c: Call) -> Reply:
    return Reply(plain(c.api.lifecycle.erasure(c.caller, c.path["device_id"])))


#: Every operator route. Public routes (health, the OpenAPI document, artifact files and TUF metadata)
#: are in :mod:`.app` and :mod:`.files`.
ROUTES: tuple[Route, ...] = (
    Route("whoami", "GET", "/v1/whoami", "whoami", _whoami),
    Route("summary", "GET", "/v1/summary", "summary", _summary),
    Route("listDevices", "GET", "/v1/devices", "devices.list", _devices),
    Route("getDevice", "GET", "/v1/devices/{device_id}", "devices.get", _device),
    Route("getDeviceCatalog", "GET", "/v1/devices/{device_id}/catalog", "devices.get", _device_catalog),
    Route("getDeviceCampaigns", "GET", "/v1/devices/{device_id}/campaigns", "campaigns.list",
          _device_campaigns),
    Route("getDeviceOta", "GET", "/v1/devices/{device_id}/ota", "rollouts.get", _device_ota),
    Route("getFleetCatalog", "GET", "/v1/fleets/{fleet}/catalog", "catalog.list", _fleet_catalog),
    Route("pushFleetCatalog", "POST", "/v1/fleets/{fleet}/catalog", "catalog.push", _push_fleet_catalog,
          16 * MiB),
    Route("listCampaigns", "GET", "/v1/campaigns", "campaigns.list", _campaigns),
    Route("applyCampaign", "POST", "/v1/campaigns", "campaigns.apply", _apply_campaign, 1 * MiB,
          "text/yaml", 201),
    Route("validateCampaign", "POST", "/v1/campaigns/validate", "campaigns.validate", _validate_campaign,
          1 * MiB, "text/yaml"),
    Route("deleteCampaign", "DELETE", "/v1/campaigns/{name}", "campaigns.delete", _delete_campaign),
    Route("query", "POST", "/v1/query", "query", _query, 64 * KiB),
    Route("listCaptures", "GET", "/v1/captures", "query", _captures),
    Route("getCapture", "GET", "/v1/captures/{capture_id}", "captures.get", _capture),
    Route("getCaptureSeries", "GET", "/v1/captures/{capture_id}/series", "captures.get", _capture_series),
    Route("exportCapture", "GET", "/v1/captures/{capture_id}/export", "captures.export", _export_capture,
          reply_type="application/octet-stream"),
    Route("listReleases", "GET", "/v1/releases", "releases.list", _releases),
    Route("uploadRelease", "POST", "/v1/releases", "releases.upload", _upload_release, MAX_RELEASE_BYTES,
          "application/octet-stream", 201),
    Route("stageRelease", "POST", "/v1/releases/staged", "releases.stage", _stage_release,
          MAX_RELEASE_BYTES, "application/octet-stream", 201),
    Route("publishRelease", "POST", "/v1/releases/staged/{staging_id}", "releases.upload", _publish_release,
          4 * MiB, status=201),
    Route("listRollouts", "GET", "/v1/rollouts", "rollouts.list", _rollouts),
    Route("createRollout", "POST", "/v1/rollouts", "rollouts.create", _create_rollout, 64 * KiB,
          status=201),
    Route("getRollout", "GET", "/v1/rollouts/{rollout_id}", "rollouts.get", _rollout),
    Route("pauseRollout", "POST", "/v1/rollouts/{rollout_id}/pause", "rollouts.pause",
          _rollout_action("pause")),
    Route("resumeRollout", "POST", "/v1/rollouts/{rollout_id}/resume", "rollouts.resume",
          _rollout_action("resume")),
    Route("abortRollout", "POST", "/v1/rollouts/{rollout_id}/abort", "rollouts.abort",
          _rollout_action("abort")),
    Route("approveRollout", "POST", "/v1/rollouts/{rollout_id}/approve", "rollouts.approve",
          _rollout_action("approve")),
    Route("rollbackRollout", "POST", "/v1/rollouts/{rollout_id}/rollback", "rollouts.rollback",
          _rollout_action("rollback")),
    Route("undoRollout", "POST", "/v1/rollouts/{rollout_id}/undo", "rollouts.undo", _undo_rollout, 4 * KiB),
    Route("retryRollout", "POST", "/v1/rollouts/{rollout_id}/retry", "rollouts.retry", _retry_rollout,
          256 * KiB),
    Route("removeRolloutDevice", "POST", "/v1/rollouts/{rollout_id}/devices/{device_id}/remove",
          "rollouts.remove", _remove_from_rollout, 4 * KiB),
    Route("listRolloutExecutions", "GET", "/v1/rollouts/{rollout_id}/executions", "rollouts.get",
          _rollout_executions),
    Route("getRolloutHistory", "GET", "/v1/rollouts/{rollout_id}/history", "rollouts.get", _rollout_history),
    Route("listRolloutRevisions", "GET", "/v1/rollout-revisions", "rollouts.list", _rollout_revisions),
    Route("rotateRoot", "POST", "/v1/tuf/{repository:image|director}/rotate", "keys.rotate", _rotate_root,
          4 * KiB),
    Route("installImageRoot", "POST", "/v1/tuf/image/root", "keys.rotate", _install_root, 256 * KiB),
    Route("listTokens", "GET", "/v1/tokens", "tokens.list", _tokens),
    Route("createToken", "POST", "/v1/tokens", "tokens.create", _create_token, 4 * KiB, status=201),
    Route("revokeToken", "DELETE", "/v1/tokens/{name}", "tokens.revoke", _revoke_token),
    Route("listAudit", "GET", "/v1/audit", "audit.list", _audit),
    Route("verifyAudit", "GET", "/v1/audit/verify", "audit.verify", _audit_verify),
    Route("getMetrics", "GET", "/metrics", "metrics", _metrics, reply_type="text/plain"),
    Route("getRetention", "GET", "/v1/fleets/{fleet}/retention", "retention.get", _retention),
    Route("setRetention", "PUT", "/v1/fleets/{fleet}/retention", "retention.set", _set_retention, 4 * KiB),
    Route("clearRetention", "DELETE", "/v1/fleets/{fleet}/retention", "retention.set", _clear_retention),
    Route("eraseDevice", "POST", "/v1/devices/{device_id}/erase", "devices.erase", _erase_device),
    Route("getErasure", "GET", "/v1/devices/{device_id}/erasure", "devices.get", _erasure),
)  # fmt: skip
