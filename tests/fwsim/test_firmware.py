"""Simulated firmware images: real binaries, deterministic, versions that differ like releases do."""

from __future__ import annotations

import contextlib
import io
import struct
import tarfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetloop_agent.ota.image import MAGIC, pack_image
from fleetloop_fwsim.firmware import ImageInfo, build_image, image_info
from fleetloop_shared.errors import IntegrityError
from fleetloop_shared.update.delta import apply_delta, make_delta

SIZE = 1024 * 1024


def _members(image: bytes) -> dict[str, bytes]:
    (header_len,) = struct.unpack_from("<I", image, len(MAGIC))
    body = image[len(MAGIC) + 4 + header_len :]
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        out = {}
        for m in tar.getmembers():
            f = tar.extractfile(m)
            assert f is not None
            out[m.name] = f.read()
        return out


@pytest.fixture(scope="module")
def v1() -> bytes:
    return build_image("1.0.0", "gen2", size_hint=SIZE)


@pytest.fixture(scope="module")
def v2() -> bytes:
    return build_image("2.0.0", "gen2", size_hint=SIZE)


def test_header_names_version_and_hardware(v1: bytes) -> None:
    assert image_info(v1) == ImageInfo(version="1.0.0", hardware_id="gen2")
    assert v1.startswith(MAGIC)


def test_same_arguments_same_bytes(v1: bytes) -> None:
    assert build_image("1.0.0", "gen2", size_hint=SIZE) == v1
    assert build_image("1.0.0", "gen2", size_hint=SIZE, variant=1) != v1
    assert build_image("1.0.0", "gen3", size_hint=SIZE) != v1


def test_image_is_a_tar_of_real_binaries_of_about_the_hinted_size(v1: bytes) -> None:
    assert SIZE <= len(v1) < 2 * SIZE
    members = _members(v1)
    binaries = [name for name, data in members.items() if data.startswith(b"\x7fELF")]
    assert len(binaries) >= 0.9 * (len(members) - 1), "expected real ELF binaries"
    assert members["etc/fleetloop-release"].startswith(b"VERSION=1.0.0\nHARDWARE_ID=gen2\n")


def test_versions_differ_in_a_few_files_like_a_release(v1: bytes, v2: bytes) -> None:
    old, new = _members(v1), _members(v2)
    changed = [n for n in old.keys() & new.keys() if old[n] != new[n]]
    added = new.keys() - old.keys()
    assert 2 <= len(changed) <= 7, changed  # release file + the few binaries each version rebuilt
    assert len(added) == 1 and next(iter(added)).startswith("opt/fleetloop/")
    same = sum(len(new[n]) for n in old.keys() & new.keys() if old[n] == new[n])
    assert same > 0.6 * len(v2)  # whole files; the bytes that differ inside them are few (see test_delta)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"ELF",
        MAGIC,
        MAGIC + b"\xff\xff\xff\xff",
        MAGIC + b"\x05\x00\x00\x00{bad}",
        MAGIC + b"\x02\x00\x00\x00[]",
        pack_image("1.0.0", "gen2", b"body")[:-1],
    ],
)
def test_non_images_raise_integrity_error(data: bytes) -> None:
    with pytest.raises(IntegrityError):
        image_info(data)


def test_truncated_image_is_detected(v1: bytes) -> None:
    with pytest.raises(IntegrityError, match="truncated"):
        image_info(v1[: len(v1) // 2])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_hostile_bytes_never_escape_the_error_tree(data: bytes) -> None:
    for candidate in (data, MAGIC + data):
        with contextlib.suppress(IntegrityError):
            image_info(candidate)


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40), st.binary(max_size=100))
def test_pack_and_read_round_trip(version: str, hardware_id: str, body: bytes) -> None:
    assert image_info(pack_image(version, hardware_id, body)) == ImageInfo(version, hardware_id)


def test_another_build_is_another_image_but_still_a_small_delta(v1: bytes) -> None:
    rebuilt = build_image("2.0.0", "gen2", size_hint=SIZE, variant=1)
    assert rebuilt != build_image("2.0.0", "gen2", size_hint=SIZE)
    assert image_info(rebuilt) == ImageInfo("2.0.0", "gen2")
    patch = make_delta(v1, rebuilt)
    assert len(patch) < 0.10 * len(rebuilt)
    assert apply_delta(v1, patch) == rebuilt
