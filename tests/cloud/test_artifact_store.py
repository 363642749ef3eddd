"""Artifact store: content addressing, deltas smaller than full images, signing, version order, paths."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fleetloop_cloud.ota.artifact_store import ArtifactStore, ReleaseInput, version_key
from fleetloop_cloud.storage import LocalObjectStore, MemoryObjectStore
from fleetloop_shared.errors import IntegrityError, NotFoundError, StateError, UserError
from fleetloop_shared.update.artifact import ReleaseSigner, manifest_from_bytes, sha256_hex, verify_manifest
from fleetloop_shared.update.delta import apply_delta

SIGNER = ReleaseSigner.generate()


def firmware(version: int, size: int = 256 * 1024) -> bytes:
    """A generated image: structured (compressible-ish, like code) and v2 differs from v1 in a few places."""
    rng = np.random.default_rng(7)
    words = rng.integers(0, 4096, size // 4, dtype=np.uint32) * 16 + 0x1000
    image = bytearray(words.tobytes())
    image[:32] = f"FWIMG version={version}.0.0 ".encode().ljust(32, b"\0")
    if version >= 2:
        for pos in range(4096, len(image), 40_000):  # a handful of patched regions
            image[pos : pos + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
        image += b"new module " * 200
    return bytes(image)


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(LocalObjectStore(tmp_path / "artifacts"), SIGNER, validity_days=30)


def test_release_with_delta_from_installed_image(store: ArtifactStore, tmp_path: Path) -> None:
    v1, v2 = firmware(1), firmware(2)
    base_sha = store.add_image(v1)
    assert base_sha == sha256_hex(v1)
    manifest_bytes, signature = store.add_release(
        ReleaseInput(v2, name="fw", version="2.0.0", hardware_id="sim-a", bases=[v1, v1, v2], now=1_000_000.0)
    )
    m = verify_manifest(
        manifest_bytes, signature, [SIGNER.public_key_pem()], now_unix=1_000_001, hardware_id="sim-a"
    )
    assert m == manifest_from_bytes(manifest_bytes)
    assert (m.name, m.version, m.target_sha256, m.target_size) == ("fw", "2.0.0", sha256_hex(v2), len(v2))
    assert m.expires_unix - m.created_unix == 30 * 86400
    kinds = sorted(p.kind for p in m.payloads)
    assert kinds == ["delta", "full"]  # duplicates and the image itself give no extra delta
    delta = m.payload_for(base_sha)
    assert delta.kind == "delta" and delta.base_sha256 == base_sha and delta.algorithm == "fldelta2"
    assert delta.size < len(v2) // 10
    patch = store.file(delta.path).data()
    assert apply_delta(v1, patch) == v2
    full = m.payload_for("ff" * 32)
    assert full.kind == "full" and store.file(full.path).data() == v2
    # Content addressing: every stored file is named by the hash of its bytes.
    files = sorted((tmp_path / "artifacts" / "files").iterdir())
    assert files and all(f.name == sha256_hex(f.read_bytes()) for f in files)
    assert {f.name for f in files} == {sha256_hex(v1), sha256_hex(v2), delta.sha256}
    assert store.release("fw", "sim-a", "2.0.0") == (manifest_bytes, signature)


def test_a_base_gets_a_delta_in_each_format_its_devices_prefer(store: ArtifactStore) -> None:
    v1, other, v2 = firmware(1), firmware(3), firmware(2)
    formats = {sha256_hex(v1): {"fldelta1", "fldelta2"}, sha256_hex(other): {"fldelta1"}}
    manifest_bytes, _ = store.add_release(
        ReleaseInput(
            v2,
            name="fw",
            version="2.0.0",
            hardware_id="sim-a",
            bases=[v1, other],
            now=1.0,
            base_formats=formats,
        )
    )
    m = manifest_from_bytes(manifest_bytes)
    deltas = sorted((p.base_sha256 == sha256_hex(v1), p.algorithm) for p in m.payloads if p.kind == "delta")
    assert deltas == [(False, "fldelta1"), (True, "fldelta1"), (True, "fldelta2")]
    for p in m.payloads:
        if p.kind == "delta":
            base = v1 if p.base_sha256 == sha256_hex(v1) else other
            patch = store.file(p.path).data()
            assert patch.startswith(p.algorithm.upper().encode()) and apply_delta(base, patch) == v2


def test_same_bytes_are_stored_once(store: ArtifactStore, tmp_path: Path) -> None:
    a = store.add_image(b"identical bytes")
    b = store.add_image(b"identical bytes")
    assert a == b
    assert len(list((tmp_path / "artifacts" / "files").iterdir())) == 1
    assert store.image(a) == b"identical bytes"


def test_a_delta_no_smaller_than_the_image_is_not_kept(store: ArtifactStore) -> None:
    unrelated = os.urandom(20_000)
    image = os.urandom(20_000)
    manifest_bytes, _ = store.add_release(
        ReleaseInput(image, name="fw", version="1.0.0", hardware_id="sim-a", bases=[unrelated], now=0.0)
    )
    m = manifest_from_bytes(manifest_bytes)
    assert [p.kind for p in m.payloads] == ["full"]
    assert store.image(sha256_hex(unrelated)) == unrelated  # the base is still kept for later releases


def test_versions_only_move_forward(store: ArtifactStore) -> None:
    store.add_release(
        ReleaseInput(b"v2" * 100, name="fw", version="2.0.0", hardware_id="sim-a", bases=[], now=0.0)
    )
    with pytest.raises(StateError, match="already exists"):
        store.add_release(
            ReleaseInput(b"v2b" * 100, name="fw", version="2.0", hardware_id="sim-a", bases=[], now=0.0)
        )
    with pytest.raises(StateError, match="not newer"):
        store.add_release(
            ReleaseInput(b"v19" * 100, name="fw", version="1.9.9", hardware_id="sim-a", bases=[], now=0.0)
        )
    # numeric, not string, comparison: 10 > 9
    store.add_release(
        ReleaseInput(b"v9" * 100, name="fw", version="9.0.0", hardware_id="sim-a", bases=[], now=0.0)
    )
    store.add_release(
        ReleaseInput(b"v10" * 100, name="fw", version="10.0.0", hardware_id="sim-a", bases=[], now=0.0)
    )
    # other hardware and other names have their own sequence
    store.add_release(
        ReleaseInput(b"b1" * 100, name="fw", version="1.0.0", hardware_id="sim-b", bases=[], now=0.0)
    )
    store.add_release(
        ReleaseInput(b"m1" * 100, name="model", version="1.0.0", hardware_id="sim-a", bases=[], now=0.0)
    )
    assert store.versions("fw", "sim-a") == ["2.0.0", "9.0.0", "10.0.0"]
    assert version_key("1.10.0") > version_key("1.9.2")


@pytest.mark.parametrize("version", ["v2", "2.0.0-rc1", "", "1..2", "2.0.", "x"])
def test_bad_versions_are_user_errors(store: ArtifactStore, version: str) -> None:
    with pytest.raises(UserError, match="version"):
        store.add_release(
            ReleaseInput(b"img", name="fw", version=version, hardware_id="sim-a", bases=[], now=0.0)
        )


@pytest.mark.parametrize(
    ("name", "hardware"), [("../escape", "sim-a"), ("fw", "../../etc"), ("fw/x", "sim-a"), ("fw", "")]
)
def test_names_that_would_escape_the_store_are_refused(
    store: ArtifactStore, name: str, hardware: str
) -> None:
    with pytest.raises(UserError):
        store.add_release(
            ReleaseInput(b"img", name=name, version="1.0.0", hardware_id=hardware, bases=[], now=0.0)
        )


def test_empty_image_is_refused(store: ArtifactStore) -> None:
    with pytest.raises(UserError, match="empty"):
        store.add_release(
            ReleaseInput(b"", name="fw", version="1.0.0", hardware_id="sim-a", bases=[], now=0.0)
        )


def test_file_refuses_anything_but_stored_files(store: ArtifactStore, tmp_path: Path) -> None:
    sha = store.add_image(b"an image")
    found = store.file(f"files/{sha}")
    assert (found.size, found.read(3, 100), found.read(0, 2)) == (8, b"image", b"an")
    (tmp_path / "secret.pem").write_text("KEY")
    for bad in [
        "../secret.pem",
        "files/../../secret.pem",
        f"files/{sha}/..",
        f"files/{sha.upper()}",
        f"/files/{sha}",
        f"files/{sha}\n",
        "files/" + "0" * 64,
        "releases/fw/sim-a/1.0.0.sig",
        "files/",
        f"files//{sha}",
        f"files/{sha}?x=1",
    ]:
        with pytest.raises(NotFoundError):
            store.file(bad)


def test_missing_and_corrupt_images(store: ArtifactStore, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        store.image("ab" * 32)
    with pytest.raises(NotFoundError):
        store.image("../../etc/passwd")
    sha = store.add_image(b"good bytes")
    (tmp_path / "artifacts" / "files" / sha).write_bytes(b"bad bytes!")
    with pytest.raises(IntegrityError, match="corrupt"):
        store.image(sha)


def test_validity_days_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(UserError):
        ArtifactStore(MemoryObjectStore(), SIGNER, validity_days=0)
