"""grpc.health.v1 and server reflection on the coordinator's gRPC port, over real gRPC on loopback."""

from __future__ import annotations

import logging
from typing import Any
from typing import Any as RunningCoordinator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from fleetloop_cloud.grpc_api import SERVICE_NAMES

SERVING = health_pb2.HealthCheckResponse.SERVING


def test_service_names_are_the_wire_services() -> None:
    assert SERVICE_NAMES == ("fleetloop.device.v1.DeviceService", "fleetloop.ingest.v1.IngestService")


@pytest.mark.parametrize("service", ["", *SERVICE_NAMES])
def test_health_check_reports_serving(running_coordinator: RunningCoordinator, service: str) -> None:
    stub = health_pb2_grpc.HealthStub(running_coordinator.channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    assert reply.status == SERVING


def test_health_check_of_an_unknown_service_is_not_found(running_coordinator: RunningCoordinator) -> None:
    stub = health_pb2_grpc.HealthStub(running_coordinator.channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_watch_streams_the_current_status(running_coordinator: RunningCoordinator) -> None:
    stub = health_pb2_grpc.HealthStub(running_coordinator.channel)
    call = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
    try:
        assert next(iter(call)).status == SERVING
    finally:
        call.cancel()


def test_health_list_reports_every_service(
    running_coordinator: RunningCoordinator, caplog: pytest.LogCaptureFixture
) -> None:
    stub = health_pb2_grpc.HealthStub(running_coordinator.channel)
    reply = stub.List(health_pb2.HealthListRequest(), timeout=5)
    assert {name: s.status for name, s in reply.statuses.items()} == {
        name: SERVING for name in ("", *SERVICE_NAMES)
    }
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


#: Server reflection under both names a client may try: the released v1 (grpcurl and current clients
#: ask it first) and v1alpha. The messages are the same on the wire, so one set of stubs calls both.
REFLECTION = ["grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"]


def _reflect(
    channel: grpc.Channel, request: reflection_pb2.ServerReflectionRequest, service: str = REFLECTION[1]
) -> Any:
    call = channel.stream_stream(
        f"/{service}/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    replies = list(call(iter([request]), timeout=5))
    assert len(replies) == 1
    assert not replies[0].HasField("error_response"), replies[0].error_response
    return replies[0]


def test_reflection_v1alpha_stubs_still_work(running_coordinator: RunningCoordinator) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(running_coordinator.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    assert set(SERVICE_NAMES) <= {s.name for s in reply.list_services_response.service}


@pytest.mark.parametrize("service", REFLECTION)
def test_reflection_lists_the_services(running_coordinator: RunningCoordinator, service: str) -> None:
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    reply = _reflect(running_coordinator.channel, request, service)
    names = {s.name for s in reply.list_services_response.service}
    assert set(SERVICE_NAMES) <= names
    assert "grpc.health.v1.Health" in names
    assert set(REFLECTION) <= names


@pytest.mark.parametrize("service", REFLECTION)
def test_reflection_describes_itself(running_coordinator: RunningCoordinator, service: str) -> None:
    from google.protobuf import descriptor_pb2

    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=service)
    reply = _reflect(running_coordinator.channel, request, service)
    (proto,) = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in reply.file_descriptor_response.file_descriptor_proto
    ]
    assert f"{proto.package}.{proto.service[0].name}" == service
    assert [m.name for m in proto.service[0].method] == ["ServerReflectionInfo"]


@pytest.mark.parametrize("service", REFLECTION)
def test_reflection_describes_upload_segment(running_coordinator: RunningCoordinator, service: str) -> None:
    from google.protobuf import descriptor_pb2

    reply = _reflect(
        running_coordinator.channel,
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="fleetloop.ingest.v1.IngestService"),
        service,
    )
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in reply.file_descriptor_response.file_descriptor_proto
    ]
    services = {s.name: s for f in files for s in f.service}
    assert "UploadSegment" in {m.name for m in services["IngestService"].method}


def test_device_rpcs_still_work_beside_health(running_coordinator: RunningCoordinator) -> None:
    # The fleetloop services are registered as before: an upload from an unknown device is NOT_FOUND.
    from fleetloop_shared.wire import ingest_pb2, ingest_pb2_grpc

    stub = ingest_pb2_grpc.IngestServiceStub(running_coordinator.channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.UploadSegment(
            ingest_pb2.UploadSegmentRequest(device_id="nobody", segment_id=b"\0" * 16, segment=b""), timeout=5
        )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_bug_while_ingesting_is_internal_not_unknown(
    running_coordinator: RunningCoordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # docs/wire.md: anything that is not a fleetloop error is INTERNAL (and logged), never UNKNOWN.
    from fleetloop_shared.wire import ingest_pb2, ingest_pb2_grpc

    def broken(*args: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(running_coordinator.coordinator.ingest, "segment", broken)
    stub = ingest_pb2_grpc.IngestServiceStub(running_coordinator.channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.UploadSegment(ingest_pb2.UploadSegmentRequest(device_id="car-1"), timeout=5)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "boom" not in (info.value.details() or "")
