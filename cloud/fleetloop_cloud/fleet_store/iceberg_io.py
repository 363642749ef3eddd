"""The Iceberg tables' file IO on S3: pyiceberg's pyarrow file IO, with fewer requests per commit.

Each ingest batch commits twice (samples, captures), and each commit writes four objects (a data file, a
manifest, a manifest list, a metadata file) and reads back the table's current metadata file and its
parent's manifest list. Through pyiceberg's own file IO that was 20 S3 requests per commit: each object
a multipart upload (3 requests), an existence check before it and a size check after it (HEAD), and a
HEAD before each GET. The requests, not the bytes, were a large part of the commit's CPU (every request
is signed, sent and parsed by the AWS SDK). Here:

- **one PUT per object**: a file is written to memory and sent whole when it is closed (pyarrow's
  delayed open makes an object smaller than a multipart part one ``PutObject``); a file that outgrows
  :data:`SPOOL_BYTES` (a compaction's) streams as a multipart upload as before;
- **no existence check** before writing: every file the tables write is named with a fresh UUID (the
  metadata file's sequence number and UUID, the manifest's, the data file's write UUID);
- **no size check** after writing: the size is what was written;
- **no read back of what this process just wrote**: the latest metadata files and manifest lists it
  wrote are kept (:class:`RecentFiles`, bounded) and read from memory. Their names are unique and
  objects are never rewritten, so the copy is the object; a deleted one is dropped here when deleted
  through this IO, and one deleted by another coordinator (snapshot expiry) is only ever read as the
  parent of a commit the catalog then refuses (its base moved), which pyiceberg retries on fresh metadata.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections import OrderedDict
from types import TracebackType
from typing import Any

import pyarrow as pa
from pyiceberg.io import InputFile, OutputFile, OutputStream
from pyiceberg.io.pyarrow import PyArrowFile, PyArrowFileIO

from fleetloop_cloud.storage import S3Settings

#: A file is kept in memory until it is closed, up to this size; a larger one streams (multipart).
SPOOL_BYTES = 8 * 1024 * 1024
#: Files :class:`RecentFiles` keeps, and their bytes at most (the oldest is dropped first).
RECENT_FILES = 64
RECENT_BYTES = 64 * 1024 * 1024


def _kept(location: str) -> bool:
    """Files read back by the next commit: metadata files and manifest lists (``snap-*.avro``)."""
    name = location.rsplit("/", 1)[-1]
    return name.endswith(".metadata.json") or (name.startswith("snap-") and name.endswith(".avro"))


class RecentFiles:
    """The metadata files and manifest lists this process wrote last, by location (bounded: at most
    :data:`RECENT_FILES` files and :data:`RECENT_BYTES` bytes, the least recently used dropped first).

    Process-wide because pyiceberg makes a new file IO for every table it loads; the counters are the
    metric (``hits``: reads answered here, ``dropped``: files evicted by the bound)."""

    def __init__(self, max_files: int = RECENT_FILES, max_bytes: int = RECENT_BYTES) -> None:
        self._lock = threading.Lock()
        self._files: OrderedDict[str, pa.Buffer] = OrderedDict()
        self._bytes = 0
        self._max_files, self._max_bytes = max_files, max_bytes
        self.counters = {"hits": 0, "misses": 0, "dropped": 0}

    def put(self, location: str, data: pa.Buffer) -> None:
        if data.size > self._max_bytes:
            return
        with self._lock:
            self._forget(location)
            self._files[location] = data
            self._bytes += data.size
            while len(self._files) > self._max_files or self._bytes > self._max_bytes:
                _, old = self._files.popitem(last=False)
                self._bytes -= old.size
                self.counters["dropped"] += 1

    def get(self, location: str) -> pa.Buffer | None:
        with self._lock:
            data = self._files.get(location)
            if data is None:
                self.counters["misses"] += 1
                return None
            self._files.move_to_end(location)
            self.counters["hits"] += 1
            return data

    def forget(self, location: str) -> None:
        with self._lock:
            self._forget(location)

    def _forget(self, location: str) -> None:
        old = self._files.pop(location, None)
        if old is not None:
            self._bytes -= old.size


RECENT = RecentFiles()


class _Upload:
    """An output stream that holds the file in memory and sends it in one request when closed (or
    streams it once it outgrows :data:`SPOOL_BYTES`); it knows the size it wrote."""

    def __init__(self, file: _FleetFile) -> None:
        self._file = file
        self._buffer: pa.BufferOutputStream | None = pa.BufferOutputStream()
        self._stream: Any = None
        self._written = 0
        self.closed = False

    def write(self, data: bytes) -> int:
        n = len(memoryview(data))
        if self._buffer is not None:
            self._buffer.write(data)
            if self._written + n > SPOOL_BYTES:  # too large to hold: stream the rest
                self._stream = self._file.open_stream()
                self._stream.write(self._buffer.getvalue())
                self._buffer = None
        else:
            self._stream.write(data)
        self._written += n
        return n

    def tell(self) -> int:
        return self._written

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._buffer is not None:
            data = self._buffer.getvalue()
            with self._file.open_stream() as out:
                out.write(data)
            if _kept(self._file.location):
                RECENT.put(self._file.location, data)
        else:
            self._stream.close()
        self._file.written = self._written

    def __enter__(self) -> _Upload:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:  # a file whose writing failed: nothing sent if it was held, else the upload is ended
            self.closed = True  # (an object no commit names, like any failed write's)
            if self._stream is not None:
                with contextlib.suppress(OSError):
                    self._stream.close()


class _FleetFile(PyArrowFile):
    """A table file on S3: written in one request, its size known from writing it, and read from
    :data:`RECENT` when this process wrote it last."""

    written: int | None = None

    def open_stream(self) -> Any:
        return self._filesystem.open_output_stream(self._path, buffer_size=self._buffer_size)

    def create(self, overwrite: bool = False) -> OutputStream:
        # no existence check: every file the tables write has a name of its own (a fresh UUID)
        return _Upload(self)

    def __len__(self) -> int:
        if self.written is not None:
            return self.written
        kept = RECENT.get(self.location) if _kept(self.location) else None
        return kept.size if kept is not None else super().__len__()

    def exists(self) -> bool:
        if self.written is not None or (_kept(self.location) and RECENT.get(self.location) is not None):
            return True
        return super().exists()

    def open(self, seekable: bool = True) -> Any:
        kept = RECENT.get(self.location) if _kept(self.location) else None
        return pa.BufferReader(kept) if kept is not None else super().open(seekable)


_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()


class FleetFileIO(PyArrowFileIO):
    """pyiceberg's pyarrow file IO with our S3 file system (one set of settings) and the request savings
    above. pyiceberg makes a file IO for every table it loads, and a commit returns a newly loaded
    table: the S3 client is shared by all of them (one per settings, for the process's life), so each
    commit neither builds a client nor opens new connections."""

    def _initialize_s3_fs(self, netloc: str | None) -> Any:
        from fleetloop_cloud.storage.s3 import s3_filesystem

        key = self.properties["fleetloop.s3"]
        with _clients_lock:
            client = _clients.get(key)
            if client is None:
                client = _clients[key] = s3_filesystem(S3Settings(**json.loads(key)), single_put=True)
            return client

    def _file(self, location: str) -> _FleetFile:
        scheme, netloc, path = self.parse_location(location, self.properties)
        return _FleetFile(fs=self.fs_by_scheme(scheme, netloc), location=location, path=path,
                          buffer_size=int(self.properties.get("buffer-size", 1024 * 1024)))  # fmt: skip

    def new_input(self, location: str) -> _FleetFile:
        return self._file(location)

    def new_output(self, location: str) -> _FleetFile:
        return self._file(location)

    def delete(self, location: str | InputFile | OutputFile) -> None:
        RECENT.forget(location if isinstance(location, str) else location.location)
        super().delete(location)
