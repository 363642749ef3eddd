"""Who may write a TUF repository's metadata now, and where its files are.

TUF metadata versions must only grow: two coordinators that both read targets version 7 and both write
version 8 would hand devices two different version-8 files (one of them lost, or a device that saw
the other refusing the next as a rollback). The files live in the object store, which has no
conditional put through our client (docs/decisions/0024), so the database is the arbiter: a writer
holds the repository's writer lock (:class:`DatabaseWriters`, a row with an expiry) across its
read-modify-write. One coordinator alone (the embedded default) needs only its threads kept apart
(:class:`LocalWriters`).
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

from fleetloop_cloud.storage import ObjectStore
from fleetloop_shared.errors import NotFoundError, UnavailableError

#: Threads of one coordinator wait on one of these many locks (by the name's hash): bounded, however
#: many per-device repositories the director has.
STRIPES = 64
#: A writer lock outlives a writer that died holding it by this long at most.
WRITER_TTL_S = 30.0
#: How long a writer waits for the lock before UnavailableError (the caller may retry).
WAIT_S = 60.0


class MetadataWriters(Protocol):
    """``hold(name)``: a context in which this process is the only writer of ``name`` anywhere."""

    def hold(self, name: str) -> AbstractContextManager[None]: ...


class WriterLocks(Protocol):
    """The database's writer locks (``repositories.interfaces.CoordinatorLeases``)."""

    def take(self, name: str, holder: str, now: float, ttl_s: float) -> bool: ...

    def give_up(self, name: str, holder: str) -> None: ...


class LocalWriters:
    """One process writes (the embedded default): a striped set of thread locks."""

    def __init__(self) -> None:
        self._stripes = [threading.Lock() for _ in range(STRIPES)]

    @contextmanager
    def hold(self, name: str) -> Iterator[None]:
        with self._stripes[zlib.crc32(name.encode()) % STRIPES]:
            yield


class DatabaseWriters(LocalWriters):
    """Several coordinators write: the thread lock, then the database's writer lock for ``name``."""

    def __init__(
        self, locks: WriterLocks, holder: str, *, clock: Callable[[], float] = time.time,
        ttl_s: float = WRITER_TTL_S, wait_s: float = WAIT_S,
    ) -> None:  # fmt: skip
        super().__init__()
        self._locks, self._holder, self._clock = locks, holder, clock
        self._ttl_s, self._wait_s = ttl_s, wait_s
        #: Times a writer found the lock held by another coordinator and waited.
        self.waits = 0

    @contextmanager
    def hold(self, name: str) -> Iterator[None]:
        with super().hold(name):
            deadline = time.monotonic() + self._wait_s
            pause = 0.005
            while not self._locks.take(name, self._holder, self._clock(), self._ttl_s):
                self.waits += 1
                if time.monotonic() > deadline:
                    raise UnavailableError(
                        f"another coordinator has held the writer lock of {name} for {self._wait_s:g} s"
                    )
                time.sleep(pause)
                pause = min(pause * 2, 0.1)
            try:
                yield
            finally:
                self._locks.give_up(name, self._holder)


class MetadataFolder:
    """The files of one repository role folder (``tuf/image/roles``), as objects under a prefix."""

    def __init__(self, store: ObjectStore, prefix: str) -> None:
        self.store = store
        self.prefix = prefix.rstrip("/")
        self.location = f"{store.location}/{self.prefix}"

    def read(self, name: str) -> bytes | None:
        try:
            return self.store.get(f"{self.prefix}/{name}")
        except NotFoundError:
            return None

    def write(self, name: str, data: bytes) -> None:
        self.store.put(f"{self.prefix}/{name}", data)

    def names(self) -> list[str]:
        """The file names directly in this folder."""
        cut = len(self.prefix) + 1
        return [o.key[cut:] for o in self.store.list(self.prefix + "/") if "/" not in o.key[cut:]]

    def folders(self) -> list[str]:
        """The names of the folders directly below this one."""
        cut = len(self.prefix) + 1
        return sorted({o.key[cut:].split("/", 1)[0] for o in self.store.list(self.prefix + "/")
                       if "/" in o.key[cut:]})  # fmt: skip
