"""TUF metadata in the cloud: the image repository and the director, signed with python-tuf.

Uptane's split (see ``fleetloop_shared.update.tuf_metadata`` for what the device checks):

- the **image repository** signs every image and delta the cloud built. Its root needs a threshold of
  root keys (2 of 2 by default; offline in a real deployment), its targets role is the release key;
- the **director** signs, per device, the image that device should install now and the delta from its
  installed image, tagged with the job id. Its keys are online: the device trusts nothing the director
  says unless the image repository signed the same bytes.

Each repository is a :class:`RootAuthority` (the root's versions and the keys it lists) plus one or more
:class:`RoleFiles` (targets, snapshot, timestamp): one for the image repository, one per device for the
director, all under the same director root. Files are written atomically in the order a client reads
them backwards (targets, snapshot, then timestamp), so a client never sees a timestamp naming a
snapshot that is not there yet. ``consistent_snapshot`` is off: the coordinator serves the latest
files; version numbers still only grow, which is what defeats rollback and replay.

Keys are Ed25519 PEM files named by key id under ``keys/tuf/<repository>/`` (0600). This module is the
only cloud user of ``tuf.api.metadata`` and ``securesystemslib``; their errors become ours here.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, SSlibKey  # type: ignore[attr-defined]
from tuf.api.exceptions import RepositoryError
from tuf.api.metadata import (  # type: ignore[attr-defined]
    Metadata,
    MetaFile,
    Role,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)

from fleetloop_shared.durable import write_atomically
from fleetloop_shared.errors import ConfigError, NotFoundError, StateError, UserError
from fleetloop_shared.update.tuf_metadata import REPOSITORIES, REPOSITORY_FIELD

#: How long each role's metadata is valid. The timestamp is re-signed when half of its life is gone
#: (on read), so a device that cannot reach the cloud for a day refuses stale metadata (freeze attack).
#: Most root keys a rotation may create (each is a file an operator must keep offline).
MAX_ROOT_KEYS = 16
LIFETIMES = {
    "root": timedelta(days=365),
    "targets": timedelta(days=30),
    "snapshot": timedelta(days=30),
    "timestamp": timedelta(days=1),
}
ONLINE_ROLES = ("targets", "snapshot", "timestamp")
_ROOT_FILE = re.compile(r"([1-9][0-9]{0,8})\.root\.json")
_ROLE_FILES = ("timestamp.json", "snapshot.json", "targets.json")
_DEVICE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def _dt(unix: float) -> datetime:
    return datetime.fromtimestamp(int(unix), UTC)


class KeyStore:
    """Ed25519 signing keys as unencrypted PKCS#8 PEM files, one per key id, readable by the owner only."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def new_signer(self) -> CryptoSigner:
        private = Ed25519PrivateKey.generate()
        signer = CryptoSigner(private, SSlibKey.from_crypto(private.public_key()))
        pem = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_atomically(self.directory / f"{signer.public_key.keyid}.pem", pem, mode=0o600)
        return signer

    def signer(self, keyid: str) -> CryptoSigner | None:
        """The signer for ``keyid``, or None when this store does not hold it (an offline key)."""
        path = self.directory / f"{keyid}.pem"
        if not path.is_file():
            return None
        try:
            private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path}: not an unencrypted PEM private key ({exc})") from None
        if not isinstance(private, Ed25519PrivateKey):
            raise ConfigError(f"{path}: expected an Ed25519 key")
        signer = CryptoSigner(private, SSlibKey.from_crypto(private.public_key()))
        if signer.public_key.keyid != keyid:
            raise ConfigError(f"{path}: holds key {signer.public_key.keyid}, not {keyid}")
        return signer

    def forget(self, keyid: str) -> None:
        """Delete a private key (a retired or compromised key must not sign again)."""
        (self.directory / f"{keyid}.pem").unlink(missing_ok=True)


class RootAuthority:
    """One repository's root: its versions on disk (``N.root.json``) and the keys it lists per role."""

    def __init__(
        self,
        directory: Path,
        keys: KeyStore,
        *,
        repository: str,
        clock: Callable[[], float],
        root_keys: int = 1,
        root_threshold: int = 1,
    ) -> None:
        if repository not in REPOSITORIES:
            raise ConfigError(f"unknown TUF repository {repository!r}")
        self.directory = directory
        self.keys = keys
        self.repository = repository
        self._clock = clock
        directory.mkdir(parents=True, exist_ok=True)
        latest = self._latest_version()
        if latest == 0:
            self.root = self._new_root(root_keys, root_threshold)
            self._write_root(self.root)
        else:
            self.root = self._load(latest)

    def _latest_version(self) -> int:
        versions = [int(m.group(1)) for p in self.directory.iterdir() if (m := _ROOT_FILE.fullmatch(p.name))]
        return max(versions, default=0)

    def _load(self, version: int) -> Metadata[Root]:
        try:
            return Metadata[Root].from_bytes(self.root_file(version).read_bytes())
        except (ValueError, KeyError, TypeError, RepositoryError) as exc:
            raise ConfigError(f"{self.directory}: root version {version} is unreadable: {exc}") from None

    def _new_root(self, root_keys: int, threshold: int) -> Metadata[Root]:
        if not 1 <= threshold <= root_keys:
            raise ConfigError(f"root threshold {threshold} must be between 1 and the {root_keys} root keys")
        root = Root(
            expires=_dt(self._clock()) + LIFETIMES["root"],
            consistent_snapshot=False,
            unrecognized_fields={REPOSITORY_FIELD: self.repository},
        )
        root.roles["root"] = Role([], threshold)
        for _ in range(root_keys):
            root.add_key(self.keys.new_signer().public_key, "root")
        for role in ONLINE_ROLES:
            root.add_key(self.keys.new_signer().public_key, role)
        md = Metadata(root)
        self._sign(md, md.signed)
        return md

    def _sign(self, md: Metadata[Any], root: Root) -> None:
        """Sign ``md`` with every key ``root`` lists for the role that this store holds."""
        role = md.signed.type
        for keyid in root.roles[role].keyids:
            signer = self.keys.signer(keyid)
            if signer is not None:
                md.sign(signer, append=True)

    def _write_root(self, md: Metadata[Root]) -> None:
        data = md.to_bytes()
        write_atomically(self.root_file(md.signed.version), data)

    def root_file(self, version: int) -> Path:
        return self.directory / f"{version}.root.json"

    def root_bytes(self) -> bytes:
        return self.root_file(self.root.signed.version).read_bytes()

    def sign_role(self, md: Metadata[Any]) -> None:
        md.signatures.clear()
        self._sign(md, self.root.signed)
        role = self.root.signed.roles[md.signed.type]
        if len(md.signatures) < role.threshold:
            raise StateError(
                f"{self.repository} repository: only {len(md.signatures)} of the {role.threshold} keys "
                f"for {md.signed.type} are here; sign with the offline keys"
            )

    def check_usable(self) -> None:
        """StateError when the root has expired: nothing signed under it would verify on a device."""
        expires = self.root.signed.expires
        if expires <= _dt(self._clock()):
            raise StateError(
                f"the {self.repository} repository's root expired at {expires.isoformat()}; "
                "rotate the root (new keys, new expiry: "
                f"fleetloop keys rotate --repository {self.repository}) before releasing"
            )

    def rotate(
        self, *, root_keys: int | None = None, threshold: int | None = None, online: bool = False
    ) -> int:
        """A new root version signed by the old root's threshold and by the new root keys.

        New root keys replace the old ones (``root_keys``), ``online`` replaces the targets, snapshot
        and timestamp keys too (after a suspected compromise). Returns the new version.
        """
        old = self.root
        new = Metadata[Root].from_bytes(old.to_bytes())
        signed = new.signed
        signed.version += 1
        signed.expires = _dt(self._clock()) + LIFETIMES["root"]
        retired: list[str] = []
        roles = (["root"] if root_keys else []) + (list(ONLINE_ROLES) if online else [])
        for role in roles:
            count = root_keys if role == "root" and root_keys else 1
            for keyid in list(signed.roles[role].keyids):
                signed.revoke_key(keyid, role)
                retired.append(keyid)
            for _ in range(count):
                signed.add_key(self.keys.new_signer().public_key, role)
        if threshold is not None:
            if not 1 <= threshold <= len(signed.roles["root"].keyids):
                raise ConfigError(f"root threshold {threshold} exceeds the number of root keys")
            signed.roles["root"].threshold = threshold
        new.signatures.clear()
        self._sign(new, old.signed)  # the old root vouches for the new one ...
        self._sign(new, signed)  # ... and the new root keys sign it too
        for md_root, label in ((old.signed, "old"), (signed, "new")):
            try:
                md_root.verify_delegate("root", new.signed_bytes, new.signatures)
            except RepositoryError as exc:
                raise StateError(
                    f"cannot rotate the {self.repository} root: {label} threshold not met ({exc})"
                ) from None
        self._write_root(new)
        self.root = new
        for keyid in retired:
            self.keys.forget(keyid)
        return signed.version


class RoleFiles:
    """Targets, snapshot and timestamp of one repository (or of one device at the director)."""

    def __init__(self, directory: Path, authority: RootAuthority, clock: Callable[[], float]) -> None:
        self.directory = directory
        self.authority = authority
        self._clock = clock
        self._lock = threading.Lock()
        directory.mkdir(parents=True, exist_ok=True)
        if not (directory / "timestamp.json").is_file():
            self.publish({}, replace=True)

    def _read(self, name: str) -> Metadata[Any] | None:
        path = self.directory / f"{name}.json"
        if not path.is_file():
            return None
        return Metadata.from_bytes(path.read_bytes())

    def version(self) -> int:
        """The current targets version (0 before the first publish)."""
        md = self._read("targets")
        return int(md.signed.version) if md is not None else 0

    def targets(self) -> dict[str, TargetFile]:
        md = self._read("targets")
        return dict(md.signed.targets) if md is not None else {}

    def publish(self, targets: Mapping[str, TargetFile], *, replace: bool = False) -> int:
        """Add (or, with ``replace``, set) targets; re-sign targets, snapshot, timestamp. Returns the
        new targets version."""
        with self._lock:
            now = _dt(self._clock())
            old_t, old_s, old_ts = self._read("targets"), self._read("snapshot"), self._read("timestamp")
            merged: dict[str, TargetFile] = {} if replace or old_t is None else dict(old_t.signed.targets)
            merged.update(targets)
            t = Targets(
                version=(old_t.signed.version + 1) if old_t else 1,
                expires=now + LIFETIMES["targets"],
                targets=merged,
            )
            s = Snapshot(
                version=(old_s.signed.version + 1) if old_s else 1,
                expires=now + LIFETIMES["snapshot"],
                meta={"targets.json": MetaFile(version=t.version)},
            )
            ts = Timestamp(
                version=(old_ts.signed.version + 1) if old_ts else 1,
                expires=now + LIFETIMES["timestamp"],
                snapshot_meta=MetaFile(version=s.version),
            )
            for signed in (t, s, ts):
                md: Metadata[Any] = Metadata(signed)
                self.authority.sign_role(md)
                write_atomically(self.directory / f"{signed.type}.json", md.to_bytes())
            return t.version

    def refresh(self) -> None:
        """Re-sign the timestamp (and snapshot) when half of its life is gone, so honest devices never
        see expired metadata while a stalled mirror's copies still go stale."""
        md = self._read("timestamp")
        now = _dt(self._clock())
        if md is not None and md.signed.expires - now > LIFETIMES["timestamp"] / 2:
            return
        with self._lock:
            ts = self._read("timestamp")
            if ts is None:
                return
            if ts.signed.expires - now > LIFETIMES["timestamp"] / 2:
                return
            ts.signed.version += 1
            ts.signed.expires = now + LIFETIMES["timestamp"]
            self.authority.sign_role(ts)
            write_atomically(self.directory / "timestamp.json", ts.to_bytes())

    def file(self, name: str) -> Path:
        if name not in _ROLE_FILES:
            raise NotFoundError(f"no TUF metadata {name!r}")
        return self.directory / name


class TufRepositories:
    """The image repository and the director of one coordinator, under ``root`` and ``key_root``."""

    def __init__(
        self,
        root: Path,
        key_root: Path,
        *,
        clock: Callable[[], float],
        root_keys: int = 2,
        root_threshold: int = 2,
    ) -> None:
        self._clock = clock
        self.image_authority = RootAuthority(
            root / "image" / "root",
            KeyStore(key_root / "image"),
            repository="image",
            clock=clock,
            root_keys=root_keys,
            root_threshold=root_threshold,
        )
        self.image = RoleFiles(root / "image" / "roles", self.image_authority, clock)
        self.director_authority = RootAuthority(
            root / "director" / "root", KeyStore(key_root / "director"), repository="director", clock=clock
        )
        self._devices_dir = root / "director" / "devices"
        self._devices: dict[str, RoleFiles] = {}
        self._lock = threading.Lock()
        self.anchor_dir = key_root.parent
        self.export_anchors()

    def export_anchors(self) -> None:
        """Write the current roots as ``image-root.json`` / ``director-root.json``: what devices are
        provisioned with (a device provisioned later starts from the newer root)."""
        write_atomically(self.anchor_dir / "image-root.json", self.image_authority.root_bytes())
        write_atomically(self.anchor_dir / "director-root.json", self.director_authority.root_bytes())

    def rotate(
        self, repository: str, *, root_keys: int | None = None, threshold: int | None = None,
        online: bool = False,
    ) -> dict[str, Any]:
        """Rotate one repository's root (``image`` or ``director``) and, with ``online``, its targets,
        snapshot and timestamp keys; what was signed with retired online keys is re-signed at once, so
        a device walking to the new root finds metadata it can verify. Devices follow the chain of
        ``N.root.json`` files; newly provisioned ones get the new anchor."""
        if repository == "image":
            authority, role_files = self.image_authority, [self.image]
        elif repository == "director":
            authority = self.director_authority
            with self._lock:
                known = sorted(p.name for p in self._devices_dir.glob("*") if p.is_dir())
            role_files = [self.device(d) for d in known if _DEVICE.fullmatch(d)]
        else:
            raise UserError(f"no TUF repository {repository!r}; use image or director")
        if root_keys is not None and not 1 <= root_keys <= MAX_ROOT_KEYS:
            raise UserError(f"root keys: expected 1..{MAX_ROOT_KEYS}, got {root_keys}")
        keys_after = root_keys or len(authority.root.signed.roles["root"].keyids)
        if threshold is not None and not 1 <= threshold <= keys_after:
            # Checked before any key is made: a refused rotation leaves no orphan key files behind.
            raise UserError(f"root threshold {threshold} exceeds the number of root keys ({keys_after})")
        version = authority.rotate(root_keys=root_keys, threshold=threshold, online=online)
        if online:
            for files in role_files:
                if (files.directory / "targets.json").is_file():
                    files.publish({})
        self.export_anchors()
        root = authority.root.signed
        return {
            "repository": repository,
            "root_version": version,
            "root_expires": root.expires.isoformat(),
            "root_keys": len(root.roles["root"].keyids),
            "threshold": root.roles["root"].threshold,
            "online_keys_rotated": online,
            "resigned": len(role_files) if online else 0,
        }

    def device(self, device_id: str) -> RoleFiles:
        if not _DEVICE.fullmatch(device_id):
            raise NotFoundError(f"no device {device_id!r}")
        with self._lock:
            files = self._devices.get(device_id)
            if files is None:
                files = RoleFiles(self._devices_dir / device_id, self.director_authority, self._clock)
                self._devices[device_id] = files
            return files

    def metadata_bytes(self, repository: str, name: str) -> bytes:
        """What the HTTP server sends for ``/tuf/<repository>/<name>``; repository is ``image`` or
        ``director/<device_id>``."""
        if repository == "image":
            authority, files = self.image_authority, self.image
        elif repository.startswith("director/"):
            device_id = repository.removeprefix("director/")
            authority = self.director_authority
            if (
                not (self._devices_dir / device_id / "timestamp.json").is_file()
                and _ROOT_FILE.fullmatch(name) is None
            ):
                raise NotFoundError(f"the director has no metadata for device {device_id!r}")
            files = self.device(device_id)
        else:
            raise NotFoundError(f"no TUF repository {repository!r}")
        m = _ROOT_FILE.fullmatch(name)
        try:
            if m is not None:
                return authority.root_file(int(m.group(1))).read_bytes()
            files.refresh()
            return files.file(name).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"no TUF metadata {repository}/{name}") from None


def target_file(path: str, data_sha256: str, length: int, facts: Mapping[str, Any]) -> TargetFile:
    """A TUF target for a stored file, with fleetloop's facts in ``custom``."""
    return TargetFile(
        length=length,
        hashes={"sha256": data_sha256},
        path=path,
        unrecognized_fields={"custom": {"fleetloop": json.loads(json.dumps(dict(facts)))}},
    )
