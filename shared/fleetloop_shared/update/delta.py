"""Binary deltas between firmware images: make one in a format the device reads, apply any it reads.

Two container formats exist. **FLDELTA2** (:mod:`~fleetloop_shared.update.fldelta2`, the default)
matches the new image against the whole old image and applies in bounded memory by reading the old slot
at any offset; **FLDELTA1** (:mod:`~fleetloop_shared.update.fldelta1`) diffs each chunk against a window
of the old image and is still made for devices whose agent reads only it. A patch names its format in
its first eight bytes; :func:`apply_delta_stream` reads that and refuses a format the caller does not
accept (a device configured to read only FLDELTA1 behaves as an older agent would).

The functions here are the files-and-bytes shell around the two codecs: ``*_file`` write beside the
target and rename (the output appears only complete), ``make_delta`` / ``apply_delta`` work in memory.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from fleetloop_shared.errors import IntegrityError, NotFoundError, UserError
from fleetloop_shared.update import fldelta1, fldelta2_apply
from fleetloop_shared.update.delta_format import (
    DEFAULT_MAX_OUTPUT,
    FLDELTA1,
    FLDELTA2,
    FORMATS,
    MAGICS,
    DeltaStats,
)

__all__ = [
    "DEFAULT_MAX_OUTPUT",
    "FLDELTA1",
    "FLDELTA2",
    "FORMATS",
    "DeltaStats",
    "apply_delta",
    "apply_delta_file",
    "apply_delta_stream",
    "delta_format",
    "make_delta",
    "make_delta_file",
]


def delta_format(head: bytes) -> str | None:
    """The format a patch starting with ``head`` is in, or None when it is none of ours."""
    return MAGICS.get(bytes(head[:8]))


def _make(
    old: BinaryIO, old_size: int, new: BinaryIO, new_size: int, out: BinaryIO, fmt: str, **options: Any
) -> DeltaStats:
    """Encode in ``fmt``; ``options`` are the encoder's (``accelerate``, ``chunk``; FLDELTA1 ``margin``)."""
    if fmt == FLDELTA2:
        from fleetloop_shared.update import fldelta2  # the cloud's side: numpy, numba, suffix arrays

        if "margin" in options:
            raise UserError("FLDELTA2 searches the whole old image: it takes no margin")
        data = old.read()
        if len(data) != old_size:
            raise IntegrityError("the old image changed size while the delta was being made")
        return fldelta2.encode(data, new, new_size, out, **options)
    if fmt == FLDELTA1:
        return fldelta1.encode(old, old_size, new, new_size, out, **options)
    raise UserError(f"unknown delta format {fmt!r}; known: {', '.join(FORMATS)}")


def make_delta(old: bytes, new: bytes, *, format: str = FLDELTA2, **options: Any) -> bytes:
    """The delta turning ``old`` into ``new``, in memory (``options``: see :func:`make_delta_file`)."""
    out = io.BytesIO()
    _make(io.BytesIO(old), len(old), io.BytesIO(new), len(new), out, format, **options)
    return out.getvalue()


@contextmanager
def _beside(out: Path) -> Iterator[BinaryIO]:
    """A temporary file next to ``out``, fsynced and renamed onto it only if the block succeeds."""
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    try:
        with os.fdopen(fd, "wb") as fo:
            yield fo
            fo.flush()
            os.fsync(fo.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _open(path: Path) -> BinaryIO:
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise NotFoundError(f"{path}: no such file") from None


def make_delta_file(old: Path, new: Path, out: Path, *, format: str = FLDELTA2, **options: Any) -> DeltaStats:
    """File to file; ``out`` appears only complete.

    ``options``: ``accelerate=False`` searches with ``bsdiff4.core.diff`` even where the suffix_diff
    kernel could run; ``chunk`` is the output chunk size; FLDELTA1 also takes ``margin`` (its window).
    """
    with _open(old) as fa, _open(new) as fb, _beside(out) as fo:
        old_size, new_size = os.fstat(fa.fileno()).st_size, os.fstat(fb.fileno()).st_size
        return _make(fa, old_size, fb, new_size, fo, format, **options)


def apply_delta_stream(
    old: BinaryIO,
    old_size: int,
    patch: BinaryIO,
    write: Callable[[bytes], object],
    *,
    max_size: int = DEFAULT_MAX_OUTPUT,
    formats: Collection[str] = FORMATS,
) -> int:
    """Apply ``patch`` (any format in ``formats``) to ``old``, handing the new image to ``write`` piece by
    piece; returns its size. IntegrityError("delta is malformed: ...") on garbage; the caller checks the
    result's hash (the signed metadata holds it)."""
    head = patch.read(8)
    fmt = delta_format(head)
    if fmt is None:
        raise IntegrityError("delta is malformed: not a delta this device reads (bad magic)")
    if fmt not in formats:
        raise IntegrityError(f"delta is in format {fmt}; this device reads {', '.join(formats)}")
    patch.seek(-len(head), io.SEEK_CUR)
    reader = fldelta2_apply.READER if fmt == FLDELTA2 else fldelta1.READER
    return reader.decode(old, old_size, patch, write, max_size=max_size)


def apply_delta(
    old: bytes, patch: bytes, *, max_size: int = DEFAULT_MAX_OUTPUT, formats: Collection[str] = FORMATS
) -> bytes:
    """``old`` with ``patch`` applied (in memory)."""
    out = io.BytesIO()
    apply_delta_stream(
        io.BytesIO(old), len(old), io.BytesIO(patch), out.write, max_size=max_size, formats=formats
    )
    return out.getvalue()


def apply_delta_file(
    old: Path,
    patch: Path,
    out: Path,
    *,
    max_size: int = DEFAULT_MAX_OUTPUT,
    formats: Collection[str] = FORMATS,
) -> int:
    """File to file, the same streaming code the device runs; ``out`` appears only complete."""
    with _open(old) as fa, _open(patch) as fp, _beside(out) as fo:
        size = os.fstat(fa.fileno()).st_size
        return apply_delta_stream(fa, size, fp, fo.write, max_size=max_size, formats=formats)
