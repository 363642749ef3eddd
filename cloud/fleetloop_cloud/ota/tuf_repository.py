"""TUF metadata in the cloud: the image repository and the director, signed with python-tuf.

Uptane's split (see ``fleetloop_shared.update.tuf_metadata`` for what the device checks):

- the **image repository** lists every image and delta the cloud built. Its root needs a threshold of
  root keys (2 of 2 by default) and its targets role the release managers' keys: both are offline,
  with release managers (:class:`ImageKeyCustody`), who sign the targets the coordinator proposes
  (:meth:`RoleFiles.propose`, :meth:`RoleFiles.publish_signed`); the coordinator signs snapshot and
  timestamp. A lab's coordinator may hold them all, and then signs uploads itself;
- the **director** signs, per device, the image that device should install now and the delta from its
  installed image, tagged with the job id. Its keys are online: the device trusts nothing the director
  says unless the image repository signed the same bytes.

Each repository is a :class:`RootAuthority` (the root's versions and the keys it lists) plus one or more
:class:`RoleFiles` (targets, snapshot, timestamp): one for the image repository, one per device for the
director, all under the same director root. The files are objects in the artifacts' object store
(``tuf/...``: a folder of the data directory, or the bucket every coordinator shares), each written
whole in the order a client reads them backwards (targets, snapshot, then timestamp), so a client never
sees a timestamp naming a snapshot that is not there yet; a writer holds the repository's writer lock
(:mod:`.writers`) across its read-modify-write, so versions only grow whichever coordinator signs.
``consistent_snapshot`` is off: the coordinator serves the latest
files; version numbers still only grow, which is what defeats rollback and replay.

Keys are Ed25519 PEM files named by key id under ``keys/tuf/<repository>/`` (0600). This module is the
only cloud user of ``tuf.api.metadata`` and ``securesystemslib``; their errors become ours here.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
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

from fleetloop_cloud.ota.writers import LocalWriters, MetadataFolder, MetadataWriters
from fleetloop_cloud.storage import ObjectStore
from fleetloop_shared.choices import check_choice
from fleetloop_shared.durable import write_atomically
from fleetloop_shared.errors import (
    ConfigError,
    IntegrityError,
    NotFoundError,
    PermissionDeniedError,
    StateError,
    UserError,
)
from fleetloop_shared.update.release_keys import public_key_file
from fleetloop_shared.update.tuf_metadata import IMAGE_REPOSITORY, REPOSITORIES, REPOSITORY_FIELD

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
#: Lifetime of targets metadata release managers sign: each release renews it, and a year without one
#: is the time they have before devices refuse the image repository as frozen.
OFFLINE_TARGETS_LIFETIME = timedelta(days=365)
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
    """One repository's root: its versions (``N.root.json``) and the keys it lists per role."""

    def __init__(
        self,
        folder: MetadataFolder,
        keys: KeyStore,
        *,
        repository: str,
        clock: Callable[[], float],
        root_keys: int = 1,
        root_threshold: int = 1,
        offline: KeyStore | None = None,
        targets_keys: Sequence[SSlibKey] = (),
        targets_threshold: int = 1,
    ) -> None:
        """``offline``: where a new root's root and targets keys are made (the release managers' keys,
        not the coordinator's); ``targets_keys``: public keys release managers made themselves, used as
        the targets role (``targets_threshold`` of them sign). Both matter only when no root exists."""
        check_choice(repository, REPOSITORIES, "TUF repository")
        self.folder = folder
        self.keys = keys
        self.repository = repository
        self._clock = clock
        latest = self._latest_version()
        if latest == 0:
            self.root = self._new_root(root_keys, root_threshold, offline, targets_keys, targets_threshold)
            self._write_root(self.root)
        else:
            self.root = self._load(latest)

    def _latest_version(self) -> int:
        versions = [int(m.group(1)) for name in self.folder.names() if (m := _ROOT_FILE.fullmatch(name))]
        return max(versions, default=0)

    def reload(self) -> None:
        """Follow a newer root another coordinator wrote (a rotation through it)."""
        latest = self._latest_version()
        if latest > self.root.signed.version:
            self.root = self._load(latest)

    def _load(self, version: int) -> Metadata[Root]:
        try:
            return Metadata[Root].from_bytes(self.root_data(version))
        except (ValueError, KeyError, TypeError, RepositoryError, NotFoundError) as exc:
            where = self.folder.location
            raise ConfigError(f"{where}: root version {version} is unreadable: {exc}") from None

    def _new_root(
        self, root_keys: int, threshold: int, offline: KeyStore | None, targets_keys: Sequence[SSlibKey],
        targets_threshold: int,
    ) -> Metadata[Root]:  # fmt: skip
        if not 1 <= threshold <= root_keys:
            raise ConfigError(f"root threshold {threshold} must be between 1 and the {root_keys} root keys")
        if targets_keys and not 1 <= targets_threshold <= len(targets_keys):
            raise ConfigError(
                f"targets threshold {targets_threshold} must be between 1 and the {len(targets_keys)} "
                "targets keys"
            )
        keep = offline or self.keys
        root = Root(
            expires=_dt(self._clock()) + LIFETIMES["root"],
            consistent_snapshot=False,
            unrecognized_fields={REPOSITORY_FIELD: self.repository},
        )
        root.roles["root"] = Role([], threshold)
        for _ in range(root_keys):
            root.add_key(keep.new_signer().public_key, "root")
        for key in targets_keys:
            root.add_key(key, "targets")
        if targets_keys:
            root.roles["targets"].threshold = targets_threshold
        else:
            root.add_key(keep.new_signer().public_key, "targets")
        for role in ("snapshot", "timestamp"):
            root.add_key(self.keys.new_signer().public_key, role)
        md = Metadata(root)
        self._sign(md, md.signed, keep)
        return md

    def _sign(self, md: Metadata[Any], root: Root, keys: KeyStore | None = None) -> None:
        """Sign ``md`` with every key ``root`` lists for the role that this store (or ``keys``) holds."""
        role = md.signed.type
        for keyid in root.roles[role].keyids:
            signer = (keys or self.keys).signer(keyid)
            if signer is not None:
                md.sign(signer, append=True)

    def holds(self, role: str, root: Root | None = None) -> bool:
        """Whether this coordinator holds enough keys to sign ``role`` itself (a lab's custody: a data
        directory made before release managers held the image repository's keys)."""
        listed = (root or self.root.signed).roles[role]
        held = sum(1 for k in listed.keyids if (self.keys.directory / f"{k}.pem").is_file())
        return held >= listed.threshold

    def install(self, data: bytes) -> int:
        """Make a root version release managers signed offline the current one: the next version, this
        repository's, not expired, signed by the threshold of the current root's keys *and* of its own
        (how a device checks it), and keeping online keys this coordinator holds for snapshot and
        timestamp. Returns the new version."""
        try:
            new = Metadata[Root].from_bytes(data)
        except (ValueError, KeyError, TypeError, RepositoryError) as exc:
            raise IntegrityError(f"the signed root is unreadable: {exc}") from None
        signed, old = new.signed, self.root.signed
        if signed.unrecognized_fields.get(REPOSITORY_FIELD) != self.repository:
            raise IntegrityError(f"the signed root is not the {self.repository} repository's")
        if signed.version != old.version + 1:
            raise StateError(f"the signed root is version {signed.version}; the next is {old.version + 1}")
        if signed.expires <= _dt(self._clock()):
            raise StateError(f"the signed root expired at {signed.expires.isoformat()}")
        for role in ("snapshot", "timestamp"):
            if not self.holds(role, signed):
                raise UserError(f"the new root must keep this coordinator's online {role} key(s)")
        for md_root, label in ((old, "current"), (signed, "new")):
            try:
                md_root.verify_delegate("root", new.signed_bytes, new.signatures)
            except RepositoryError as exc:
                raise PermissionDeniedError(
                    f"the signed {self.repository} root does not meet the {label} root's threshold of root "
                    f"keys: {exc}"
                ) from None
        self._write_root(new)
        self.root = new
        return int(signed.version)

    def verify(self, md: Metadata[Any]) -> None:
        """PermissionDeniedError unless ``md`` carries the threshold of signatures the root asks of its
        role: what the coordinator checks before it publishes metadata a release manager signed."""
        role = md.signed.type
        try:
            self.root.signed.verify_delegate(role, md.signed_bytes, md.signatures)
        except RepositoryError as exc:
            listed = self.root.signed.roles[role]
            raise PermissionDeniedError(
                f"{self.repository} repository: {role} metadata needs {listed.threshold} signature(s) by "
                f"the release managers' {role} keys ({', '.join(k[:12] for k in listed.keyids)}): {exc}"
            ) from None

    def _write_root(self, md: Metadata[Root]) -> None:
        self.folder.write(f"{md.signed.version}.root.json", md.to_bytes())

    def root_data(self, version: int) -> bytes:
        """Root version ``version``; NotFoundError when there is none (ends a device's rotation walk)."""
        data = self.folder.read(f"{version}.root.json")
        if data is None:
            raise NotFoundError(f"no root version {version} of the {self.repository} repository")
        return data

    def root_bytes(self) -> bytes:
        return self.root_data(self.root.signed.version)

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

    def __init__(
        self, folder: MetadataFolder, authority: RootAuthority, clock: Callable[[], float],
        writers: MetadataWriters | None = None,
    ) -> None:  # fmt: skip
        self.folder = folder
        self.authority = authority
        self._clock = clock
        self._writers = writers or LocalWriters()
        if not self.exists("timestamp") and authority.holds("targets"):
            # with the targets keys offline, the first release manager's upload makes the first files
            with self._writers.hold(folder.prefix):
                if not self.exists("timestamp"):
                    self._publish({}, replace=True)

    def exists(self, role: str) -> bool:
        try:
            self.folder.store.stat(f"{self.folder.prefix}/{role}.json")
        except NotFoundError:
            return False
        return True

    def _read(self, name: str) -> Metadata[Any] | None:
        data = self.folder.read(f"{name}.json")
        if data is None:
            return None
        try:
            return Metadata.from_bytes(data)
        except (ValueError, KeyError, TypeError, RepositoryError) as exc:
            raise IntegrityError(f"{self.folder.location}/{name}.json is unreadable: {exc}") from None

    def version(self) -> int:
        """The current targets version (0 before the first publish)."""
        md = self._read("targets")
        return int(md.signed.version) if md is not None else 0

    def targets(self) -> dict[str, TargetFile]:
        md = self._read("targets")
        return dict(md.signed.targets) if md is not None else {}

    def _next_targets(self, targets: Mapping[str, TargetFile], replace: bool) -> Targets:
        old_t = self._read("targets")
        merged: dict[str, TargetFile] = {} if replace or old_t is None else dict(old_t.signed.targets)
        merged.update(targets)
        return Targets(
            version=(old_t.signed.version + 1) if old_t else 1,
            expires=_dt(self._clock())
            + (LIFETIMES["targets"] if self.authority.holds("targets") else OFFLINE_TARGETS_LIFETIME),
            targets=merged,
        )

    def publish(
        self, targets: Mapping[str, TargetFile], *, replace: bool = False, new_only: bool = False
    ) -> int:
        """Add (or, with ``replace``, set) targets; re-sign targets, snapshot, timestamp. Returns the
        new targets version. StateError when this coordinator does not hold the targets keys, or with
        ``new_only`` when one of the paths is a target already (another coordinator published the same
        release a moment ago: checked under the writer lock, so one of them wins)."""
        with self._writers.hold(self.folder.prefix):
            if new_only:
                taken = sorted(set(targets) & set(self.targets()))
                if taken:
                    raise StateError(f"{taken[0]} is published already")
            return self._publish(targets, replace=replace)

    def _publish(self, targets: Mapping[str, TargetFile], *, replace: bool) -> int:
        t: Metadata[Any] = Metadata(self._next_targets(targets, replace))
        self.authority.sign_role(t)
        return self._write(t)

    def propose(self, targets: Mapping[str, TargetFile]) -> dict[str, Any]:
        """The signed part of the next targets metadata with ``targets`` added, for release managers to
        sign (:meth:`publish_signed`); nothing changes here."""
        with self._writers.hold(self.folder.prefix):
            return dict(self._next_targets(targets, False).to_dict())

    def publish_signed(self, data: bytes, proposed: Mapping[str, Any]) -> int:
        """Publish targets metadata a release manager signed: it must be exactly ``proposed`` (what
        this coordinator offered to sign), the next version, and carry the threshold of signatures by
        the targets keys in the root; snapshot and timestamp are then re-signed with online keys.

        IntegrityError for bytes that are not targets metadata or not the proposal, StateError when
        the repository moved on since the proposal, PermissionDeniedError for missing signatures.
        """
        try:
            md = Metadata[Targets].from_bytes(data)
        except (ValueError, KeyError, TypeError, RepositoryError) as exc:
            raise IntegrityError(f"the signed targets metadata is unreadable: {exc}") from None
        if md.signed.to_dict() != dict(proposed):
            raise IntegrityError("the signed targets metadata is not what the coordinator proposed")
        with self._writers.hold(self.folder.prefix):
            current = self.version()
            if md.signed.version != current + 1:
                raise StateError(
                    f"the image repository moved on (targets version {current}) since this release was "
                    f"staged for version {md.signed.version}; upload it again"
                )
            if md.signed.expires <= _dt(self._clock()):
                raise StateError("the signed targets metadata has expired; upload the release again")
            self.authority.verify(md)
            return self._write(md)

    def _write(self, t: Metadata[Any]) -> int:
        """Write signed targets ``t``, then a snapshot and a timestamp naming it (online keys)."""
        now = _dt(self._clock())
        old_s, old_ts = self._read("snapshot"), self._read("timestamp")
        s = Snapshot(
            version=(old_s.signed.version + 1) if old_s else 1,
            expires=now + LIFETIMES["snapshot"],
            meta={"targets.json": MetaFile(version=t.signed.version)},
        )
        ts = Timestamp(
            version=(old_ts.signed.version + 1) if old_ts else 1,
            expires=now + LIFETIMES["timestamp"],
            snapshot_meta=MetaFile(version=s.version),
        )
        self.folder.write("targets.json", t.to_bytes())
        for signed in (s, ts):
            md: Metadata[Any] = Metadata(signed)
            self.authority.sign_role(md)
            self.folder.write(f"{signed.type}.json", md.to_bytes())
        return int(t.signed.version)

    def refresh(self) -> None:
        """Re-sign the timestamp (and snapshot) when half of its life is gone, so honest devices never
        see expired metadata while a stalled mirror's copies still go stale."""
        md = self._read("timestamp")
        now = _dt(self._clock())
        if md is not None and md.signed.expires - now > LIFETIMES["timestamp"] / 2:
            return
        with self._writers.hold(self.folder.prefix):
            ts = self._read("timestamp")
            if ts is None:
                return
            if ts.signed.expires - now > LIFETIMES["timestamp"] / 2:
                return
            ts.signed.version += 1
            ts.signed.expires = now + LIFETIMES["timestamp"]
            self.authority.sign_role(ts)
            self.folder.write("timestamp.json", ts.to_bytes())

    def data(self, name: str) -> bytes:
        """The bytes of ``timestamp.json``, ``snapshot.json`` or ``targets.json``; NotFoundError else."""
        found = self.folder.read(name) if name in _ROLE_FILES else None
        if found is None:
            raise NotFoundError(f"no TUF metadata {name!r}")
        return found


@dataclass(frozen=True)
class ImageKeyCustody:
    """Who holds the image repository's offline keys, read when its first root is made.

    ``release_keys``: a directory outside the data directory where the root keys (and the targets key,
    unless ``targets_key_files`` names release managers' public keys) are written, to be handed to the
    release managers; ``targets_key_files``: public key files (``fleetloop keys generate``) of the
    targets role, ``targets_threshold`` of which must sign each release. Neither: the coordinator
    holds them all (a lab)."""

    release_keys: Path | None = None
    targets_key_files: tuple[Path, ...] = ()
    targets_threshold: int = 1

    @property
    def offline(self) -> bool:
        return self.release_keys is not None or bool(self.targets_key_files)


class TufRepositories:
    """The image repository and the director, their files under ``tuf/`` in ``store`` and the online
    keys under ``key_root``."""

    def __init__(
        self,
        store: ObjectStore,
        key_root: Path,
        *,
        clock: Callable[[], float],
        root_keys: int = 2,
        root_threshold: int = 2,
        anchor_dir: Path | None = None,
        custody: ImageKeyCustody | None = None,
        writers: MetadataWriters | None = None,
    ) -> None:
        """``custody``: who holds a new image repository's root and targets keys (the coordinator, by
        default: a lab's custody, it signs every upload itself); ``writers``: how coordinators sharing
        ``store`` take turns writing (default: this process alone)."""
        self._clock = clock
        self._store = store
        self._writers = writers = writers or LocalWriters()
        custody = custody or ImageKeyCustody()
        image_root = MetadataFolder(store, "tuf/image/root")
        with writers.hold("tuf/image/root"):  # two first starts on one bucket make one root
            fresh = image_root.read("1.root.json") is None
            offline = KeyStore(custody.release_keys) if custody.release_keys is not None and fresh else None
            self.image_authority = self._image_root(image_root, key_root, custody, offline,
                                                    root_keys, root_threshold)  # fmt: skip
        with writers.hold("tuf/director/root"):  # one lock at a time: none is held while waiting on another
            self.director_authority = RootAuthority(
                MetadataFolder(store, "tuf/director/root"), KeyStore(key_root / "director"),
                repository="director", clock=clock,
            )  # fmt: skip
        if offline is not None:
            # what the release managers receive: each key file named by its role
            signed = self.image_authority.root.signed
            for role in ("root", "targets"):
                for keyid in signed.roles[role].keyids:
                    made = offline.directory / f"{keyid}.pem"
                    if made.is_file():
                        made.rename(offline.directory / offline_key_name(role, keyid))
        self.image = RoleFiles(MetadataFolder(store, "tuf/image/roles"), self.image_authority, clock, writers)
        self._devices_dir = MetadataFolder(store, "tuf/director/devices")
        self._devices: dict[str, RoleFiles] = {}
        self._lock = threading.Lock()
        #: Where the roots devices are provisioned with are written (public: beside the keys by default).
        self.anchor_dir = anchor_dir or key_root.parent
        self.export_anchors()

    def _image_root(
        self, folder: MetadataFolder, key_root: Path, custody: ImageKeyCustody, offline: KeyStore | None,
        root_keys: int, root_threshold: int,
    ) -> RootAuthority:  # fmt: skip
        return RootAuthority(
            folder,
            KeyStore(key_root / "image"),
            repository="image",
            clock=self._clock,
            root_keys=root_keys,
            root_threshold=root_threshold,
            offline=offline,
            targets_keys=[public_key_file(p) for p in custody.targets_key_files],
            targets_threshold=custody.targets_threshold,
        )

    def export_anchors(self) -> None:
        """Write the current roots as ``image-root.json`` / ``director-root.json``: what devices are
        provisioned with (a device provisioned later starts from the newer root)."""
        write_atomically(self.anchor_dir / "image-root.json", self.image_authority.root_bytes())
        write_atomically(self.anchor_dir / "director-root.json", self.director_authority.root_bytes())

    def rotate(
        self,
        repository: str,
        *,
        root_keys: int | None = None,
        threshold: int | None = None,
        online: bool = False,
    ) -> dict[str, Any]:
        """Rotate one repository's root (``image`` or ``director``) and, with ``online``, its targets,
        snapshot and timestamp keys; what was signed with retired online keys is re-signed at once, so
        a device walking to the new root finds metadata it can verify. Devices follow the chain of
        ``N.root.json`` files; newly provisioned ones get the new anchor."""
        if repository == "image":
            authority, role_files = self.image_authority, [self.image]
            if not authority.holds("root"):
                raise StateError(
                    "the image repository's root keys are offline, with the release managers: its root "
                    "cannot be rotated by the coordinator (docs/decisions/0026)"
                )
        elif repository == "director":
            authority = self.director_authority
            role_files = [self.device(d) for d in self._devices_dir.folders() if _DEVICE.fullmatch(d)]
        else:
            raise UserError(f"no TUF repository {repository!r}; use image or director")
        if root_keys is not None and not 1 <= root_keys <= MAX_ROOT_KEYS:
            raise UserError(f"root keys: expected 1..{MAX_ROOT_KEYS}, got {root_keys}")
        keys_after = root_keys or len(authority.root.signed.roles["root"].keyids)
        if threshold is not None and not 1 <= threshold <= keys_after:
            # Checked before any key is made: a refused rotation leaves no orphan key files behind.
            raise UserError(f"root threshold {threshold} exceeds the number of root keys ({keys_after})")
        with self._writers.hold(f"tuf/{repository}/root"):
            authority.reload()
            version = authority.rotate(root_keys=root_keys, threshold=threshold, online=online)
        if online:
            for files in role_files:
                if files.exists("targets"):
                    files.publish({})
        self.export_anchors()
        resigned = len(role_files) if online else 0
        return self._root_summary(repository, authority, version, online=online, resigned=resigned)

    def image_target_sha256(self, path: str) -> str:
        """The sha256 of the image repository's target at ``path`` — its TUF target path, or the same with
        the consistent-snapshot hash prefix on its file name (``dir/<sha256>.name``), so a vanilla TUF
        client's ``download_target`` finds it either way. NotFoundError for any other path."""
        if not isinstance(path, str) or len(path) > 1024:
            raise NotFoundError("no such target")
        targets = self.image.targets()
        found = targets.get(path)
        if found is not None:
            return str(found.hashes["sha256"])
        head, _, name = path.rpartition("/")
        digest, dot, rest = name.partition(".")
        if dot and re.fullmatch(r"[0-9a-f]{64}", digest):
            found = targets.get(f"{head}/{rest}" if head else rest)
            if found is not None and found.hashes.get("sha256") == digest:
                return digest
        raise NotFoundError(f"the image repository has no target {path!r}")

    def install_root(self, repository: str, data: bytes) -> dict[str, Any]:
        """A new ``image`` root signed offline by release managers (``RootAuthority.install``)."""
        if repository != IMAGE_REPOSITORY:
            raise UserError("only the image repository's root is signed offline; rotate the director's")
        with self._writers.hold("tuf/image/root"):
            self.image_authority.reload()
            version = self.image_authority.install(data)
        self.export_anchors()
        return self._root_summary(repository, self.image_authority, version, online=False, resigned=0)

    def _root_summary(
        self, repository: str, authority: RootAuthority, version: int, *, online: bool, resigned: int
    ) -> dict[str, Any]:
        root = authority.root.signed
        return {
            "repository": repository,
            "root_version": version,
            "root_expires": root.expires.isoformat(),
            "root_keys": len(root.roles["root"].keyids),
            "threshold": root.roles["root"].threshold,
            "online_keys_rotated": online,
            "resigned": resigned,
        }

    def device(self, device_id: str) -> RoleFiles:
        if not _DEVICE.fullmatch(device_id):
            raise NotFoundError(f"no device {device_id!r}")
        with self._lock:
            files = self._devices.get(device_id)
            if files is None:
                files = RoleFiles(
                    MetadataFolder(self._store, f"tuf/director/devices/{device_id}"),
                    self.director_authority, self._clock, self._writers,
                )  # fmt: skip
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
            if not _DEVICE.fullmatch(device_id):
                raise NotFoundError(f"no device {device_id!r}")
            signed_for = self._devices_dir.read(f"{device_id}/timestamp.json") is not None
            if _ROOT_FILE.fullmatch(name) is None and not signed_for:
                raise NotFoundError(f"the director has no metadata for device {device_id!r}")
            files = self.device(device_id)
        else:
            raise NotFoundError(f"no TUF repository {repository!r}")
        m = _ROOT_FILE.fullmatch(name)
        try:
            if m is not None:
                authority.reload()  # a rotation through another coordinator
                return authority.root_data(int(m.group(1)))
            files.refresh()
            return files.data(name)
        except NotFoundError:
            raise NotFoundError(f"no TUF metadata {repository}/{name}") from None


def offline_key_name(role: str, keyid: str) -> str:
    """The file name of an image repository key handed to release managers."""
    return f"image-{role}-{keyid[:16]}.pem"


@dataclass(frozen=True)
class OfflineExport:
    """What ``keys export-offline`` did: the key files written to ``out``, and the ones it could not
    delete where they were (a read-only mounted secret: the operator removes them from the secret)."""

    moved: list[Path]
    left: list[Path]


def export_offline_keys(
    store: ObjectStore, key_root: Path, out: Path, *, data_dir: Path, read_only: bool = False
) -> OfflineExport:
    """Move the image repository's root and targets private keys from the coordinator's key store
    (``key_root/image``: the data directory's, or a mounted secret's) to ``out``, reading which keys
    those are from the latest image root in ``store`` (the data directory's ``artifacts/``, or the bucket
    every coordinator shares). A coordinator made before release managers held them stops signing
    releases itself. ``read_only``: the key store is a mounted secret, so the keys are copied and listed
    in ``left`` for the operator to remove from it. UserError when ``out`` is inside the data directory
    or the key store, or there is nothing to move."""
    target = out.resolve()
    places = (("the data directory", data_dir.resolve()), ("the key store", key_root.parent.resolve()))
    for what, inside in places:
        if target == inside or inside in target.parents:
            raise UserError(f"{out} is inside {what} {inside}; the offline keys must leave it")
    folder = MetadataFolder(store, "tuf/image/root")
    versions = [int(m.group(1)) for name in folder.names() if (m := _ROOT_FILE.fullmatch(name))]
    if not versions:
        raise UserError(f"no image repository in {folder.location}")
    latest = folder.read(f"{max(versions)}.root.json")
    if latest is None:
        raise UserError(f"{folder.location}: root {max(versions)} vanished while it was read; try again")
    try:
        signed = Metadata[Root].from_bytes(latest).signed
    except (ValueError, KeyError, TypeError, RepositoryError) as exc:
        where = f"{folder.location}/{max(versions)}.root.json"
        raise IntegrityError(f"{where} is not TUF root metadata: {exc}") from None
    keys = key_root / "image"
    moved: list[Path] = []
    left: list[Path] = []
    for role in ("root", "targets"):
        for keyid in signed.roles[role].keyids:
            source = keys / f"{keyid}.pem"
            if not source.is_file():
                continue
            dest = out / offline_key_name(role, keyid)
            out.mkdir(parents=True, exist_ok=True)
            write_atomically(dest, source.read_bytes(), mode=0o600)
            if read_only:
                left.append(source)
            else:
                source.unlink()
            moved.append(dest)
    if not moved:
        raise UserError(f"{keys} holds no root or targets key of the image repository: nothing to move")
    return OfflineExport(moved, left)


def target_file(path: str, data_sha256: str, length: int, facts: Mapping[str, Any]) -> TargetFile:
    """A TUF target for a stored file, with fleetloop's facts in ``custom``."""
    return TargetFile(
        length=length,
        hashes={"sha256": data_sha256},
        path=path,
        unrecognized_fields={"custom": {"fleetloop": json.loads(json.dumps(dict(facts)))}},
    )
