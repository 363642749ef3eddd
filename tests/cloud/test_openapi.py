"""The OpenAPI document against the running server: schemathesis generates requests for every
operation from ``/v1/openapi.json`` and sends them to a real coordinator on loopback (aiohttp, SQLite,
DuckDB, the TUF repositories) with an admin token; no answer may be a 5xx, and every answer must match
the document (status codes, content types, bodies). Runs in CI with the rest of the suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance

from fleetloop_cloud.http_api import start_http_server
from fleetloop_cloud.http_api.openapi import openapi_document
from fleetloop_cloud.http_api.routes import ROUTES
from fleetloop_cloud.ota.artifact_store import ReleaseInput
from fleetloop_cloud.server import Coordinator
from fleetloop_cloud.services.access import Caller
from fleetloop_fwsim.firmware import build_image
from fleetloop_shared.wire import device_pb2

_state: dict[str, Any] = {}


@pytest.fixture(scope="module")
def coordinator_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    c = Coordinator(Path(tmp_path_factory.mktemp("openapi")) / "cloud")
    _state["token"] = c.tokens.bootstrap(c.clock()).secret
    hello = device_pb2.Hello(device_id="car-1", fleet="f", labels={"hw": "gen1"}, data_origin="sim")
    hello.catalog.add(id=1, path="Vehicle.Speed", data_type=device_pb2.DATA_TYPE_FLOAT64)
    c.devices.connect(Caller.device("car-1", transport="test", proven=True), hello, c.clock())
    c.releases.upload(Caller.local(), ReleaseInput(
        build_image("1.0.0", "gen1", size_hint=4096), name="firmware",
                      version="1.0.0", hardware_id="gen1", now=c.clock()))  # fmt: skip
    server, port = start_http_server(c, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        c.stop()
        c.close()


def test_every_operation_matches_the_document(coordinator_url: str) -> None:
    api = schemathesis.openapi.from_url(f"{coordinator_url}/v1/openapi.json")
    headers = {"Authorization": f"Bearer {_state['token']}"}
    failures: dict[str, str] = {}
    operations = [result.ok() for result in api.get_all_operations()]
    labels = {op.label for op in operations}
    expected = {f"{r.method} {r.path}" for r in ROUTES if "{" not in r.path}
    # every operator route and the public ones (schemathesis leaves out the document's own route)
    assert expected <= labels and len(labels) == len(ROUTES) + 5, sorted(labels)
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None, derandomize=True)  # fmt: skip
        def check(case: Any) -> None:
            # Every check but "schema-valid data is accepted": no JSON schema can say what a valid
            # campaign, SQL query, firmware image or rollout policy is; the services answer 400.
            case.call_and_validate(headers=headers, timeout=60, excluded_checks=[positive_data_acceptance])

        try:
            check()
        except (Exception, BaseExceptionGroup) as exc:  # collect every operation's failure, report all
            failures[operation.label] = str(exc)[:2000]
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())


def test_the_document_covers_every_route_and_names_its_role() -> None:
    doc = openapi_document(ROUTES)
    operations = {op["operationId"]: op for path in doc["paths"].values() for op in path.values()}
    assert {r.name for r in ROUTES} <= set(operations)
    for route in ROUTES:
        op = operations[route.name]
        assert op["security"] == [{"bearer": []}] and op["x-fleetloop-role"], route.name
        assert {"401", "403"} <= set(op["responses"]), route.name
    for public in ("getArtifactFile", "getImageMetadata", "getDirectorMetadata", "health", "openapi"):
        assert operations[public]["security"] == []
