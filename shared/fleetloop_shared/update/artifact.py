"""Signed release manifests: what an update is, which bytes make it, and who vouches for it.

A release manifest names one firmware image (version, hardware id, the image's sha256 and size) and the
payloads a device may download to build it: the full image, and deltas, each valid only on top of one
installed image (its ``base_sha256``). The cloud signs the manifest's canonical bytes with an Ed25519
release key; the device verifies the signature against the keys it trusts *before* it believes a single
field, then refuses manifests that expired (freeze attacks) or were made for other hardware.

Devices trust TUF metadata instead (``fleetloop_shared.update.tuf_metadata``: an image repository with
threshold roots beside a per-device director, verified by python-tuf's ngclient). The manifest stays as
the cloud's own record of a release (the rollout controller offers it) and as the *plan* the agent
journals after TUF verified it; :func:`verify_manifest` remains for that record, not for device trust.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fleetloop_shared.durable import write_atomically
from fleetloop_shared.errors import (
    ArtifactVerificationError,
    ConfigError,
    MalformedMessageError,
    NotFoundError,
)
from fleetloop_shared.update.delta_format import FORMATS

#: Marks the JSON as a fleetloop release manifest of this layout; a different layout is refused.
MANIFEST_SCHEMA = "fleetloop.release.v1"
#: Manifests are small; anything larger is refused before parsing (hostile-input bound).
MAX_MANIFEST_BYTES = 256 * 1024
#: A release offers at most this many payloads (one full image plus deltas from installed versions).
MAX_PAYLOADS = 64
PAYLOAD_KINDS = ("full", "delta")
INSTALL_MODES = ("slot", "swap")
#: Algorithms per payload kind: a full payload is the image itself, a delta is an FLDELTA2 or FLDELTA1
#: container (:mod:`fleetloop_shared.update.delta`).
ALGORITHMS_FOR_KIND = {"full": ("none",), "delta": FORMATS}

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_ED25519_SIGNATURE_LEN = 64


@dataclass(frozen=True)
class PayloadRef:
    """One downloadable way to build the release's image: the full image or a delta from one base."""

    kind: str
    algorithm: str
    path: str
    sha256: str
    size: int
    base_sha256: str | None


@dataclass(frozen=True)
class ReleaseManifest:
    """The signed description of one firmware release for one hardware id."""

    name: str
    version: str
    hardware_id: str
    target_sha256: str
    target_size: int
    payloads: tuple[PayloadRef, ...]
    created_unix: int
    expires_unix: int
    #: How the device installs it: "slot" (A/B firmware image, reboot) or "swap" (a bundle — software,
    #: model pack, catalog, config — unpacked beside the current one and switched to atomically, no reboot).
    install: str = "slot"

    def payload_for(self, installed_sha256: str, formats: Sequence[str] = FORMATS) -> PayloadRef:
        """The delta whose base is the installed image, in the first of ``formats`` that has one, else the
        full image.

        A delta only applies to the exact bytes it was made from; anything else needs the full image.
        """
        mine = [p for p in self.payloads if p.kind == "delta" and p.base_sha256 == installed_sha256]
        deltas = {p.algorithm: p for p in mine}
        for fmt in formats:
            if fmt in deltas:
                return deltas[fmt]
        for p in self.payloads:
            if p.kind == "full":
                return p
        raise ArtifactVerificationError(
            f"release {self.name} {self.version} has no delta from installed image {installed_sha256[:12]} "
            "and no full image"
        )


def manifest_to_bytes(m: ReleaseManifest) -> bytes:
    """Canonical JSON (sorted keys, no spaces, UTF-8): the exact bytes that get signed."""
    doc: dict[str, Any] = {
        "schema": MANIFEST_SCHEMA,
        "name": m.name,
        "version": m.version,
        "hardware_id": m.hardware_id,
        "target_sha256": m.target_sha256,
        "target_size": m.target_size,
        "created_unix": m.created_unix,
        "expires_unix": m.expires_unix,
        "payloads": [
            {
                "kind": p.kind,
                "algorithm": p.algorithm,
                "path": p.path,
                "sha256": p.sha256,
                "size": p.size,
                "base_sha256": p.base_sha256,
            }
            for p in m.payloads
        ],
    }
    if m.install != "slot":  # only then: the bytes of every firmware manifest stay what they were
        doc["install"] = m.install
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


_TOP_FIELDS = {
    "schema",
    "name",
    "version",
    "hardware_id",
    "target_sha256",
    "target_size",
    "created_unix",
    "expires_unix",
    "payloads",
}
_PAYLOAD_FIELDS = {"kind", "algorithm", "path", "sha256", "size", "base_sha256"}


def manifest_from_bytes(data: bytes) -> ReleaseManifest:
    """Parse and check a manifest; :class:`MalformedMessageError` names the first bad field.

    Parsing alone does not make a manifest trustworthy: devices call :func:`verify_manifest`.
    """
    if len(data) > MAX_MANIFEST_BYTES:
        raise MalformedMessageError(f"release manifest is {len(data)} bytes, more than {MAX_MANIFEST_BYTES}")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise MalformedMessageError(f"release manifest is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise MalformedMessageError("release manifest: top level must be a JSON object")
    install = doc.pop("install", "slot")
    if install not in INSTALL_MODES:
        raise MalformedMessageError(
            f"release manifest: install {install!r} is not one of {', '.join(INSTALL_MODES)}"
        )
    _check_fields(doc, _TOP_FIELDS, "release manifest")
    if doc["schema"] != MANIFEST_SCHEMA:
        raise MalformedMessageError(
            f"release manifest: schema {doc['schema']!r} is not the supported {MANIFEST_SCHEMA!r}"
        )
    raw_payloads = doc["payloads"]
    if not isinstance(raw_payloads, list) or not raw_payloads:
        raise MalformedMessageError("release manifest: 'payloads' must be a non-empty list")
    if len(raw_payloads) > MAX_PAYLOADS:
        raise MalformedMessageError(f"release manifest: more than {MAX_PAYLOADS} payloads")
    manifest = ReleaseManifest(
        name=_text(doc, "name", "release manifest"),
        version=_text(doc, "version", "release manifest"),
        hardware_id=_text(doc, "hardware_id", "release manifest"),
        target_sha256=_sha(doc, "target_sha256", "release manifest"),
        target_size=_count(doc, "target_size", "release manifest"),
        payloads=tuple(_payload(p, i) for i, p in enumerate(raw_payloads)),
        created_unix=_count(doc, "created_unix", "release manifest"),
        expires_unix=_count(doc, "expires_unix", "release manifest"),
        install=install,
    )
    _check_consistent(manifest)
    return manifest


def _check_fields(doc: dict[str, Any], expected: set[str], where: str) -> None:
    missing = sorted(expected - doc.keys())
    if missing:
        raise MalformedMessageError(f"{where}: missing field {missing[0]!r}")
    unknown = sorted(doc.keys() - expected)
    if unknown:
        raise MalformedMessageError(f"{where}: unknown field {unknown[0]!r}")


def _text(doc: dict[str, Any], key: str, where: str) -> str:
    value = doc[key]
    if not isinstance(value, str) or not value or len(value) > 256 or not value.isprintable():
        raise MalformedMessageError(f"{where}: {key!r} must be a non-empty printable string of ≤ 256 chars")
    return value


def _sha(doc: dict[str, Any], key: str, where: str) -> str:
    value = doc[key]
    if not isinstance(value, str) or not _SHA256_RE.fullmatch(value):
        raise MalformedMessageError(f"{where}: {key!r} must be 64 lowercase hex digits")
    return value


def _count(doc: dict[str, Any], key: str, where: str) -> int:
    value = doc[key]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise MalformedMessageError(f"{where}: {key!r} must be a non-negative 64-bit integer")
    return value


def _payload(raw: Any, index: int) -> PayloadRef:
    where = f"release manifest: payloads[{index}]"
    if not isinstance(raw, dict):
        raise MalformedMessageError(f"{where} must be a JSON object")
    _check_fields(raw, _PAYLOAD_FIELDS, where)
    kind = raw["kind"]
    if kind not in PAYLOAD_KINDS:
        raise MalformedMessageError(f"{where}: kind {kind!r} is not one of {', '.join(PAYLOAD_KINDS)}")
    algorithm = raw["algorithm"]
    if algorithm not in ALGORITHMS_FOR_KIND[kind]:
        allowed = " or ".join(repr(a) for a in ALGORITHMS_FOR_KIND[kind])
        raise MalformedMessageError(f"{where}: a {kind} payload needs algorithm {allowed}, not {algorithm!r}")
    path = _text(raw, "path", where)
    if path.startswith("/") or "\\" in path or ".." in path.split("/") or "://" in path or "?" in path:
        raise MalformedMessageError(f"{where}: path {path!r} must be a relative path below the server base")
    base = raw["base_sha256"]
    if kind == "delta":
        base = _sha(raw, "base_sha256", where)
    elif base is not None:
        raise MalformedMessageError(f"{where}: a full payload has no base_sha256")
    return PayloadRef(
        kind=kind,
        algorithm=algorithm,
        path=path,
        sha256=_sha(raw, "sha256", where),
        size=_count(raw, "size", where),
        base_sha256=base,
    )


def _check_consistent(m: ReleaseManifest) -> None:
    if m.expires_unix < m.created_unix:
        raise MalformedMessageError("release manifest: expires_unix is before created_unix")
    fulls = [p for p in m.payloads if p.kind == "full"]
    if len(fulls) > 1:
        raise MalformedMessageError("release manifest: more than one full payload")
    for p in fulls:
        if p.sha256 != m.target_sha256 or p.size != m.target_size:
            raise MalformedMessageError("release manifest: the full payload is not the target image")
    deltas = [(p.base_sha256, p.algorithm) for p in m.payloads if p.kind == "delta"]
    if len(deltas) != len(set(deltas)):
        raise MalformedMessageError("release manifest: two deltas from the same base image in one format")
    if m.target_sha256 in {base for base, _ in deltas}:
        raise MalformedMessageError("release manifest: a delta from the target image to itself")


class ReleaseSigner:
    """The Ed25519 release key that vouches for manifests (held by the cloud, never by devices)."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key

    @classmethod
    def generate(cls) -> ReleaseSigner:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> ReleaseSigner:
        """Load a PEM (PKCS#8, unencrypted) Ed25519 private key; ConfigError says why it is unusable."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read release key: {exc.strerror or exc}") from None
        return cls.from_pem(data, str(path))

    @classmethod
    def from_pem(cls, data: bytes, source: str) -> ReleaseSigner:
        """The key in ``data`` (PEM, PKCS#8, unencrypted, Ed25519); ConfigError naming ``source`` (a
        file, an environment variable) says why it is unusable."""
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{source}: not an unencrypted PEM private key ({exc})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{source}: release key is {type(key).__name__}, expected an Ed25519 key")
        return cls(key)

    def pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM (for whoever keeps it: a 0600 file, a secret)."""
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def save(self, path: Path) -> None:
        """Write the key as PEM, readable by its owner only (0600), atomically."""
        write_atomically(path, self.pem(), mode=0o600)

    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    def public_key_pem(self) -> bytes:
        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, manifest_bytes: bytes) -> bytes:
        return self._key.sign(manifest_bytes)


def public_key_from_pem(data: bytes, source: str) -> Ed25519PublicKey:
    """The Ed25519 public key in ``data`` (PEM, SubjectPublicKeyInfo); ConfigError naming ``source`` (a
    file, the n-th trusted key) says why it is unusable."""
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{source}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{source}: release key is {type(key).__name__}, expected an Ed25519 key")
    return key


def verify_manifest(
    manifest_bytes: bytes,
    signature: bytes,
    trusted_public_keys_pem: Sequence[bytes],
    *,
    now_unix: int,
    hardware_id: str,
) -> ReleaseManifest:
    """The manifest, if a trusted key signed these exact bytes, it has not expired and fits this hardware.

    The signature is checked before the JSON is parsed, so forged bytes never reach the parser.
    """
    if not trusted_public_keys_pem:
        raise ConfigError("no trusted release keys are configured; cannot verify any update")
    trusted = enumerate(trusted_public_keys_pem, 1)
    keys = [public_key_from_pem(pem, f"trusted release key #{i}") for i, pem in trusted]
    if not _signed_by_any(manifest_bytes, signature, keys):
        raise ArtifactVerificationError("signature does not verify with any trusted release key")
    manifest = manifest_from_bytes(manifest_bytes)
    if now_unix >= manifest.expires_unix:
        raise ArtifactVerificationError(
            f"manifest expired at {manifest.expires_unix} (unix time), it is now {now_unix}"
        )
    if manifest.hardware_id != hardware_id:
        raise ArtifactVerificationError(
            f"manifest is for hardware {manifest.hardware_id}, this device is {hardware_id}"
        )
    return manifest


def _signed_by_any(data: bytes, signature: bytes, keys: Sequence[Ed25519PublicKey]) -> bool:
    if len(signature) != _ED25519_SIGNATURE_LEN:
        return False
    for key in keys:
        try:
            key.verify(signature, data)
        except InvalidSignature:
            continue
        return True
    return False


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Hash a file in bounded memory (1 MiB at a time)."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except FileNotFoundError:
        raise NotFoundError(f"{path}: no such file") from None
    return digest.hexdigest()
