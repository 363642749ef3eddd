"""Release managers' offline keys: Ed25519 key files and the targets metadata signed with them.

Uptane's protection against a compromised server rests on the image repository's root and targets keys
living with release managers, not with the coordinator. A release manager's key is a PKCS#8 PEM file,
encrypted with a passphrase unless made for a lab (``fleetloop keys generate``); the public half is
written beside it (``NAME.pub.pem``) for whoever sets up the image repository's root.

``fleetloop artifacts upload`` sends the image, the coordinator answers with the targets metadata it
proposes (the signed part only, unsigned), :func:`check_proposal` checks that it adds exactly this
release — the image at its standard target path with the hash and length of the local file, and
deltas that build it — and :func:`sign_targets` signs it here, on the release manager's machine.

This module is the only shared user of ``tuf`` and ``securesystemslib``; their errors become ours.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, SSlibKey  # type: ignore[attr-defined]
from tuf.api.exceptions import RepositoryError
from tuf.api.metadata import Metadata, Root, Targets  # type: ignore[attr-defined]

from fleetloop_shared.durable import write_atomically
from fleetloop_shared.errors import ArtifactVerificationError, ConfigError, NotFoundError, UserError
from fleetloop_shared.update.artifact import ReleaseSigner, public_key_from_pem
from fleetloop_shared.update.passphrases import MIN_PASSPHRASE, PASSPHRASE_ENV
from fleetloop_shared.update.tuf_metadata import CUSTOM_KEY, KIND_DELTA, KIND_IMAGE, image_target_path


@dataclass(frozen=True)
class ReleaseKey:
    """One loaded private key: its TUF key id and the signer python-tuf uses."""

    keyid: str
    path: Path
    signer: CryptoSigner


def public_pem_path(path: Path) -> Path:
    """``rm.pem`` → ``rm.pub.pem``."""
    return path.with_name(path.name.removesuffix(".pem") + ".pub.pem")


def generate_key_file(path: Path, passphrase: bytes | None) -> str:
    """A new Ed25519 key at ``path`` (0600; encrypted PKCS#8 when ``passphrase``) and its public half
    beside it; returns the key id. UserError when ``path`` exists: a key is never overwritten."""
    if path.exists():
        raise UserError(f"{path} exists; a key file is never overwritten (choose another --out)")
    if passphrase is not None and len(passphrase) < MIN_PASSPHRASE:
        raise UserError(f"the passphrase is shorter than {MIN_PASSPHRASE} characters")
    private = Ed25519PrivateKey.generate()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, pem, mode=0o600)
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    write_atomically(public_pem_path(path), public)
    return str(SSlibKey.from_crypto(private.public_key()).keyid)


def is_encrypted(path: Path) -> bool:
    try:
        return b"ENCRYPTED PRIVATE KEY" in path.read_bytes()[:64]
    except OSError as exc:
        raise UserError(f"cannot read key file {path}: {exc.strerror}") from None


def load_key_file(path: Path, passphrase: bytes | None) -> ReleaseKey:
    """The private key in ``path``; UserError naming the file for a wrong or missing passphrase, a file
    that is not an Ed25519 PEM private key, or one that cannot be read."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read key file {path}: {exc.strerror}") from None
    encrypted = b"ENCRYPTED PRIVATE KEY" in data[:64]
    if encrypted and not passphrase:
        raise UserError(f"{path} is encrypted: give its passphrase (prompt, ${PASSPHRASE_ENV} or a file)")
    try:
        private = serialization.load_pem_private_key(data, password=passphrase if encrypted else None)
    except ValueError as exc:
        if encrypted:
            raise UserError(f"{path}: wrong passphrase (or a damaged key file)") from None
        raise UserError(f"{path}: not a PEM private key ({exc})") from None
    except TypeError as exc:
        raise UserError(f"{path}: {exc}") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise UserError(f"{path}: expected an Ed25519 key")
    signer = CryptoSigner(private, SSlibKey.from_crypto(private.public_key()))
    return ReleaseKey(str(signer.public_key.keyid), path, signer)


def public_key_file(path: Path) -> SSlibKey:
    """The TUF public key in a PEM file (``NAME.pub.pem``, or a private key file: its public half).
    ConfigError naming the file otherwise."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read key file {path}: {exc.strerror}") from None
    if b"PRIVATE KEY" not in data:
        return SSlibKey.from_crypto(public_key_from_pem(data, str(path)))
    if b"ENCRYPTED" in data[:64]:
        raise ConfigError(f"{path} is an encrypted private key; give its .pub.pem instead")
    return SSlibKey.from_crypto(ReleaseSigner.from_pem(data, str(path)).public_key())


def _targets(doc: Mapping[str, Any], what: str) -> Targets:
    try:
        signed = Targets.from_dict(dict(_copy(doc)))
    except (ValueError, KeyError, TypeError, RepositoryError) as exc:
        raise ArtifactVerificationError(f"{what} is not TUF targets metadata: {exc}") from None
    return signed


def _copy(doc: Any) -> Any:
    if isinstance(doc, dict):
        return {k: _copy(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_copy(v) for v in doc]
    return doc


def check_proposal(
    proposed: Mapping[str, Any],
    current: Mapping[str, Any] | None,
    *,
    image_path: str,
    sha256: str,
    length: int,
    hardware_id: str,
    version: str,
) -> list[str]:
    """What signing ``proposed`` adds, after checking it is exactly this release on top of ``current``
    (the signed part of the targets the image repository publishes now; None before the first).

    Refused (ArtifactVerificationError) when the coordinator proposes anything else: a version that is
    not the next one, a target of an earlier release changed or removed, an image whose hash, length,
    hardware or version is not the local file's, or another new target than a delta building it.
    """
    new = _targets(proposed, "the proposed targets")
    old = _targets(current, "the published targets") if current is not None else None
    expected_version = (old.version + 1) if old is not None else 1
    if new.version != expected_version:
        raise ArtifactVerificationError(
            f"the coordinator proposes targets version {new.version}, expected {expected_version}"
        )
    before = dict(old.targets) if old is not None else {}
    for path, target in before.items():
        if path not in new.targets or new.targets[path] != target:
            raise ArtifactVerificationError(f"the proposal changes or removes the signed target {path}")
    added = sorted(set(new.targets) - set(before))
    image = new.targets.get(image_path)
    if image is None or image_path not in added:
        raise ArtifactVerificationError(f"the proposal does not add the image at {image_path}")
    if image.hashes.get("sha256") != sha256 or image.length != length:
        raise ArtifactVerificationError(
            f"the proposed image {image_path} is not the file you uploaded (hash or length differ)"
        )
    facts = image.custom.get(CUSTOM_KEY) if isinstance(image.custom, dict) else None
    if (
        not isinstance(facts, dict)
        or facts.get("kind") != KIND_IMAGE
        or (facts.get("hardware_id"), facts.get("version")) != (hardware_id, version)
    ):
        raise ArtifactVerificationError(f"the proposed image {image_path} names another hardware or version")
    for path in added:
        if path == image_path:
            continue
        custom = new.targets[path].custom
        d = custom.get(CUSTOM_KEY) if isinstance(custom, dict) else None
        if not isinstance(d, dict) or d.get("kind") != KIND_DELTA or d.get("image") != image_path:
            raise ArtifactVerificationError(f"the proposal adds {path}, which is not a delta to {image_path}")
    return added


def sign_targets(proposed: Mapping[str, Any], keys: Sequence[ReleaseKey]) -> bytes:
    """The targets metadata ``proposed`` (its signed part) signed by every key in ``keys``."""
    if not keys:
        raise UserError("no release key given: sign with --key FILE (one per key the threshold needs)")
    md: Metadata[Targets] = Metadata(_targets(proposed, "the proposed targets"))
    for key in keys:
        md.sign(key.signer, append=True)
    return bytes(md.to_bytes())


#: One request to the coordinator's REST API: (method, path, body, content type) → the JSON answer.
#: NotFoundError for a 404; the error tree for the rest.
Request = Callable[[str, str, bytes | None, str], Any]


def publish_release(
    request: Request, data: bytes, *, name: str, version: str, hardware: str, keys: Sequence[ReleaseKey]
) -> Any:
    """Stage a release at the coordinator, check what it proposes (:func:`check_proposal`), sign it with
    ``keys`` here and send the signatures; returns the release as the coordinator published it."""
    q = urlencode({"name": name, "version": version, "hardware": hardware})
    staged = request("POST", f"/v1/releases/staged?{q}", data, "application/octet-stream")
    try:
        current = request("GET", "/tuf/image/targets.json", None, "application/json")["signed"]
    except NotFoundError:
        current = None  # the first release of this image repository
    except (KeyError, TypeError) as exc:
        raise ArtifactVerificationError(f"the coordinator's targets metadata is unreadable: {exc}") from None
    check_proposal(
        staged["targets"], current, image_path=image_target_path(name, hardware, version),
        sha256=hashlib.sha256(data).hexdigest(), length=len(data), hardware_id=hardware, version=version,
    )  # fmt: skip
    signed = sign_targets(staged["targets"], keys)
    return request("POST", f"/v1/releases/staged/{staged['staging_id']}", signed, "application/json")


#: Lifetime of a root version release managers sign.
ROOT_LIFETIME = timedelta(days=365)
#: Most root versions walked when fetching the current root.
MAX_ROOT_WALK = 1024


def current_root(request: Request, trusted: bytes | None) -> Metadata[Root]:
    """The image repository's newest root, each version checked against the one before (as a device
    walks them) from ``trusted`` (a root this machine trusts, e.g. the devices' ``image-root.json``) or,
    without one, from the coordinator's version 1."""

    def parse(raw: Any, what: str) -> Metadata[Root]:
        try:
            return Metadata[Root].from_bytes(raw if isinstance(raw, bytes) else json.dumps(raw).encode())
        except (ValueError, KeyError, TypeError, RepositoryError) as exc:
            raise ArtifactVerificationError(f"{what} is not TUF root metadata: {exc}") from None

    root = (
        parse(trusted, "the trusted root")
        if trusted
        else parse(
            request("GET", "/tuf/image/1.root.json", None, "application/json"),
            "the image repository's root 1",
        )
    )
    for _ in range(MAX_ROOT_WALK):
        version = root.signed.version + 1
        try:
            raw = request("GET", f"/tuf/image/{version}.root.json", None, "application/json")
        except NotFoundError:
            return root
        new = parse(raw, f"root {version}")
        try:
            root.signed.verify_delegate("root", new.signed_bytes, new.signatures)
            new.signed.verify_delegate("root", new.signed_bytes, new.signatures)
        except RepositoryError as exc:
            raise ArtifactVerificationError(
                f"the coordinator's root {version} does not verify: {exc}"
            ) from None
        if new.signed.version != version:
            raise ArtifactVerificationError(
                f"the coordinator's root {version} says version {new.signed.version}"
            )
        root = new
    raise ArtifactVerificationError(f"more than {MAX_ROOT_WALK} root versions")


def rotate_image_root(
    request: Request,
    keys: Sequence[ReleaseKey],
    *,
    now: datetime,
    trusted: bytes | None = None,
    root_keys: Sequence[SSlibKey] = (),
    root_threshold: int | None = None,
    targets_keys: Sequence[SSlibKey] = (),
    targets_threshold: int | None = None,
) -> Any:
    """A new version of the image repository's root, signed here with the offline root ``keys`` (those
    of the current root, and of the new one when ``root_keys`` replaces them), sent to the coordinator.
    Renews the expiry; replaces the root keys and threshold, the targets keys and threshold when asked;
    keeps the coordinator's online snapshot and timestamp keys."""
    old = current_root(request, trusted)
    new = Metadata[Root].from_bytes(old.to_bytes())
    signed = new.signed
    signed.version += 1
    signed.expires = now + ROOT_LIFETIME
    for role, replacement, threshold in (("root", root_keys, root_threshold),
                                         ("targets", targets_keys, targets_threshold)):  # fmt: skip
        if replacement:
            for keyid in list(signed.roles[role].keyids):
                signed.revoke_key(keyid, role)
            for public in replacement:
                signed.add_key(public, role)
        if threshold is not None:
            signed.roles[role].threshold = threshold
        count = len(signed.roles[role].keyids)
        if not 1 <= signed.roles[role].threshold <= count:
            raise UserError(f"{role} threshold {signed.roles[role].threshold} must be between 1 and {count}")
    allowed = set(old.signed.roles["root"].keyids) | set(signed.roles["root"].keyids)
    new.signatures.clear()
    for key in keys:
        if key.keyid not in allowed:
            raise UserError(f"{key.path} is not a root key of the image repository (old or new)")
        new.sign(key.signer, append=True)
    return request("POST", "/v1/tuf/image/root", bytes(new.to_bytes()), "application/json")
