"""The firmware image format: a small self-describing header in front of the image body.

The agent must know which version a slot holds without trusting anything but the slot itself (after a
fallback the cloud's idea of the device is stale), so every image starts with a header naming its
version and hardware id. The device reads it (``fleetloop_agent.ota.image``), the cloud checks an upload's
header against the release it claims to be, and the simulator builds images with :func:`pack_image`.

Layout: ``MAGIC`` (8 bytes) | header length (u32 little-endian) | header JSON (UTF-8, canonical) | body.
The header JSON holds ``format``, ``version``, ``hardware_id`` and ``body_size``; a slot holding fewer
body bytes than announced is a torn write and is reported as such.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

from fleetloop_shared.errors import IntegrityError

MAGIC = b"FLFWIMG\x01"
FORMAT_VERSION = 1
#: Headers are tiny; a larger length field means the bytes are not an image.
MAX_HEADER_BYTES = 4096
_LEN = struct.Struct("<I")


@dataclass(frozen=True)
class ImageInfo:
    """What an image says about itself."""

    version: str
    hardware_id: str


def pack_image(version: str, hardware_id: str, body: bytes) -> bytes:
    """An image: header naming ``version`` and ``hardware_id``, then ``body``."""
    header = json.dumps(
        {"format": FORMAT_VERSION, "version": version, "hardware_id": hardware_id, "body_size": len(body)},
        sort_keys=True,
        separators=(",", ":"),
    ).encode("utf-8")
    if len(header) > MAX_HEADER_BYTES:
        raise IntegrityError(f"image header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
    return MAGIC + _LEN.pack(len(header)) + header + body


def image_body(data: bytes) -> bytes:
    """The body after the header (IntegrityError when ``data`` is not a whole image)."""
    image_info(data)
    (header_len,) = _LEN.unpack_from(data, len(MAGIC))
    return data[len(MAGIC) + _LEN.size + header_len :]


def image_info(data: bytes) -> ImageInfo:
    """Read an image's header; IntegrityError when ``data`` is not a whole image."""
    prefix = len(MAGIC) + _LEN.size
    if len(data) < prefix or data[: len(MAGIC)] != MAGIC:
        raise IntegrityError("not a fleetloop firmware image (bad magic)")
    (header_len,) = _LEN.unpack_from(data, len(MAGIC))
    if header_len > MAX_HEADER_BYTES or prefix + header_len > len(data):
        raise IntegrityError(f"firmware image header length {header_len} is impossible")
    try:
        doc = json.loads(data[prefix : prefix + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"firmware image header is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_VERSION:
        raise IntegrityError("firmware image header has an unknown format")
    version, hardware_id, body_size = doc.get("version"), doc.get("hardware_id"), doc.get("body_size")
    if not isinstance(version, str) or not version or not isinstance(hardware_id, str) or not hardware_id:
        raise IntegrityError("firmware image header lacks version or hardware_id")
    if isinstance(body_size, bool) or not isinstance(body_size, int) or body_size < 0:
        raise IntegrityError("firmware image header has no valid body_size")
    have = len(data) - prefix - header_len
    if have < body_size:
        raise IntegrityError(f"firmware image is truncated: body has {have} of {body_size} bytes")
    return ImageInfo(version=version, hardware_id=hardware_id)
