"""The wire contract: generated code is current, and hostile bytes never crash a decoder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetloop_shared.errors import MalformedMessageError
from fleetloop_shared.wire import MAX_MESSAGE_BYTES, device_pb2, ingest_pb2, ota_pb2, parse

ROOT = Path(__file__).resolve().parents[2]
MESSAGES = [
    device_pb2.DeviceMessage,
    device_pb2.CloudMessage,
    ingest_pb2.UploadSegmentRequest,
    ota_pb2.OtaJob,
    ota_pb2.OtaStatus,
]


def test_generated_code_is_not_stale() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_round_trip_of_a_hello() -> None:
    hello = device_pb2.Hello(device_id="car-1", fleet="f", labels={"kind": "car"})
    hello.catalog.add(id=1, path="Vehicle.Speed", data_type=device_pb2.DATA_TYPE_FLOAT64, unit="km/h")
    msg = device_pb2.DeviceMessage(hello=hello)
    back = parse(device_pb2.DeviceMessage, msg.SerializeToString())
    assert back.hello.catalog[0].path == "Vehicle.Speed"
    assert back.WhichOneof("kind") == "hello"


@pytest.mark.parametrize("cls", MESSAGES)
@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=512))
def test_hostile_bytes_give_malformed_or_a_message(cls: type, data: bytes) -> None:
    try:
        parse(cls, data)
    except MalformedMessageError as exc:
        assert cls.__name__ in str(exc)


def test_truncated_message_is_refused() -> None:
    req = ingest_pb2.UploadSegmentRequest(device_id="d", segment=b"x" * 100)
    raw = req.SerializeToString()
    with pytest.raises(MalformedMessageError, match="UploadSegmentRequest"):
        parse(ingest_pb2.UploadSegmentRequest, raw[:-10])


def test_oversized_message_is_refused_before_decoding() -> None:
    with pytest.raises(MalformedMessageError, match="exceeds"):
        parse(ota_pb2.OtaJob, b"\x00" * (MAX_MESSAGE_BYTES + 1))


def test_an_agent_that_predates_the_withdrawal_message_reads_it_as_no_message() -> None:
    """An older agent's CloudMessage has no field 6: it parses a withdrawal as a message of no kind
    (which it ignores, finishing its job) and keeps the field's bytes if it passes the message on."""
    from google.protobuf import descriptor, descriptor_pb2, descriptor_pool, message_factory

    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: descriptor.FileDescriptor) -> None:
        for dep in file.dependencies:
            add(dep)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        if file.name == device_pb2.DESCRIPTOR.name:  # the device.proto an older agent was built from
            cloud = next(m for m in proto.message_type if m.name == "CloudMessage")
            kept = [f for f in cloud.field if f.number != 6]
            del cloud.field[:]
            cloud.field.extend(kept)
        if file.name not in added:
            added.add(file.name)
            pool.Add(proto)

    add(device_pb2.DESCRIPTOR)
    old_class = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("fleetloop.device.v1.CloudMessage")
    )
    cancel = ota_pb2.OtaCancel(job_id="r1:car-1", rollout_id="r1", reason="x")
    sent = device_pb2.CloudMessage(ota_cancel=cancel)
    old = old_class.FromString(sent.SerializeToString())
    assert old.WhichOneof("kind") is None
    assert device_pb2.CloudMessage.FromString(old.SerializeToString()) == sent
    # the messages it knows are unchanged
    welcome = device_pb2.CloudMessage(welcome=device_pb2.Welcome())
    assert old_class.FromString(welcome.SerializeToString()).WhichOneof("kind") == "welcome"
