"""The envelope of a local store file: what the store knows of a segment, written before its bytes.

A store file is the envelope followed by the encoded segment. The envelope carries the store's own
metadata (capture, campaign, priority, creation time, and the privacy policy the capture was taken
under), so a file whose index row was lost in a crash is re-indexed from the file alone
(:class:`~fleetloop_agent.local_store.LocalStore` on open) and an upgrade rewrite keeps it. Its layout is
documented in docs/segment-format.md ("Store file envelope"). Pure: bytes in, bytes or an
:class:`Envelope` out; a file's hostile or damaged bytes are a :class:`CorruptSegmentError` naming it.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from fleetloop_shared.errors import CorruptSegmentError

#: Store file envelope (documented in docs/segment-format.md, "Store file envelope").
ENVELOPE_MAGIC = b"FLSF"
ENVELOPE_VERSION = 1
#: Envelope of a capture taken under a privacy policy: version 1 plus the policy stamp as a third label.
ENVELOPE_VERSION_PRIVACY = 2
_ENVELOPE_FIXED = struct.Struct("<4sBBHq")  # magic, version, priority, reserved, created_ns
_U16 = struct.Struct("<H")
_CRC = struct.Struct("<I")

MAX_PRIORITY = 9
MAX_LABEL_BYTES = 256  # capture id and campaign name, UTF-8


@dataclass(frozen=True)
class Envelope:
    """What a store file says about its segment; ``segment_offset``: where the segment's bytes begin."""

    capture_id: str
    campaign: str
    priority: int
    created_ns: int
    segment_offset: int
    privacy: str = ""


def encode_envelope(
    capture_id: str, campaign: str, priority: int, created_ns: int, privacy: str = ""
) -> bytes:
    """The envelope that goes before a segment's bytes in its store file (version 2 only with a policy)."""
    labels = [capture_id, campaign] + ([privacy] if privacy else [])
    version = ENVELOPE_VERSION_PRIVACY if privacy else ENVELOPE_VERSION
    parts = [_ENVELOPE_FIXED.pack(ENVELOPE_MAGIC, version, priority, 0, created_ns)]
    for label in labels:
        raw = label.encode("utf-8")
        parts += [_U16.pack(len(raw)), raw]
    head = b"".join(parts)
    return head + _CRC.pack(zlib.crc32(head))


def decode_envelope(data: bytes, where: str) -> Envelope:
    """Parse a store file's envelope; any defect is a CorruptSegmentError naming the file."""
    pos = _ENVELOPE_FIXED.size
    if len(data) < pos:
        raise CorruptSegmentError(f"{where}: store file truncated at byte {len(data)}")
    magic, version, priority, reserved, created_ns = _ENVELOPE_FIXED.unpack_from(data, 0)
    if magic != ENVELOPE_MAGIC:
        raise CorruptSegmentError(f"{where}: not a store file (magic {magic!r})")
    if version not in (ENVELOPE_VERSION, ENVELOPE_VERSION_PRIVACY) or reserved != 0:
        raise CorruptSegmentError(f"{where}: unsupported store file version {version}/{reserved}")
    if priority > MAX_PRIORITY:
        raise CorruptSegmentError(f"{where}: priority {priority} out of range")
    labels: list[str] = []
    for what in ("capture id", "campaign", "privacy policy")[: 2 if version == ENVELOPE_VERSION else 3]:
        if len(data) < pos + 2:
            raise CorruptSegmentError(f"{where}: store file truncated in {what} length")
        (n,) = _U16.unpack_from(data, pos)
        pos += 2
        if n > MAX_LABEL_BYTES or len(data) < pos + n:
            raise CorruptSegmentError(f"{where}: {what} length {n} impossible")
        try:
            labels.append(data[pos : pos + n].decode("utf-8"))
        except UnicodeDecodeError:
            raise CorruptSegmentError(f"{where}: {what} is not UTF-8") from None
        pos += n
    if len(data) < pos + _CRC.size:
        raise CorruptSegmentError(f"{where}: store file truncated in envelope checksum")
    (crc,) = _CRC.unpack_from(data, pos)
    if crc != zlib.crc32(data[:pos]):
        raise CorruptSegmentError(f"{where}: envelope checksum mismatch")
    return Envelope(labels[0], labels[1], priority, created_ns, pos + _CRC.size, *labels[2:])
