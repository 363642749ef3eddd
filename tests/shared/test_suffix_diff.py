"""The suffix-array bsdiff kernel: streams that bsdiff4 applies exactly, as small as bsdiff4's own."""

from __future__ import annotations

import bz2
import random

import bsdiff4
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetloop_fwsim.code_image import image_pair
from fleetloop_shared.update import suffix_diff
from fleetloop_shared.update.delta import FLDELTA1, FLDELTA2, apply_delta, make_delta

pytestmark = pytest.mark.skipif(not suffix_diff.available(), reason="numba or pydivsufsort not installed")


def _apply(old: bytes, new_len: int, streams: tuple[bytes, bytes, bytes]) -> bytes:
    control, diff, extra = streams
    return bytes(bsdiff4.core.patch(old, new_len, control, diff, extra))


def _words(tuples: np.ndarray) -> bytes:
    """Signed ``(x, y, z)`` tuples as bsdiff's control stream (8-byte sign-magnitude words)."""
    values = tuples.reshape(-1).tolist()
    return b"".join((abs(v) | (1 << 63 if v < 0 else 0)).to_bytes(8, "little") for v in values)


@st.composite
def edited_pairs(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """An old buffer (random bytes, low-entropy runs or repeats) and a new one made from it by the edits
    firmware releases make: inserted, deleted, moved and duplicated blocks, and relocated pointers (a
    constant added to bytes at a stride)."""
    parts = draw(
        st.lists(
            st.one_of(
                st.binary(min_size=1, max_size=300),
                st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=4), st.integers(1, 200)),
            ),
            min_size=1,
            max_size=6,
        )
    )
    old = b"".join(parts)
    new = bytearray(old)
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["insert", "delete", "move", "copy", "relocate"]))
        a = draw(st.integers(0, len(new)))
        b = draw(st.integers(a, min(len(new), a + 200)))
        if kind == "insert":
            new[a:a] = draw(st.binary(max_size=60))
        elif kind == "delete":
            del new[a:b]
        elif kind in ("move", "copy"):
            block = bytes(new[a:b])
            if kind == "move":
                del new[a:b]
            at = draw(st.integers(0, len(new)))
            new[at:at] = block
        else:
            stride, delta = draw(st.integers(1, 16)), draw(st.integers(1, 255))
            for i in range(a, b, stride):
                new[i] = (new[i] + delta) & 0xFF
    return old, bytes(new)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=edited_pairs())
def test_streams_rebuild_the_new_buffer_exactly_through_bsdiff4(pair: tuple[bytes, bytes]) -> None:
    old, new = pair
    assert _apply(old, len(new), suffix_diff.diff(old, new)) == new


@pytest.mark.parametrize("accelerate", [True, False], ids=["kernel", "bsdiff4-fallback"])
@pytest.mark.parametrize("fmt", [FLDELTA2, FLDELTA1])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=edited_pairs())
def test_patches_from_both_paths_apply_exactly(fmt: str, accelerate: bool, pair: tuple[bytes, bytes]) -> None:
    """Small chunks (and FLDELTA1 margins), so one pair spans several chunks and chosen methods."""
    old, new = pair
    options = {"margin": 64} if fmt == FLDELTA1 else {}
    patch = make_delta(old, new, format=fmt, chunk=256, accelerate=accelerate, **options)
    assert apply_delta(old, patch) == new


@settings(max_examples=200, deadline=None)
@given(old=st.binary(min_size=1, max_size=500), new=st.binary(max_size=500))
def test_unrelated_buffers_round_trip(old: bytes, new: bytes) -> None:
    assert _apply(old, len(new), suffix_diff.diff(old, new)) == new


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"a", b""),
        (b"a", b"a"),
        (b"a", b"b"),
        (b"\x00" * 1000, b"\x00" * 999 + b"\x01"),
        (b"abc" * 500, b"abc" * 500),
        (b"xyz", b"xyz" * 100),
        (bytes(range(256)) * 4, bytes(range(255, -1, -1)) * 4),
    ],
)
def test_edge_cases_round_trip(old: bytes, new: bytes) -> None:
    assert _apply(old, len(new), suffix_diff.diff(old, new)) == new


def test_identical_input_is_one_all_zero_difference() -> None:
    data = random.Random(3).randbytes(50_000)
    control, diff, extra = suffix_diff.diff(data, data)
    assert len(control) == 24 and diff == bytes(len(data)) and extra == b""


@settings(max_examples=100, deadline=None)
@given(data=st.binary(min_size=1, max_size=400))
def test_suffix_array_is_the_sorted_suffixes(data: bytes) -> None:
    expected = sorted(range(len(data)), key=lambda i: data[i:])
    assert suffix_diff.suffix_array(data).tolist() == expected


def test_a_given_suffix_array_is_used_as_is() -> None:
    old = random.Random(5).randbytes(20_000)
    new = old[:5000] + b"inserted" + old[5000:]
    sa = suffix_diff.suffix_array(old)
    assert sa.dtype == np.int32
    assert suffix_diff.diff(old, new, sa) == suffix_diff.diff(old, new)


def test_empty_old_is_refused() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        suffix_diff.diff(b"", b"new")


@pytest.mark.parametrize("change", ["patch", "relocate", "grow"])
def test_streams_are_as_small_as_bsdiff4s_on_linked_code(change: str) -> None:
    """Same algorithm, same format: the compressed streams are within a few bytes of bsdiff4's."""
    v1, v2 = image_pair(change, size=512 << 10)
    ours = suffix_diff.diff(v1, v2)
    theirs = bsdiff4.core.diff(v1, v2)
    assert _apply(v1, len(v2), ours) == v2

    def size(streams: tuple[bytes, bytes, bytes]) -> int:
        return sum(len(bz2.compress(s, 9)) for s in streams)

    assert size(ours) <= 1.01 * size(theirs), (size(ours), size(theirs))


def test_a_suffix_array_of_the_wrong_shape_is_refused() -> None:
    """The kernel indexes without bounds checks, so a mismatched array never reaches it."""
    sa = suffix_diff.suffix_array(b"abcdef")
    with pytest.raises(ValueError, match="suffix array"):
        suffix_diff.diff(b"abcdefg", b"abc", sa)
    with pytest.raises(ValueError, match="suffix array"):
        suffix_diff.diff(b"abcdef", b"abc", sa.astype(np.int64))


def test_one_index_serves_every_chunk_and_matches_the_one_shot_diff() -> None:
    """The whole-image index is built once; diffing a chunk against it gives bsdiff's tuples (signed,
    whole-image offsets) and the same streams as the one-shot diff."""
    old, new = image_pair("reorder", size=256 << 10)
    index = suffix_diff.OldIndex(old)
    tuples, diff, extra = suffix_diff.diff_tuples(index, new)
    control, diff1, extra1 = suffix_diff.diff(old, new)
    assert (diff, extra) == (diff1, extra1)
    assert tuples.tolist() == suffix_diff.control_tuples(control).tolist()
    for start in range(0, len(new), 64 << 10):  # chunk by chunk against the same index
        part = new[start : start + (64 << 10)]
        t, d, e = suffix_diff.diff_tuples(index, part)
        rebuilt = _apply(old, len(part), (_words(t), d, e))
        assert rebuilt == part
    with pytest.raises(ValueError, match="whole number of tuples"):
        suffix_diff.control_tuples(b"\x00" * 23)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=edited_pairs())
def test_anchored_tuples_rebuild_the_new_buffer_exactly(pair: tuple[bytes, bytes]) -> None:
    """The anchor table's search finds *a* match, not the longest; its tuples still rebuild the buffer."""
    old, new = pair
    tuples, diff, extra = suffix_diff.diff_tuples(suffix_diff.AnchorIndex(old), new)
    assert _apply(old, len(new), (_words(tuples), diff, extra)) == new


@pytest.mark.parametrize("kind", ["reorder", "grow", "shrink"])
def test_anchored_search_finds_moved_code_about_as_well_as_the_suffix_array(kind: str) -> None:
    """Estimates from the anchor table leave at most a third more bytes unmatched (extra) than the suffix
    array's search (the same on moved code; more where short matches matter), and copy most of the new
    image from the old one."""
    old, new = image_pair(kind, size=256 << 10)
    _, _, extra_sa = suffix_diff.diff_tuples(suffix_diff.OldIndex(old), new)
    tuples, _, extra = suffix_diff.diff_tuples(suffix_diff.AnchorIndex(old), new)
    assert len(extra) <= len(extra_sa) * 4 // 3 + 1024
    assert len(extra) < len(new) // 4  # most of the new image is found in the old one
    assert int(tuples[:, 0].sum()) > len(new) // 2


def test_an_anchor_index_refuses_what_it_cannot_hold() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        suffix_diff.AnchorIndex(b"")
    short = suffix_diff.AnchorIndex(b"abc")  # shorter than an anchor: nothing found, still correct
    tuples, diff, extra = suffix_diff.diff_tuples(short, b"abcabc")
    assert _apply(b"abc", 6, (_words(tuples), diff, extra)) == b"abcabc"
