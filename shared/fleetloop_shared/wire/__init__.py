"""The wire contract v1 as Python: the one place that imports the generated protobuf code.

Everything else imports message classes and service stubs from here, so a regeneration (``make proto``)
or a move of the generated package touches one file. Decoding bytes from a peer goes through
:func:`parse`, which maps protobuf's errors to :class:`MalformedMessageError`.
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from fleetloop_shared.errors import MalformedMessageError
from fleetloop_shared.wire.gen.fleetloop.device.v1 import device_pb2, device_pb2_grpc
from fleetloop_shared.wire.gen.fleetloop.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from fleetloop_shared.wire.gen.fleetloop.ota.v1 import ota_pb2
from fleetloop_shared.wire.gen.fleetloop.push.v1 import push_pb2, push_pb2_grpc

__all__ = [
    "MAX_MESSAGE_BYTES",
    "device_pb2",
    "device_pb2_grpc",
    "ingest_pb2",
    "ingest_pb2_grpc",
    "ota_pb2",
    "parse",
    "push_pb2",
    "push_pb2_grpc",
]

#: Largest message either side accepts (a segment upload is the largest); bounded on both ends.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

M = TypeVar("M", bound=Message)


def parse(cls: type[M], data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> M:
    """Decode ``data`` as ``cls``; hostile or truncated bytes give MalformedMessageError, nothing else."""
    if len(data) > max_bytes:
        raise MalformedMessageError(f"{cls.__name__}: {len(data)} bytes exceeds {max_bytes}")
    msg = cls()
    try:
        msg.ParseFromString(data)
    except (DecodeError, ValueError, RecursionError) as exc:
        raise MalformedMessageError(f"{cls.__name__}: cannot decode: {exc}") from None
    return msg
