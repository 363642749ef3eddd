"""Binary deltas between firmware images (bsdiff4), safe to apply to bytes from outside.

A new firmware image mostly repeats the old one: a bsdiff4 patch is a few percent of the image, which is
what makes fleet updates affordable on metered links. This is the only module that imports bsdiff4, so
its failure modes are mapped to the error tree in one place.

Patches arrive from the network. Before bsdiff4 sees one, its header and compressed blocks are checked
here with bounded decompression: a hostile patch cannot claim a 100 GB output or hide a bzip2 bomb, and
garbage raises :class:`IntegrityError`, never another exception.
"""

from __future__ import annotations

import bz2
import struct

import bsdiff4

from fleetloop_shared.errors import IntegrityError

DELTA_ALGORITHM = "bsdiff4"
#: Default ceiling for a patched image; callers with a device limit pass theirs.
DEFAULT_MAX_OUTPUT = 1 << 30

_MAGIC = b"BSDIFF40"
_HEADER = struct.Struct("<8s8s8s8s")
_CONTROL_TUPLE = 24


def make_delta(old: bytes, new: bytes) -> bytes:
    """A bsdiff4 patch that turns ``old`` into ``new`` (needs ~17× ``len(old)`` of RAM while diffing)."""
    return bytes(bsdiff4.diff(old, new))


def apply_delta(old: bytes, patch: bytes, *, max_size: int = DEFAULT_MAX_OUTPUT) -> bytes:
    """``old`` with ``patch`` applied; IntegrityError("delta is malformed: ...") on anything invalid.

    ``max_size`` bounds the output (and so the memory) a patch may ask for.
    """
    out_size = _check_patch(patch, max_size)
    try:
        new = bsdiff4.patch(old, patch)
    except (ValueError, OverflowError, MemoryError, OSError, EOFError, TypeError) as exc:
        raise IntegrityError(f"delta is malformed: {exc}") from None
    if len(new) != out_size:
        raise IntegrityError(f"delta is malformed: produced {len(new)} bytes, header says {out_size}")
    return bytes(new)


def _offtin(raw: bytes) -> int:
    """bsdiff's 64-bit sign-magnitude little-endian integer."""
    value = int.from_bytes(raw, "little") & ~(1 << 63)
    return -value if raw[7] & 0x80 else value


def _check_patch(patch: bytes, max_size: int) -> int:
    if len(patch) < _HEADER.size:
        raise IntegrityError(f"delta is malformed: {len(patch)} bytes is shorter than a bsdiff4 header")
    magic, raw_control, raw_diff, raw_size = _HEADER.unpack_from(patch)
    if magic != _MAGIC:
        raise IntegrityError("delta is malformed: not a bsdiff4 patch (bad magic)")
    len_control, len_diff, out_size = _offtin(raw_control), _offtin(raw_diff), _offtin(raw_size)
    if len_control < 0 or len_diff < 0 or out_size < 0:
        raise IntegrityError("delta is malformed: negative length in the header")
    if out_size > max_size:
        raise IntegrityError(f"delta is malformed: output of {out_size} bytes exceeds the limit {max_size}")
    start = _HEADER.size
    if start + len_control + len_diff > len(patch):
        raise IntegrityError("delta is malformed: truncated (blocks extend past the end)")
    control = patch[start : start + len_control]
    diff = patch[start + len_control : start + len_control + len_diff]
    extra = patch[start + len_control + len_diff :]
    # Every control tuple moves at least one byte or is useless, so out_size + 1 tuples is generous.
    control_len = _bounded_bunzip(control, _CONTROL_TUPLE * (out_size + 1), "control")
    if control_len % _CONTROL_TUPLE:
        raise IntegrityError("delta is malformed: control block is not a whole number of tuples")
    _bounded_bunzip(diff, out_size, "diff")
    _bounded_bunzip(extra, out_size, "extra")
    return out_size


def _bounded_bunzip(block: bytes, limit: int, name: str) -> int:
    """Decompressed size of one bzip2 block, refusing to expand past ``limit`` (bomb defence)."""
    decompressor = bz2.BZ2Decompressor()
    total = 0
    data = block
    try:
        while True:
            out = decompressor.decompress(data, max_length=1 << 20)
            data = b""
            total += len(out)
            if total > limit:
                raise IntegrityError(f"delta is malformed: {name} block expands past {limit} bytes")
            if decompressor.eof:
                break
            if decompressor.needs_input:
                raise IntegrityError(f"delta is malformed: {name} block is truncated")
    except (OSError, ValueError, EOFError) as exc:
        raise IntegrityError(f"delta is malformed: {name} block is not bzip2 ({exc})") from None
    if decompressor.unused_data:
        raise IntegrityError(f"delta is malformed: trailing bytes after the {name} block")
    return total
