"""bsdiff4 deltas: small between real firmware versions, exact, and safe on hostile patches."""

from __future__ import annotations

import bz2
import contextlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetloop_fwsim.firmware import build_image
from fleetloop_shared.delta import DELTA_ALGORITHM, apply_delta, make_delta
from fleetloop_shared.errors import IntegrityError


@pytest.fixture(scope="module")
def images() -> tuple[bytes, bytes]:
    return build_image("1.0.0", "gen2"), build_image("2.0.0", "gen2")


@pytest.fixture(scope="module")
def real_patch(images: tuple[bytes, bytes]) -> bytes:
    return make_delta(*images)


def test_delta_between_real_firmware_versions_is_small_and_exact(
    images: tuple[bytes, bytes], real_patch: bytes
) -> None:
    v1, v2 = images
    assert v1 != v2 and len(v2) > 3 * 1024 * 1024
    assert len(real_patch) < 0.10 * len(v2), f"delta is {len(real_patch)} of {len(v2)} bytes"
    assert apply_delta(v1, real_patch) == v2
    assert DELTA_ALGORITHM == "bsdiff4"


def test_delta_on_the_wrong_base_does_not_give_the_target(
    images: tuple[bytes, bytes], real_patch: bytes
) -> None:
    v1, v2 = images
    other_base = build_image("1.0.0", "gen2", variant=3, size_hint=len(v1))
    try:
        out = apply_delta(other_base, real_patch)
    except IntegrityError:
        return
    assert out != v2  # callers catch this with the target hash


def test_small_inputs_round_trip() -> None:
    for old, new in [(b"", b"abc"), (b"abc", b""), (b"hello world", b"hello brave new world")]:
        assert apply_delta(old, make_delta(old, new)) == new


@pytest.mark.parametrize(
    "patch",
    [b"", b"garbage", b"BSDIFF40", b"BSDIFF40" + b"\x00" * 24, b"BSDIFF40" + b"\xff" * 40, b"\x00" * 64],
)
def test_garbage_patches_raise_integrity_error(patch: bytes) -> None:
    with pytest.raises(IntegrityError, match="delta is malformed"):
        apply_delta(b"some base bytes", patch)


def test_truncated_real_patch_raises_integrity_error(images: tuple[bytes, bytes], real_patch: bytes) -> None:
    for cut in (len(real_patch) // 3, len(real_patch) - 10):
        with pytest.raises(IntegrityError, match="delta is malformed"):
            apply_delta(images[0], real_patch[:cut])


def _offout(value: int) -> bytes:
    raw = abs(value).to_bytes(8, "little")
    return raw[:7] + bytes([raw[7] | (0x80 if value < 0 else 0)])


def _patch(out_size: int, control: bytes, diff: bytes, extra: bytes) -> bytes:
    c, d, e = bz2.compress(control), bz2.compress(diff), bz2.compress(extra)
    return b"BSDIFF40" + _offout(len(c)) + _offout(len(d)) + _offout(out_size) + c + d + e


def test_a_patch_claiming_a_huge_output_is_refused_before_allocating() -> None:
    patch = _patch(1 << 40, b"", b"", b"")
    with pytest.raises(IntegrityError, match="exceeds the limit"):
        apply_delta(b"x", patch)
    with pytest.raises(IntegrityError, match="exceeds the limit"):
        apply_delta(b"x", _patch(2000, b"", b"", b""), max_size=1000)


def test_a_bzip2_bomb_in_the_diff_block_is_refused() -> None:
    bomb = _patch(10, struct.pack("<qqq", 10, 0, 0), b"\x00" * 5_000_000, b"")
    assert len(bomb) < 1000
    with pytest.raises(IntegrityError, match="expands past"):
        apply_delta(b"0123456789", bomb)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_random_bytes_never_escape_the_error_tree(data: bytes) -> None:
    for patch in (data, b"BSDIFF40" + data):
        with contextlib.suppress(IntegrityError):
            apply_delta(b"base image bytes" * 10, patch)


_tuple = st.tuples(st.integers(-(2**20), 2**20), st.integers(-(2**20), 2**20), st.integers(-(2**40), 2**40))


@settings(max_examples=300, deadline=None)
@given(
    out_size=st.integers(0, 4096),
    controls=st.lists(_tuple, max_size=6),
    diff=st.binary(max_size=200),
    extra=st.binary(max_size=200),
)
def test_well_formed_but_hostile_control_blocks_never_crash(
    out_size: int, controls: list[tuple[int, int, int]], diff: bytes, extra: bytes
) -> None:
    control = b"".join(_offout(x) + _offout(y) + _offout(z) for x, y, z in controls)
    try:
        out = apply_delta(b"the old image" * 20, _patch(out_size, control, diff, extra))
    except IntegrityError:
        return
    assert len(out) == out_size


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_bit_flipped_real_patches_never_escape_the_error_tree(data: st.DataObject) -> None:
    old = b"firmware v1 " * 300
    new = b"firmware v2 " * 280 + b"new feature" * 30
    patch = bytearray(make_delta(old, new))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(patch) - 1))
        patch[i] ^= 1 << data.draw(st.integers(0, 7))
    with contextlib.suppress(IntegrityError):
        apply_delta(old, bytes(patch))
