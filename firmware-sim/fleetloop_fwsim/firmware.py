"""Firmware images for the simulated device, made of real binaries so deltas behave as they would.

A delta's size depends entirely on the bytes: random filler makes every delta as big as the image and
zeros make every delta tiny. Real firmware is mostly compiled code that changes a little between
releases, so an image here is a tar of ELF binaries found on this machine (a deterministic, sorted
selection), with per-version changes the way a release has them: a version file, a few binaries
"recompiled" (a few KiB rewritten), and one binary added. Two versions therefore share most bytes, and a
bsdiff4 delta between them is a few percent of the image, as on real devices.

The image format (header with version and hardware id) is the agent's: :mod:`fleetloop_agent.ota.image`.

An image may also change what the simulated machine does once booted (``behaviour``: a brake controller
that brakes harshly more often, ...). That is written where real firmware keeps such things — inside the
image, in its release file — so only the image a device booted decides it, and an OTA update, a fallback
or a rollback changes it exactly as it changes the firmware. :mod:`fleetloop_fwsim.vehicle` reads it.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import sys
import sysconfig
import tarfile
from pathlib import Path

from fleetloop_agent.ota.image import ImageInfo, image_info, pack_image
from fleetloop_shared.choices import check_choice
from fleetloop_shared.errors import IntegrityError, StateError, UserError
from fleetloop_shared.update.firmware_image import image_body

__all__ = ["BEHAVIOURS", "DEFAULT_BEHAVIOUR", "ImageInfo", "build_image", "image_info", "release_fields"]

#: What an image can make the simulated machine do (:mod:`fleetloop_fwsim.vehicle` says how).
DEFAULT_BEHAVIOUR = "default"
BEHAVIOURS = (DEFAULT_BEHAVIOUR, "harsh-braking")
#: The image's release file: ``KEY=value`` lines, the first member of the image's tar.
RELEASE_FILE = "etc/fleetloop-release"
#: Bytes of the release file read at most (it holds a few short lines).
_MAX_RELEASE_BYTES = 4096

#: Fixed tar metadata so that the same inputs always give the same bytes.
_MTIME = 1_700_000_000
#: Binaries "recompiled" in each version, and how many bytes of each change.
_CHANGED_FILES = 3
_CHANGED_BYTES = 4096
_ELF_MAGIC = b"\x7fELF"


def _binary_dirs() -> list[Path]:
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    dirs = [Path("/usr/bin"), Path("/usr/sbin")]
    if multiarch:
        dirs.append(Path("/usr/lib") / multiarch)
    dirs += [Path("/usr/lib64"), Path("/usr/lib")]
    return dirs


def _stdlib_extension_dir() -> Path:
    shared = sysconfig.get_config_var("DESTSHARED")
    if shared:
        return Path(shared)
    return (
        Path(sys.base_prefix)
        / "lib"
        / f"python{sys.version_info.major}.{sys.version_info.minor}"
        / "lib-dynload"
    )


def _regular_files(directory: Path, *, elf_only: bool) -> list[tuple[Path, int]]:
    found = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    for name in names:
        path = directory / name
        try:
            st = path.lstat()
            if not path.is_file() or path.is_symlink() or st.st_size == 0:
                continue
            if elf_only:
                with path.open("rb") as f:
                    if f.read(4) != _ELF_MAGIC:
                        continue
            elif not name.endswith((".so", ".pyd", ".dylib")):
                continue
        except OSError:
            continue
        found.append((path, st.st_size))
    return found


@functools.lru_cache(maxsize=1)
def _candidates() -> tuple[tuple[Path, int], ...]:
    """Real binaries on this machine, in a stable order, hard links and duplicates removed."""
    seen: set[tuple[int, int]] = set()
    out: list[tuple[Path, int]] = []
    sources = [(d, True) for d in _binary_dirs()] + [(_stdlib_extension_dir(), False)]
    for directory, elf_only in sources:
        for path, size in _regular_files(directory, elf_only=elf_only):
            try:
                st = path.stat()
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if key not in seen:
                seen.add(key)
                out.append((path, size))
    return tuple(out)


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()[:8], "little")


def _keystream(seed: int, n: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:n])


def _select(size_hint: int) -> tuple[list[Path], list[Path]]:
    """(files of the image, small files left over to add in a release) for this size."""
    lo, hi = 4096, max(64 * 1024, size_hint // 8)
    usable = [(p, s) for p, s in _candidates() if lo <= s <= hi]
    if not usable:
        usable = [(p, s) for p, s in _candidates() if s <= hi]
    if not usable:
        raise StateError("no binaries found on this machine to build a firmware image from")
    chosen: list[Path] = []
    total = 0
    for path, size in usable:
        if total >= size_hint:
            break
        chosen.append(path)
        total += size
    # a release adds small things; keep an added program under ~3 % of the image
    rest = [p for p, s in usable[len(chosen) :] if s <= max(lo, size_hint // 32)]
    return chosen, rest


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _recompiled(data: bytes, build: str, name: str) -> bytes:
    """``data`` with a few KiB rewritten, as a rebuild of the same program changes it."""
    if not data:
        return data
    n = min(_CHANGED_BYTES, max(1, len(data) // 4))
    offset = _seed(build, name, "offset") % max(1, len(data) - n)
    patch = _keystream(_seed(build, name, "bytes"), n)
    return data[:offset] + patch + data[offset + n :] + f"\nfleetloop-fw {build}\n".encode()


def build_image(
    version: str,
    hardware_id: str,
    *,
    size_hint: int = 4 * 1024 * 1024,
    variant: int = 0,
    behaviour: str = DEFAULT_BEHAVIOUR,
) -> bytes:
    """An image of about ``size_hint`` bytes; the same arguments give the same bytes on this machine.

    ``variant`` is another build of the same version (other binaries rebuilt, another one added): a
    different image, still a small delta away from every other build of the same size. ``behaviour``
    (one of :data:`BEHAVIOURS`) is what the machine does on this firmware; the default image's bytes are
    those of an image built without it.
    """
    check_choice(behaviour, BEHAVIOURS, "firmware behaviour", error=UserError)
    chosen, rest = _select(size_hint)
    build = f"{version}/{variant}"  # what a build's changes depend on
    picks = {_seed(build, "changed", i) % len(chosen) for i in range(_CHANGED_FILES)}
    release = f"VERSION={version}\nHARDWARE_ID={hardware_id}\nVARIANT={variant}\n"
    if behaviour != DEFAULT_BEHAVIOUR:
        release += f"BEHAVIOUR={behaviour}\n"
    files: list[tuple[str, bytes]] = [(RELEASE_FILE, release.encode())]
    for index, path in enumerate(chosen):
        data = _read(path)
        if index in picks:
            data = _recompiled(data, build, path.name)
        files.append((str(path).lstrip("/"), data))
    if rest:  # each release also ships one program the others do not (a new tool, a new library)
        added = rest[_seed(build, "added") % len(rest)]
        files.append(("opt/fleetloop/" + added.name, _read(added)))
    return pack_image(version, hardware_id, _tar(files))


def _tar(files: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = _MTIME
            info.mode = 0o755
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def release_fields(image: bytes) -> dict[str, str]:
    """The ``KEY=value`` lines of an image's release file; IntegrityError when the image or its body is
    not what :func:`build_image` makes (no header, not a tar, no release file first)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(image_body(image)), mode="r:") as tar:
            member = tar.next()
            if member is None or member.name != RELEASE_FILE or not member.isfile():
                raise IntegrityError(f"firmware image has no {RELEASE_FILE} first in its body")
            if member.size > _MAX_RELEASE_BYTES:
                raise IntegrityError(f"firmware image's {RELEASE_FILE} is {member.size} bytes, too large")
            f = tar.extractfile(member)
            raw = f.read() if f is not None else b""
    except (tarfile.TarError, EOFError) as exc:
        raise IntegrityError(f"firmware image body is not a tar: {exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise IntegrityError(f"firmware image's {RELEASE_FILE} is not UTF-8") from None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    return fields
