"""Where a coordinator loads its online keys from — one small interface, so no key lives only in a
coordinator's ``--dir``.

Online keys sign without a person at hand: the release-manifest key (``release.pem``) and the TUF
repositories' online roles (files by key id under ``tuf/<repository>/``, read by
:class:`~.tuf_repository.KeyStore`). Two places hold them:

- **the data directory** (:class:`KeyFiles`, the embedded default): ``<dir>/keys``, made on the first
  start, each file 0600. One coordinator, one disk.
- **a secret every coordinator mounts** (:class:`SecretKeys`, ``keys.dir`` in ``cloud.yaml``): a
  directory mounted read-only from the platform's secret store (a Kubernetes Secret volume, a Vault
  agent's files) laid out like ``keys/``, and environment variables ``FLEETLOOP_KEY_<NAME>`` that win
  over its files for keys loaded by name (``FLEETLOOP_KEY_RELEASE_PEM``: the release key's PEM text; the
  TUF key stores read their files under ``tuf/`` directly). A coordinator never makes a key there: a
  missing one is a ConfigError naming it and the command that makes it, because a key made by one of
  several coordinators would sign what the others cannot vouch for.

Never the database: whoever can read it (a replica, a backup, a support session) must not be able to
sign for the fleet.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from fleetloop_shared.durable import write_atomically
from fleetloop_shared.errors import ConfigError
from fleetloop_shared.names import SAFE_NAME
from fleetloop_shared.update.artifact import ReleaseSigner

#: The release-manifest key's name.
RELEASE_KEY = "release.pem"
#: Environment variables holding keys: this prefix and the key's name in upper case, every character
#: other than a letter or digit an underscore (``release.pem`` → ``FLEETLOOP_KEY_RELEASE_PEM``).
ENV_PREFIX = "FLEETLOOP_KEY_"
#: A key's name: up to four plain names (:mod:`fleetloop_shared.names`) joined by ``/``.
_NAME = re.compile(rf"{SAFE_NAME.pattern}(/{SAFE_NAME.pattern}){{0,3}}")


def check_name(name: str) -> str:
    """A key's name: relative, a few path parts of plain characters (no ``..``, no absolute path)."""
    if not _NAME.fullmatch(name) or ".." in name:
        raise ConfigError(f"key name {name!r}: expected a relative name (release.pem, tuf/director/ID.pem)")
    return name


def env_name(name: str) -> str:
    return ENV_PREFIX + re.sub(r"[^A-Za-z0-9]", "_", check_name(name)).upper()


class OnlineKeys(Protocol):
    """A coordinator's online private keys, by name (``release.pem``, ``tuf/director/<keyid>.pem``)."""

    @property
    def directory(self) -> Path:
        """Where the key files are (the TUF key stores read theirs by key id under ``tuf/``)."""
        ...

    @property
    def writable(self) -> bool:
        """Whether a key may be made here (the data directory) or only read (a mounted secret)."""
        ...

    def load(self, name: str) -> bytes | None:
        """The key's PEM bytes, or None when this source does not hold it."""
        ...

    def store(self, name: str, pem: bytes) -> None:
        """Keep a key made here; ConfigError for a source that is read-only."""
        ...


class KeyFiles:
    """The embedded default: key files in the data directory's ``keys/`` (0600), made on first start."""

    writable = True

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def load(self, name: str) -> bytes | None:
        path = self.directory / check_name(name)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read key: {exc.strerror or exc}") from None

    def store(self, name: str, pem: bytes) -> None:
        path = self.directory / check_name(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, pem, mode=0o600)


class SecretKeys:
    """At scale: a read-only directory mounted from a secret store, and ``FLEETLOOP_KEY_*`` variables
    (which win over its files). Every coordinator of a deployment loads the same keys from it."""

    writable = False

    def __init__(self, directory: Path, environ: Mapping[str, str] | None = None) -> None:
        if not directory.is_dir():
            raise ConfigError(f"keys.dir {directory}: not a directory (mount the key secret there)")
        self.directory = directory
        self._environ = os.environ if environ is None else environ

    def load(self, name: str) -> bytes | None:
        text = self._environ.get(env_name(name))
        if text:
            return text.encode()
        return KeyFiles(self.directory).load(name)

    def store(self, name: str, pem: bytes) -> None:
        raise ConfigError(
            f"key {name} is neither in {self.directory} nor in ${env_name(name)}, and a coordinator never "
            "makes a key in a mounted secret: make the keys once ('fleetloop cloud init --dir DIR'), put "
            "DIR/keys into the secret, and mount it on every coordinator"
        )


class MemoryKeys:
    """The fake beside them: keys in a dict (``directory`` still names a folder for the TUF stores)."""

    def __init__(self, directory: Path, *, writable: bool = True) -> None:
        self.directory = directory
        self.writable = writable
        self._lock = threading.Lock()
        self.keys: dict[str, bytes] = {}

    def load(self, name: str) -> bytes | None:
        with self._lock:
            return self.keys.get(check_name(name))

    def store(self, name: str, pem: bytes) -> None:
        if not self.writable:
            raise ConfigError(f"key {name}: this key source is read-only")
        with self._lock:
            self.keys[check_name(name)] = pem


def release_signer(keys: OnlineKeys) -> ReleaseSigner:
    """The release-manifest key from ``keys`` — made there on the first start when the source may make
    keys — and its public half beside it for whoever checks a manifest offline."""
    pem = keys.load(RELEASE_KEY)
    if pem is None:
        signer = ReleaseSigner.generate()
        keys.store(RELEASE_KEY, signer.pem())
    else:
        signer = ReleaseSigner.from_pem(pem, f"{keys.directory / RELEASE_KEY} (or ${env_name(RELEASE_KEY)})")
    if keys.writable:
        keys.store("release.pub.pem", signer.public_key_pem())
    return signer
