"""The object store interface, its local-disk and in-memory implementations, and the S3 settings.

What the users need (the fleet store's Iceberg files, the upload staging's pieces, later artifacts):
whole objects written once under a key and read back, listed by prefix with size and age, deleted. No
appends, no renames, no directories: the operations every S3-compatible service has, with the
semantics it has (a put is atomic and replaces; a list may lag a put on some services, so nothing here
decides correctness from a list alone).

Keys are relative, ``/``-separated paths of plain segments (:func:`check_key`); a bad key is a
programming error or hostile input, refused before any I/O.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fleetloop_shared.durable import write_atomically
from fleetloop_shared.errors import NotFoundError, UnavailableError, UserError

_SEGMENT = re.compile(r"^[A-Za-z0-9_=][A-Za-z0-9._=-]{0,254}$")


def check_key(key: str) -> str:
    """``key`` if it is a relative path of plain segments (letters, digits, ``. _ - =``, not starting
    with ``.`` or ``-``); UserError otherwise."""
    parts = key.split("/") if isinstance(key, str) else [""]
    if not key or len(key) > 1024 or not all(_SEGMENT.match(p) for p in parts):
        raise UserError(f"object key {key!r} is not a relative path of plain names")
    return key


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    #: When the object was last written, Unix seconds.
    modified: float


class ObjectStore(Protocol):
    """Objects under keys. NotFoundError for a missing object on ``get``; UnavailableError when the
    store cannot be reached after the adapter's retries (the caller may try again later)."""

    #: Where the objects are, as a URI other engines understand (``file:///...``, ``s3://bucket/prefix``).
    location: str

    def put(self, key: str, data: bytes) -> None:
        """Write the whole object (replacing one of the same key); atomic: readers see all or nothing."""
        ...

    def get(self, key: str) -> bytes: ...

    def stat(self, key: str) -> ObjectInfo:
        """Size and age of one object; NotFoundError when there is none."""
        ...

    def read_range(self, key: str, start: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``start`` (fewer at the end): what a file server needs to send
        a large object in pieces, with HTTP Range, without holding it whole."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; a missing one is not an error (deletes are retried)."""
        ...

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (a folder-like prefix ends with ``/``), by key."""
        ...


class MemoryObjectStore:
    """The in-memory fake: same semantics, nothing persists; ``clock`` stamps the objects."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.location = "memory://"
        self._objects: dict[str, tuple[bytes, float]] = {}
        self._lock = threading.Lock()
        self._clock = clock

    def put(self, key: str, data: bytes) -> None:
        with self._lock:
            self._objects[check_key(key)] = (bytes(data), self._clock())

    def get(self, key: str) -> bytes:
        with self._lock:
            found = self._objects.get(check_key(key))
        if found is None:
            raise NotFoundError(f"no object {key!r} in {self.location}")
        return found[0]

    def stat(self, key: str) -> ObjectInfo:
        with self._lock:
            found = self._objects.get(check_key(key))
        if found is None:
            raise NotFoundError(f"no object {key!r} in {self.location}")
        return ObjectInfo(key, len(found[0]), found[1])

    def read_range(self, key: str, start: int, length: int) -> bytes:
        return self.get(key)[max(0, start) : max(0, start) + max(0, length)]

    def delete(self, key: str) -> None:
        with self._lock:
            self._objects.pop(check_key(key), None)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        with self._lock:
            return [ObjectInfo(k, len(v), t) for k, (v, t) in sorted(self._objects.items())
                    if k.startswith(prefix)]  # fmt: skip


class LocalObjectStore:
    """Objects as files below ``root`` (the embedded default). A put writes a temporary file and renames
    it (fsync'd when ``durable``: the fleet store's files are, the upload staging's pieces need not be —
    a lost piece is resent, a damaged one fails the whole upload's hash)."""

    def __init__(self, root: Path, *, durable: bool = True) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.location = self.root.resolve().as_uri()
        self._durable = durable

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes) -> None:
        path = self.path(key)
        try:
            if self._durable:
                write_atomically(path, data)
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as exc:
            raise UnavailableError(f"cannot write {path}: {exc.strerror or exc}") from None

    def get(self, key: str) -> bytes:
        path = self.path(key)
        with self._reading(key, path):
            return path.read_bytes()

    def stat(self, key: str) -> ObjectInfo:
        path = self.path(key)
        with self._reading(key, path):
            st = path.stat()
        if not path.is_file():
            raise NotFoundError(f"no object {key!r} in {self.location}")
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def read_range(self, key: str, start: int, length: int) -> bytes:
        path = self.path(key)
        with self._reading(key, path), path.open("rb") as fh:
            fh.seek(max(0, start))
            return fh.read(max(0, length))

    @contextlib.contextmanager
    def _reading(self, key: str, path: Path) -> Iterator[None]:
        """A read's failures in the object store's words, as a bucket would answer: no such file (or a
        folder where the object would be) is a missing object; any other disk failure, unavailable."""
        try:
            yield
        except (FileNotFoundError, IsADirectoryError):
            raise NotFoundError(f"no object {key!r} in {self.location}") from None
        except OSError as exc:
            raise UnavailableError(f"cannot read {path}: {exc.strerror or exc}") from None

    def delete(self, key: str) -> None:
        path = self.path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise UnavailableError(f"cannot delete {path}: {exc.strerror or exc}") from None
        # Leave no empty folders behind, as a bucket has none (stop at the root or a non-empty one).
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        # Walk only below the deepest folder the prefix names.
        folder = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        out: list[ObjectInfo] = []
        for dirpath, _dirs, files in os.walk(folder):
            for name in files:
                if name.startswith("."):  # a temporary file of a put in progress
                    continue
                full = os.path.join(dirpath, name)
                key = os.path.relpath(full, self.root).replace(os.sep, "/")
                if not key.startswith(prefix):
                    continue
                try:
                    st = os.stat(full)
                except FileNotFoundError:
                    continue
                out.append(ObjectInfo(key, st.st_size, st.st_mtime))
        out.sort(key=lambda o: o.key)
        return out


@dataclass(frozen=True)
class S3Settings:
    """An S3-compatible bucket (``storage.*`` in the coordinator's configuration)."""

    bucket: str
    #: Key prefix inside the bucket everything of this deployment goes under ("" for the bucket's root).
    prefix: str = ""
    #: ``http(s)://host:port`` of a non-AWS service (MinIO, Ceph, moto); None for AWS itself.
    endpoint: str | None = None
    region: str = "us-east-1"
    #: An AWS shared-credentials file (``[default]`` with aws_access_key_id / aws_secret_access_key);
    #: None: the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...) or an instance role.
    credentials_file: Path | None = None
    #: Profile in the credentials file.
    profile: str = "default"
    #: One request's time limit; a slower answer is abandoned and retried.
    request_timeout_s: float = 10.0
    connect_timeout_s: float = 5.0
    #: Attempts per request (the first included) before UnavailableError; retries back off.
    max_attempts: int = 8

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", self.bucket):
            raise UserError(f"bucket name {self.bucket!r} is not a valid S3 bucket name")
        if self.prefix and (self.prefix.startswith("/") or self.prefix.endswith("/")):
            raise UserError(f"object prefix {self.prefix!r} must not start or end with '/'")
        if self.prefix:
            check_key(self.prefix)
        if self.max_attempts < 1 or self.request_timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise UserError("storage retries and timeouts must be above 0")

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")


def copy_objects(source: ObjectStore, target: ObjectStore, prefix: str = "") -> int:
    """Copy every object under ``prefix`` that ``target`` lacks (or holds with another size) from
    ``source``: how ``cloud migrate`` moves a data directory's artifacts into a bucket. Safe to run
    again (what was copied is skipped). Returns how many objects were copied."""
    have = {o.key: o.size for o in target.list(prefix)}
    copied = 0
    for obj in source.list(prefix):
        if have.get(obj.key) != obj.size:
            target.put(obj.key, source.get(obj.key))
            copied += 1
    return copied


def open_object_store(
    settings: S3Settings | None, local_root: Path, *, area: str, durable: bool = True
) -> ObjectStore:
    """Where one user's objects go: below ``area`` (``fleet``, ``staging``, ``artifacts``) in the bucket
    of ``settings`` (ConfigError if it is missing or refuses the credentials), or in the folder
    ``local_root`` when there is no bucket (the embedded default)."""
    if settings is None:
        return LocalObjectStore(local_root, durable=durable)
    from fleetloop_cloud.storage.s3 import S3ObjectStore

    store = S3ObjectStore(settings, area=check_key(area))
    store.check_bucket()
    return store
