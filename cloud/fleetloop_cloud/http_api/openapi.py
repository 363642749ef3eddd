"""The OpenAPI 3.1 document of the REST API, built from the route table so it cannot drift from it.

Each operator route carries its role (``x-fleetloop-role``, and in its description) and its action
(``x-fleetloop-action``: the console offers a button where the caller's actions include it), the bearer
security scheme, its request body and limit, and its response schema; every operation documents its
errors as the one JSON error body. ``tests/cloud/test_openapi.py`` runs schemathesis against a live
coordinator with this document: no 5xx, and every response matches it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fleetloop_cloud.identity.roles import ACTIONS
from fleetloop_cloud.identity.tokens import NAME_PATTERN
from fleetloop_shared.classification import SignalClass

S = dict[str, Any]


def _obj(required: Sequence[str] = (), **props: S) -> S:
    return {"type": "object", "properties": props, "required": list(required)}


def _arr(items: S) -> S:
    return {"type": "array", "items": items}


STR: S = {"type": "string"}
INT: S = {"type": "integer"}
NUM: S = {"type": "number"}
BOOL: S = {"type": "boolean"}
NUM_OR_NULL: S = {"type": ["number", "null"]}
STR_MAP: S = {"type": "object", "additionalProperties": {"type": "string"}}
INT_MAP: S = {"type": "object", "additionalProperties": {"type": "integer"}}
ANY_MAP: S = {"type": "object"}
NS: S = {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1}

RETENTION = _obj(["fleet", "days"], fleet=STR, days={"type": ["integer", "null"]}, keeps_from=STR)
ERASURE = _obj(
    ["device_id", "state", "requested_at"], device_id=STR, state={"enum": ["erasing", "done"]},
    requested_at=NUM, requested_by=STR, done_at=NUM_OR_NULL, removed=INT_MAP,
)  # fmt: skip
ERROR = _obj(["error", "type", "request_id"], error=STR, type=STR, request_id=STR)
DEVICE = _obj(
    ["device_id", "fleet", "online"],
    device_id=STR, fleet=STR, labels=STR_MAP, agent_version=STR, data_origin=STR, hardware_id=STR,
    firmware_version=STR, firmware_sha256=STR, active_slot=STR, campaigns_version=INT,
    campaigns_running=_arr(STR), campaigns_refused=STR_MAP, captures_total=INT, last_seen=NUM,
    registered_at=NUM, online=BOOL, delta_formats=_arr(STR),
    telemetry={"type": ["object", "null"], "properties": {
        "reported_at": NUM, "segments_pending": INT, "bytes_pending": INT, "store_bytes": INT,
        "store_quota_bytes": INT, "clock_offset_ms": NUM, "network": STR}},
)  # fmt: skip
#: One signal of a fleet's catalog (its fleet-wide id; datatype float64, int64, bool or string).
FLEET_SIGNAL = _obj(["id", "path", "data_type", "unit"], id=INT, path=STR,
                    data_type={"enum": ["float64", "int64", "bool", "string"]}, unit=STR)  # fmt: skip
PHASE = _obj(["name", "devices"], name=STR, devices=INT, committed=INT, failed=INT, in_progress=INT,
             pending=INT, removed=INT)  # fmt: skip
ROLLOUT_DEVICE = _obj(["device_id", "state"], device_id=STR, phase=INT, state=STR, reason=STR,
                      removed_at=NUM_OR_NULL, removed_by=STR, removed_reason=STR)
NUM_MAP: S = {"type": "object", "additionalProperties": {"type": "number"}}
GATE_DECISION = _obj(
    ["gate", "phase", "decision"], gate=STR, phase=INT, at=NUM,
    decision={"enum": ["pass", "trip", "insufficient"]}, statistic=NUM_OR_NULL, p_value=NUM_OR_NULL,
    effect=NUM_OR_NULL,
    reason=STR, inputs=NUM_MAP,
)  # fmt: skip
ROLLOUT = _obj(
    ["id", "state", "phase", "devices"],
    id=STR, release_version=STR, release_name=STR, revision=INT, state=STR, phase=INT, phase_name=STR,
    phase_started_at=NUM, phases=_arr(PHASE), devices=_arr(ROLLOUT_DEVICE), reason=STR, counts=INT_MAP,
    accepted_failures=_arr(STR), gates=_arr(GATE_DECISION), parent_id=STR, rollbacks=_arr(STR),
    created_at=NUM, updated_at=NUM, policy=ANY_MAP,
)  # fmt: skip
ROLLOUT_SUMMARY = _obj(
    ["id", "state"], id=STR, release_version=STR, release_name=STR, revision=INT, state=STR, phase=INT,
    reason=STR, devices=INT, counts=INT_MAP, parent_id=STR, created_at=NUM, updated_at=NUM,
)  # fmt: skip
EXECUTION = _obj(
    ["device_id", "state", "attempt"], device_id=STR, phase=INT, state=STR, reason=STR, attempt=INT,
    delivered=BOOL, offered_at=NUM_OR_NULL, retry_at=NUM_OR_NULL, changed_at=NUM,
    install_windows=_arr(_arr(NUM)), hold=BOOL, from_version=STR, running_version=STR,
    removed_at=NUM_OR_NULL, removed_by=STR, removed_reason=STR,
)  # fmt: skip
AUDIT_ROW = _obj(["seq", "at", "event"], seq=INT, rollout_id=STR, at=NUM, event=STR, detail=STR)
HISTORY = _obj(
    ["id", "events", "gate_evaluations"], id=STR, events=_arr(AUDIT_ROW),
    gate_evaluations=_arr(GATE_DECISION),
)  # fmt: skip
REVISION = _obj(
    ["revision", "id", "release_version"], revision=INT, id=STR, release_name=STR, release_version=STR,
    state=STR, parent_id=STR, created_at=NUM,
)  # fmt: skip
TOKEN = _obj(
    ["name", "role", "state"], name=STR, role=STR, state={"enum": ["active", "expired", "revoked"]},
    created_at=NUM, created_by=STR, expires_at=NUM_OR_NULL, revoked_at=NUM_OR_NULL,
    last_used_at=NUM_OR_NULL,
)  # fmt: skip
AUDIT_ENTRY = _obj(
    ["seq", "at", "actor", "role", "action", "target", "prev_hash", "hash"],
    seq=INT, at=NUM, actor=STR, role=STR, transport=STR, address=STR, request_id=STR, action=STR,
    target=STR, before=STR, after=STR, detail=STR, prev_hash=STR, hash=STR,
)  # fmt: skip
CAPTURE_PROPS: S = dict(
    capture_id=STR, device_id=STR, campaign=STR, first_ns=INT, last_ns=INT, samples=INT, segments=INT,
    first_received=NUM, last_received=NUM, privacy=STR, state={"enum": ["complete", "arriving"]},
)
SIGNAL_INFO = _obj(["signal", "kind"], signal=STR, kind={"enum": ["number", "enum", "text"]}, samples=INT,
                   first_ns=INT, last_ns=INT, unit=STR)  # fmt: skip
LINE = _obj(["signal", "t_ns", "values"], signal=STR, t_ns=_arr(INT), values=_arr(NUM), samples=INT,
            reduced=BOOL)  # fmt: skip
BANDS = _obj(["signal", "bands"], signal=STR, truncated=BOOL,
             bands=_arr(_obj(["from_ns", "to_ns", "value"], from_ns=INT, to_ns=INT, value=STR)))  # fmt: skip
PAYLOAD = _obj(
    ["kind", "size", "sha256", "path"], kind=STR, algorithm=STR, size=INT, sha256=STR, path=STR,
    base_sha256=STR,
)  # fmt: skip

RELEASE = _obj(["name", "version", "hardware_id", "sha256", "size", "payloads"], name=STR, version=STR,
               hardware_id=STR, sha256=STR, size=INT, payloads=_arr(PAYLOAD))

#: Response schema of each operator route (by operationId).
RESPONSES: dict[str, S] = {
    "whoami": _obj(["name", "role", "actions"], name=STR, role=STR, proven=BOOL, actions=_arr(STR)),
    "summary": _obj(
        ["devices", "online"], devices=INT, online=INT, segments_ingested=INT, samples_ingested=INT,
        captures_ingested=INT, campaigns=INT, campaigns_version=INT, refused=INT_MAP,
    ),
    "listDevices": _arr(DEVICE),
    "getDevice": DEVICE,
    "getDeviceCampaigns": _obj(
        ["desired_version", "desired", "reported_version", "running", "refused"], desired_version=INT,
        desired=_arr(_obj(["name", "version"], name=STR, version=INT)), reported_version=INT,
        running=_arr(STR), refused=STR_MAP,
    ),
    "getDeviceOta": _arr(_obj(
        ["rollout_id", "state"], rollout_id=STR, release_version=STR, phase=INT, state=STR, reason=STR,
        updated_at=NUM, events=_arr(AUDIT_ROW),
    )),
    "getDeviceCatalog": _obj(
        ["signals"], signals=_arr(_obj(["id", "path"], id=INT, path=STR, data_type=STR, unit=STR,
                                       **{"class": {"enum": [c.value for c in SignalClass]}}))
    ),
    "getFleetCatalog": _obj(["fleet", "signals"], fleet=STR, signals=_arr(FLEET_SIGNAL)),
    "pushFleetCatalog": _obj(
        ["fleet", "signals", "refused", "added"], fleet=STR, signals=_arr(FLEET_SIGNAL),
        refused=_arr(_obj(["path", "reason"], path=STR, reason=STR)), added=INT,
    ),
    "listCampaigns": _obj(
        ["version", "campaigns"], version=INT,
        campaigns=_arr(_obj(["name", "version", "document"], name=STR, version=INT, document=STR)),
    ),
    "applyCampaign": _obj(["name", "campaigns_version"], name=STR, campaigns_version=INT,
                          devices=_arr(STR)),
    "validateCampaign": _obj(["name", "version", "selector", "devices"], name=STR, version=INT,
                             selector=STR, devices=_arr(STR)),
    "deleteCampaign": _obj(["name", "campaigns_version"], name=STR, campaigns_version=INT),
    "query": _obj(["columns", "rows", "truncated"], columns=_arr(STR), rows=_arr({"type": "array"}),
                  truncated=BOOL),
    "listCaptures": _arr(_obj(["capture_id", "device_id", "state"], **CAPTURE_PROPS)),
    "getCapture": _obj(
        ["capture_id", "device_id", "state", "signals"], **CAPTURE_PROPS,
        trigger_ns={"type": ["integer", "null"]}, pre_ns=INT, post_ns=INT,
        windows_from={"enum": ["campaign", "data"]}, signals=_arr(SIGNAL_INFO), trajectory=_arr(STR),
    ),
    "getCaptureSeries": _obj(["from_ns", "to_ns", "lines", "bands"], from_ns=INT, to_ns=INT, columns=INT,
                             lines=_arr(LINE), bands=_arr(BANDS)),
    "exportCapture": {"type": "string", "format": "binary"},
    "listReleases": _arr(_obj(["name", "version", "hardware_id"], name=STR, version=STR, hardware_id=STR,
                              manifest=STR, signature=STR, created_at=NUM)),
    "uploadRelease": RELEASE,
    "stageRelease": _obj(["staging_id", "release", "targets"], staging_id=STR, release=RELEASE,
                         targets=ANY_MAP),
    "publishRelease": RELEASE,
    "listRollouts": _arr(ROLLOUT_SUMMARY),
    "createRollout": ROLLOUT,
    "getRollout": ROLLOUT,
    "pauseRollout": ROLLOUT,
    "resumeRollout": ROLLOUT,
    "abortRollout": ROLLOUT,
    "approveRollout": ROLLOUT,
    "rollbackRollout": ROLLOUT,
    "undoRollout": ROLLOUT,
    "retryRollout": ROLLOUT,
    "removeRolloutDevice": ROLLOUT,
    "listRolloutExecutions": _arr(EXECUTION),
    "getRolloutHistory": HISTORY,
    "listRolloutRevisions": _arr(REVISION),
    "rotateRoot": _obj(["root_version"], root_version=INT, root_keys=INT, threshold=INT,
                       online_keys_rotated=BOOL),
    "installImageRoot": _obj(["root_version"], root_version=INT, root_keys=INT, threshold=INT,
                             online_keys_rotated=BOOL),
    "listTokens": _arr(TOKEN),
    "createToken": {**TOKEN, "properties": {**TOKEN["properties"], "token": STR},
                    "required": [*TOKEN["required"], "token"]},
    "revokeToken": TOKEN,
    "listAudit": _arr(AUDIT_ENTRY),
    "getMetrics": {"type": "string", "description": "Prometheus text exposition format"},
    "getRetention": RETENTION,
    "setRetention": RETENTION,
    "clearRetention": RETENTION,
    "eraseDevice": ERASURE,
    "getErasure": ERASURE,
    "verifyAudit": _obj(["ok", "entries", "head_seq", "head_hash"], ok=BOOL, entries=INT, head_seq=INT,
                        head_hash=STR, broken_at={"type": ["integer", "null"]}, reason=STR),
}

#: Request body schema of each route that takes a JSON body.
REQUESTS: dict[str, S] = {
    "setRetention": {**_obj(["days"], days={"type": "integer", "minimum": 1, "maximum": 36500}),
                     "additionalProperties": False},
    # ``fleetloop catalog import``'s output: each signal's path, datatype and unit (other keys ignored)
    "pushFleetCatalog": _obj(["signals"], signals=_arr(_obj(
        ["path", "data_type"], path={"type": "string", "minLength": 1, "maxLength": 512},
        data_type={"enum": ["float64", "int64", "bool", "string", "FLOAT64", "INT64", "BOOL", "STRING"]},
        unit=STR,
    ))),
    "query": _obj(["sql"], sql=STR, max_rows=INT, timeout_s=NUM),
    # The policy (docs/rollouts.md): a whole document (apiVersion, kind, spec) or a bare spec.
    "createRollout": {
        **_obj(
            apiVersion=STR, kind=STR, metadata=ANY_MAP, spec=ANY_MAP,
            release=_obj(["version"], name=STR, version=STR), target=ANY_MAP,
            phases=_arr(_obj(["name"], name=STR, percent=NUM, count=INT, soak={}, start={}, success=ANY_MAP)),
            success=ANY_MAP, abort=_arr(ANY_MAP), gates=_arr(ANY_MAP), rate=ANY_MAP, schedule=ANY_MAP,
            maintenance=ANY_MAP, install=ANY_MAP, execution=ANY_MAP, weight=INT,
        ),
        "additionalProperties": True,
    },
    "undoRollout": {**_obj(["to_revision"], to_revision={"type": "integer", "minimum": 1}),
                    "additionalProperties": False},
    "retryRollout": {**_obj(devices=_arr(STR)), "additionalProperties": False},
    "removeRolloutDevice": {**_obj(reason={"type": "string", "maxLength": 500}),
                            "additionalProperties": False},
    "rotateRoot": {**_obj(root_keys=INT, threshold=INT, online=BOOL), "additionalProperties": False},
    # TUF targets metadata ({signed, signatures}) the release managers signed (docs/ota.md)
    "publishRelease": _obj(["signed", "signatures"], signed=ANY_MAP, signatures=_arr(ANY_MAP)),
    "installImageRoot": _obj(["signed", "signatures"], signed=ANY_MAP, signatures=_arr(ANY_MAP)),
    "createToken": {
        **_obj(["name", "role"], name={"type": "string", "pattern": NAME_PATTERN},
               role={"enum": ["viewer", "operator", "release-manager", "admin"]},
               expires_in_s={"type": "number", "exclusiveMinimum": 0}),
        "additionalProperties": False,
    },
}

RELEASE_QUERY: dict[str, tuple[S, bool, str]] = {
    "name": (STR, True, "release name (firmware, a model pack, ...)"),
    "version": (STR, True, "release version"),
    "hardware": (STR, True, "hardware id the image is for"),
}

#: Query parameters of the routes that take some: name → (schema, required, description).
QUERY: dict[str, dict[str, tuple[S, bool, str]]] = {
    "applyCampaign": {"source": (STR, False, "file name used in error locations (FILE:LINE:COL)")},
    "validateCampaign": {"source": (STR, False, "file name used in error locations (FILE:LINE:COL)")},
    "listCaptures": {
        "device": (STR, False, "only this device's captures"),
        "campaign": (STR, False, "only this campaign's captures"),
        "since_ns": (NS, False, "only captures with data at or after this time (Unix ns)"),
        "until_ns": (NS, False, "only captures with data at or before this time (Unix ns)"),
        "limit": ({"type": "integer", "minimum": 1, "maximum": 10000}, False, "the newest N (10,000)"),
    },
    "getCapture": {"device": (STR, False, "the device, when two devices have captures of this id")},
    "getCaptureSeries": {
        "device": (STR, False, "the device, when two devices have captures of this id"),
        "signals": (STR, False, "comma-separated signal paths (at most 64)"),
        "from_ns": (NS, False, "window start (Unix ns; the capture's first sample by default)"),
        "to_ns": (NS, False, "window end (Unix ns; the capture's last sample by default)"),
        "columns": ({"type": "integer", "minimum": 1, "maximum": 4000}, False,
                    "plot columns: a line comes back as at most two points (low, high) per column"),
    },
    "exportCapture": {
        "device": (STR, False, "the device, when two devices have captures of this id"),
        "format": ({"enum": ["mcap", "parquet", "csv"]}, False, "file format (mcap by default)"),
    },
    "uploadRelease": RELEASE_QUERY,
    "stageRelease": RELEASE_QUERY,
    "listRolloutRevisions": {"name": (STR, False, "only the revisions of this release name")},
    "listAudit": {
        "after": ({"type": "integer", "minimum": 0, "maximum": 2**53},
                  False, "entries after this sequence number"),
        "since": ({"type": "number", "minimum": -(2**53), "maximum": 2**53},
                  False, "entries at or after this Unix time"),
        "actor": (STR, False, "only this actor (token name)"),
        "kind": (STR, False, "only this action, or actions under it (rollouts, rollouts.create)"),
        "limit": ({"type": "integer", "minimum": 1, "maximum": 10000},
                  False, "at most this many entries (1000 by default)"),
    },
}

_PATH_PARAM_PATTERNS = {"repository": {"enum": ["image", "director"]}}


def _path_template(path: str) -> tuple[str, list[str]]:
    """aiohttp's ``/v1/x/{name:regex}`` as OpenAPI's ``/v1/x/{name}``, and the parameter names."""
    out, names, i = [], [], 0
    while i < len(path):
        if path[i] == "{":
            depth, j = 1, i + 1
            while depth:
                depth += {"{": 1, "}": -1}.get(path[j], 0)
                j += 1
            name = path[i + 1 : j - 1].split(":", 1)[0]
            names.append(name)
            out.append("{" + name + "}")
            i = j
        else:
            out.append(path[i])
            i += 1
    return "".join(out), names


def _error_responses(public: bool) -> S:
    codes = {"4XX": "the request was refused; the body says why"}
    codes["503"] = "the coordinator is busy or its database unreachable; retry"
    if not public:
        codes["401"] = "no valid API token (missing, unknown, expired or revoked)"
        codes["403"] = "the token's role does not allow this; the body names the role needed"
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    return {code: {"description": text, "content": error}
            for code, text in codes.items()}  # fmt: skip


def _operation(route: Any) -> S:
    path_params = _path_template(route.path)[1]
    role = ACTIONS[route.action].value if route.action else None
    op: S = {
        "operationId": route.name,
        "summary": f"{route.action} (role {role})" if role else route.name,
        "parameters": [
            {"name": n, "in": "path", "required": True,
             "schema": _PATH_PARAM_PATTERNS.get(n, {"type": "string", "minLength": 1})}
            for n in path_params
        ] + [
            {"name": n, "in": "query", "required": req, "description": text, "schema": schema}
            for n, (schema, req, text) in QUERY.get(route.name, {}).items()
        ],
        "responses": {
            str(route.status): {
                "description": "success",
                "content": {route.reply_type: {"schema": RESPONSES[route.name]}},
            },
            **_error_responses(public=False),
        },
        "security": [{"bearer": []}],
        "x-fleetloop-role": role,
        "x-fleetloop-action": route.action,
    }  # fmt: skip
    if route.max_body:
        schema = REQUESTS.get(route.name, {"type": "string"} if route.body_type == "text/yaml"
                              else {"type": "string", "format": "binary"})  # fmt: skip
        op["requestBody"] = {
            "required": route.name not in ("rotateRoot", "retryRollout", "removeRolloutDevice"),
            "description": f"at most {route.max_body} bytes",
            "content": {route.body_type: {"schema": schema}},
        }
    return op


BINARY: S = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
_PUBLIC: S = {
    "/healthz": {"get": {"operationId": "health", "security": [], "responses": {
        "200": {"description": "the coordinator answers",
                "content": {"application/json": {"schema": _obj(["ok"], ok=BOOL)}}}}}},
    "/v1/openapi.json": {"get": {"operationId": "openapi", "security": [], "responses": {
        "200": {"description": "this document", "content": {"application/json": {"schema": ANY_MAP}}}}}},
    "/files/{sha256}": {"get": {
        "operationId": "getArtifactFile", "security": [],
        "description": "An artifact payload by its SHA-256, with Range (bytes=N-, N-M, -N) for resuming.",
        "parameters": [
            {"name": "sha256", "in": "path", "required": True,
             "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
        ],
        "responses": {
            "200": {"description": "the whole file",
                    "content": BINARY},
            "206": {"description": "the requested range",
                    "content": BINARY},
            "416": {"description": "the range starts past the end"},
            **_error_responses(public=True),
        },
    }},
    "/tuf/image/{name}": {"get": {
        "operationId": "getImageMetadata", "security": [],
        "parameters": [{"name": "name", "in": "path", "required": True,
                        "schema": {"type": "string", "pattern": "^[a-z0-9.]{1,32}\\.json$"}}],
        "responses": {"200": {"description": "TUF metadata of the image repository",
                              "content": {"application/json": {"schema": ANY_MAP}}},
                      **_error_responses(public=True)},
    }},
    "/tuf/image/targets/{target_path}": {"get": {
        "operationId": "getImageTarget", "security": [],
        "description": "A payload at its TUF target path (NAME/HARDWARE/VERSION.img, ...) or with the "
                       "consistent-snapshot hash prefix on its file name (DIR/<sha256>.NAME), with Range.",
        "parameters": [{"name": "target_path", "in": "path", "required": True,
                        "schema": {"type": "string", "minLength": 1, "maxLength": 1024}}],
        "responses": {
            "200": {"description": "the whole file", "content": BINARY},
            "206": {"description": "the requested range", "content": BINARY},
            "416": {"description": "the range starts past the end"},
            **_error_responses(public=True),
        },
    }},
    "/tuf/director/{device_id}/{name}": {"get": {
        "operationId": "getDirectorMetadata", "security": [],
        "parameters": [
            {"name": "device_id", "in": "path", "required": True,
             "schema": {"type": "string", "pattern": "^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$"}},
            {"name": "name", "in": "path", "required": True,
             "schema": {"type": "string", "pattern": "^[a-z0-9.]{1,32}\\.json$"}},
        ],
        "responses": {"200": {"description": "TUF metadata the director signed for one device",
                              "content": {"application/json": {"schema": ANY_MAP}}},
                      **_error_responses(public=True)},
    }},
}  # fmt: skip


def openapi_document(routes: Sequence[Any]) -> S:
    """The OpenAPI 3.1 document for ``routes`` plus the public routes."""
    paths: dict[str, S] = {k: dict(v) for k, v in _PUBLIC.items()}
    for route in routes:
        template = _path_template(route.path)[0]
        paths.setdefault(template, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "fleetloop coordinator",
            "version": "1",
            "description": "Operators authenticate with an API token (Authorization: Bearer ...); each "
            "operation names the role it needs. Devices fetch /files and /tuf without a token.",
        },
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
