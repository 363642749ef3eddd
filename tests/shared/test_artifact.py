"""Signed release manifests: canonical bytes, signature, expiry, hardware, hostile input."""

from __future__ import annotations

import contextlib
import json
import stat
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetloop_shared.errors import (
    ArtifactVerificationError,
    ConfigError,
    MalformedMessageError,
    NotFoundError,
)
from fleetloop_shared.update.artifact import (
    PayloadRef,
    ReleaseManifest,
    ReleaseSigner,
    manifest_from_bytes,
    manifest_to_bytes,
    sha256_file,
    sha256_hex,
    verify_manifest,
)

NOW = 1_750_000_000
OLD_IMAGE = b"old firmware image bytes" * 100
NEW_IMAGE = b"new firmware image bytes" * 100


def _manifest(**changes: object) -> ReleaseManifest:
    full = PayloadRef(
        "full", "none", f"files/{sha256_hex(NEW_IMAGE)}", sha256_hex(NEW_IMAGE), len(NEW_IMAGE), None
    )
    delta = PayloadRef("delta", "fldelta1", "files/delta-1", "ab" * 32, 123, sha256_hex(OLD_IMAGE))
    m = ReleaseManifest(
        name="gateway-fw",
        version="2.0.0",
        hardware_id="gen2",
        target_sha256=sha256_hex(NEW_IMAGE),
        target_size=len(NEW_IMAGE),
        payloads=(full, delta),
        created_unix=NOW - 60,
        expires_unix=NOW + 86400,
    )
    return replace(m, **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def signer() -> ReleaseSigner:
    return ReleaseSigner.generate()


def test_sign_and_verify_round_trip(signer: ReleaseSigner) -> None:
    m = _manifest()
    data = manifest_to_bytes(m)
    got = verify_manifest(
        data, signer.sign(data), [signer.public_key_pem()], now_unix=NOW, hardware_id="gen2"
    )
    assert got == m


def test_canonical_bytes_are_sorted_compact_and_stable() -> None:
    data = manifest_to_bytes(_manifest())
    assert b" " not in data and b"\n" not in data
    doc = json.loads(data)
    assert list(doc) == sorted(doc)
    assert manifest_to_bytes(manifest_from_bytes(data)) == data


def test_any_flipped_byte_breaks_the_signature(signer: ReleaseSigner) -> None:
    data = manifest_to_bytes(_manifest())
    sig = signer.sign(data)
    for i in range(0, len(data), max(1, len(data) // 40)):
        tampered = bytearray(data)
        tampered[i] ^= 0x01
        with pytest.raises(ArtifactVerificationError, match="signature does not verify"):
            verify_manifest(bytes(tampered), sig, [signer.public_key_pem()], now_unix=NOW, hardware_id="gen2")


def test_a_changed_field_with_the_old_signature_is_refused(signer: ReleaseSigner) -> None:
    good = manifest_to_bytes(_manifest())
    evil = manifest_to_bytes(_manifest(hardware_id="gen2", version="9.9.9"))
    with pytest.raises(ArtifactVerificationError, match="signature does not verify"):
        verify_manifest(evil, signer.sign(good), [signer.public_key_pem()], now_unix=NOW, hardware_id="gen2")


def test_wrong_key_is_refused_and_any_trusted_key_is_enough(signer: ReleaseSigner) -> None:
    other = ReleaseSigner.generate()
    data = manifest_to_bytes(_manifest())
    with pytest.raises(ArtifactVerificationError, match="any trusted release key"):
        verify_manifest(data, other.sign(data), [signer.public_key_pem()], now_unix=NOW, hardware_id="gen2")
    keys = [signer.public_key_pem(), other.public_key_pem()]
    assert verify_manifest(data, other.sign(data), keys, now_unix=NOW, hardware_id="gen2").version == "2.0.0"


def test_truncated_or_empty_signature_is_refused(signer: ReleaseSigner) -> None:
    data = manifest_to_bytes(_manifest())
    for sig in (b"", signer.sign(data)[:-1], signer.sign(data) + b"\x00"):
        with pytest.raises(ArtifactVerificationError):
            verify_manifest(data, sig, [signer.public_key_pem()], now_unix=NOW, hardware_id="gen2")


def test_expired_manifest_is_refused(signer: ReleaseSigner) -> None:
    m = _manifest(expires_unix=NOW)
    data = manifest_to_bytes(m)
    with pytest.raises(ArtifactVerificationError, match=f"manifest expired at {NOW}"):
        verify_manifest(data, signer.sign(data), [signer.public_key_pem()], now_unix=NOW, hardware_id="gen2")
    assert verify_manifest(
        data, signer.sign(data), [signer.public_key_pem()], now_unix=NOW - 1, hardware_id="gen2"
    )


def test_other_hardware_is_refused(signer: ReleaseSigner) -> None:
    data = manifest_to_bytes(_manifest())
    with pytest.raises(ArtifactVerificationError, match="manifest is for hardware gen2, this device is gen1"):
        verify_manifest(data, signer.sign(data), [signer.public_key_pem()], now_unix=NOW, hardware_id="gen1")


def test_bad_trusted_keys_are_config_errors(signer: ReleaseSigner) -> None:
    data = manifest_to_bytes(_manifest())
    sig = signer.sign(data)
    with pytest.raises(ConfigError, match="no trusted release keys"):
        verify_manifest(data, sig, [], now_unix=NOW, hardware_id="gen2")
    with pytest.raises(ConfigError, match="not a PEM public key"):
        verify_manifest(data, sig, [b"hello"], now_unix=NOW, hardware_id="gen2")
    ec_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ConfigError, match="expected an Ed25519 key"):
        verify_manifest(data, sig, [ec_pem], now_unix=NOW, hardware_id="gen2")


def test_payload_for_prefers_the_matching_delta() -> None:
    m = _manifest()
    assert m.payload_for(sha256_hex(OLD_IMAGE)).kind == "delta"
    assert m.payload_for("cd" * 32).kind == "full"
    delta_only = _manifest(payloads=(m.payloads[1],))
    assert delta_only.payload_for(sha256_hex(OLD_IMAGE)).kind == "delta"
    with pytest.raises(ArtifactVerificationError, match="no full image"):
        delta_only.payload_for("cd" * 32)


def _doc() -> dict[str, object]:
    result: dict[str, object] = json.loads(manifest_to_bytes(_manifest()))
    return result


def _bytes(doc: object) -> bytes:
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("version"), "missing field 'version'"),
        (lambda d: d.update(extra=1), "unknown field 'extra'"),
        (lambda d: d.update(schema="other"), "schema"),
        (lambda d: d.update(target_sha256="XYZ"), "'target_sha256' must be 64 lowercase hex"),
        (lambda d: d.update(target_size=True), "'target_size' must be a non-negative"),
        (lambda d: d.update(target_size=-1), "'target_size' must be a non-negative"),
        (lambda d: d.update(version=""), "'version' must be a non-empty"),
        (lambda d: d.update(payloads=[]), "'payloads' must be a non-empty list"),
        (lambda d: d.update(expires_unix=1), "expires_unix is before created_unix"),
        (lambda d: d["payloads"][0].update(kind="zip"), r"payloads\[0\]: kind 'zip'"),
        (lambda d: d["payloads"][0].update(algorithm="fldelta1"), "full payload needs algorithm 'none'"),
        (lambda d: d["payloads"][0].update(path="../../etc/passwd"), "must be a relative path"),
        (lambda d: d["payloads"][0].update(path="http://evil/x"), "must be a relative path"),
        (lambda d: d["payloads"][0].update(size=1), "the full payload is not the target image"),
        (lambda d: d["payloads"][1].update(base_sha256=None), r"payloads\[1\]: 'base_sha256' must be 64"),
        (lambda d: d["payloads"].append(dict(d["payloads"][1])), "two deltas from the same base"),
    ],
)
def test_malformed_manifests_say_what_is_wrong(mutate: object, message: str) -> None:
    doc = _doc()
    mutate(doc)  # type: ignore[operator]
    with pytest.raises(MalformedMessageError, match=message):
        manifest_from_bytes(_bytes(doc))


@pytest.mark.parametrize(
    "data", [b"", b"not json", b"[1,2]", b'{"a":', "é".encode("latin-1"), b"[" * 100_000]
)
def test_non_manifests_are_malformed(data: bytes) -> None:
    with pytest.raises(MalformedMessageError):
        manifest_from_bytes(data)


def test_oversized_manifest_is_refused_before_parsing() -> None:
    with pytest.raises(MalformedMessageError, match="more than"):
        manifest_from_bytes(b" " * (300 * 1024))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_hostile_bytes_never_escape_the_error_tree(data: bytes) -> None:
    with contextlib.suppress(MalformedMessageError):
        manifest_from_bytes(data)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_mutated_json_values_never_escape_the_error_tree(data: st.DataObject) -> None:
    doc = _doc()
    key = data.draw(st.sampled_from(sorted(doc)))
    junk = st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=80), st.lists(st.integers())
    )
    doc[key] = data.draw(junk)
    with contextlib.suppress(MalformedMessageError):
        manifest_from_bytes(_bytes(doc))


def test_signer_saves_owner_only_and_loads_back(tmp_path: Path, signer: ReleaseSigner) -> None:
    path = tmp_path / "release.pem"
    signer.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = ReleaseSigner.load(path)
    assert loaded.public_key_pem() == signer.public_key_pem()
    data = manifest_to_bytes(_manifest())
    assert verify_manifest(
        data, loaded.sign(data), [signer.public_key_pem()], now_unix=NOW, hardware_id="gen2"
    )


def test_signer_load_errors_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read release key"):
        ReleaseSigner.load(tmp_path / "missing.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match="not an unencrypted PEM private key"):
        ReleaseSigner.load(junk)
    ec_path = tmp_path / "ec.pem"
    ec_path.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(ConfigError, match="expected an Ed25519 key"):
        ReleaseSigner.load(ec_path)


def test_sha256_file_matches_sha256_hex(tmp_path: Path) -> None:
    data = bytes(range(256)) * 9000  # crosses the 1 MiB read size
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == sha256_hex(data)
    assert sha256_hex(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    with pytest.raises(NotFoundError):
        sha256_file(tmp_path / "absent")
