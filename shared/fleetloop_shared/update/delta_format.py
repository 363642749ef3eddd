"""What both delta containers share: their names, how a result is described, how a patch is read.

Kept apart from the containers so the device-side decoders, the cloud-side encoders and the facade
(:mod:`fleetloop_shared.update.delta`) import it without importing each other.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import BinaryIO

from fleetloop_shared.errors import IntegrityError

#: Names of the containers in signed metadata, in the device's hello and in configuration.
FLDELTA1 = "fldelta1"
FLDELTA2 = "fldelta2"
#: Every format this code reads, newest (preferred) first.
FORMATS = (FLDELTA2, FLDELTA1)
MAGICS = {b"FLDELTA1": FLDELTA1, b"FLDELTA2": FLDELTA2}
#: Default ceiling for a patched image; callers with a device limit pass theirs.
DEFAULT_MAX_OUTPUT = 1 << 30


@dataclass
class DeltaStats:
    """What an encoder produced: its format, size, and which method won how many chunks."""

    format: str = FLDELTA2
    bytes: int = 0
    new_bytes: int = 0
    chunks: int = 0
    methods: dict[str, int] = field(default_factory=dict)

    @property
    def algorithm(self) -> str:
        """The container plus the methods it used, e.g. ``fldelta2:streams+zstd-patch``."""
        used = "+".join(sorted(self.methods))
        return f"{self.format}:{used}" if used else self.format

    def count(self, method: str) -> None:
        self.methods[method] = self.methods.get(method, 0) + 1


def read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise IntegrityError(f"delta is malformed: truncated in {what}")
    return data


#: The container header both formats start with: magic, new size, base size, chunk size, chunk count.
HEADER = struct.Struct("<8sQQII")


def read_header(
    patch: BinaryIO, magic: bytes, *, old_size: int, max_size: int, max_chunk: int
) -> tuple[int, int, int]:
    """``(new_size, chunk, count)`` of a patch, each checked against the base the device has and the
    bounds before anything is allocated; IntegrityError naming what is wrong otherwise."""
    got, new_size, base_size, chunk, count = HEADER.unpack(read_exact(patch, HEADER.size, "header"))
    if got != magic:
        raise IntegrityError(f"delta is malformed: not an {magic.decode()} patch (bad magic)")
    if new_size > max_size:
        raise IntegrityError(f"delta is malformed: output of {new_size} bytes exceeds the limit {max_size}")
    if base_size != old_size:
        raise IntegrityError(f"delta is for a base of {base_size} bytes, the installed image has {old_size}")
    if not 0 < chunk <= max_chunk or count != (new_size + chunk - 1) // chunk:
        raise IntegrityError("delta is malformed: impossible chunk size or count")
    return new_size, chunk, count


#: One chunk of a container, applied: ``(old, old_size, patch, write, out_len)`` reads the chunk's header
#: and body from ``patch`` (its header must say ``out_len``, the length the container header implies)
#: and hands exactly ``out_len`` new bytes to ``write``; IntegrityError otherwise.
ChunkApplier = Callable[[BinaryIO, int, BinaryIO, Callable[[bytes], object], int], None]


@dataclass(frozen=True)
class ChunkedContainer:
    """A delta container as a device reads it: the header, then ``count`` chunks each applied on its
    own, then nothing. The formats differ only in their magic, their chunk bound and how one chunk is
    applied; the walk over the chunks is this one."""

    magic: bytes
    max_chunk: int
    apply_chunk: ChunkApplier

    def decode(
        self,
        old: BinaryIO,
        old_size: int,
        patch: BinaryIO,
        write: Callable[[bytes], object],
        *,
        max_size: int = DEFAULT_MAX_OUTPUT,
    ) -> int:
        """Apply ``patch`` to ``old``, handing the new image to ``write`` chunk by chunk; returns its size.

        The caller checks the result's hash (the container has none: the signed metadata holds it).
        """
        new_size, chunk, count = read_header(
            patch, self.magic, old_size=old_size, max_size=max_size, max_chunk=self.max_chunk
        )
        written = 0
        for _ in range(count):
            out_len = min(chunk, new_size - written)
            self.apply_chunk(old, old_size, patch, write, out_len)
            written += out_len
        if patch.read(1):
            raise IntegrityError("delta is malformed: trailing bytes after the last chunk")
        return written


def check_formats(formats: object, where: str) -> tuple[str, ...]:
    """A list of format names as configuration or a device gives it: known names, no repeats."""
    if isinstance(formats, str) or not isinstance(formats, list | tuple) or not formats:
        raise ValueError(f"{where}: expected a non-empty list of delta formats ({', '.join(FORMATS)})")
    names = tuple(str(f) for f in formats)
    unknown = [f for f in names if f not in FORMATS]
    if unknown or len(set(names)) != len(names):
        raise ValueError(
            f"{where}: {', '.join(unknown) or 'repeated names'}: delta formats are {', '.join(FORMATS)}"
        )
    return names


def readable_formats(reported: Iterable[object]) -> tuple[str, ...]:
    """The formats a device reads, preferred first, from what its inventory reported.

    Names this code does not know are left out; a device that reported none predates the report and
    reads FLDELTA1 only.
    """
    names = tuple(f for f in reported if isinstance(f, str) and f in FORMATS)
    return tuple(dict.fromkeys(names)) or (FLDELTA1,)
