"""Artifact download over HTTP with Range: resumes after a cut, refuses endless data, checks the hash.

Devices sit on flaky, metered links: a 40 MB image must survive a tunnel or a power cut without starting
over, so the partial file on disk *is* the resume point (``Range: bytes=N-``). The server is not trusted:
it may send more than the signed size (endless-data attack, refused before the extra byte is written) or
other bytes (hash mismatch, file deleted so the next attempt starts clean).

:class:`HttpFetcher` is the only HTTP client of the agent's OTA path; :func:`download` sees it through the
narrow :class:`Fetcher` seam.
"""

from __future__ import annotations

import http.client
import os
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from fleetloop_shared.errors import (
    ArtifactVerificationError,
    ConfigError,
    NotFoundError,
    UnavailableError,
)
from fleetloop_shared.update.artifact import sha256_file

_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


class Fetcher(Protocol):
    """Something that streams bytes of ``url`` from offset ``start``, at most ``max_bytes`` of them."""

    def fetch_range(self, url: str, start: int, max_bytes: int) -> Iterator[bytes]: ...


class HttpFetcher:
    """HTTP(S) GET with a Range header (urllib); maps transport failures onto the error tree.

    ``timeout_s`` bounds every connect and every read; ``chunk_size`` bounds each read. ``ca`` (PEM) is
    trusted for HTTPS besides the system's CAs: a coordinator whose certificate comes from the fleet's
    private CA (the one the agent's ``cloud.tls.ca`` names) would otherwise be refused.
    """

    def __init__(
        self,
        *,
        timeout_s: float = 30.0,
        chunk_size: int = 65536,
        user_agent: str = "fleetloop-agent",
        ca: Path | None = None,
    ):
        self.timeout_s = timeout_s
        self.chunk_size = chunk_size
        self.user_agent = user_agent
        self._ssl = ssl.create_default_context()
        if ca is not None:
            try:
                self._ssl.load_verify_locations(cafile=str(ca))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot load the cloud CA {ca}: {exc}") from None

    def fetch_range(self, url: str, start: int, max_bytes: int) -> Iterator[bytes]:
        scheme = urllib.parse.urlsplit(url).scheme
        if scheme not in ("http", "https"):
            raise ConfigError(f"artifact URL {url!r} must be http or https")
        headers = {"User-Agent": self.user_agent, "Accept-Encoding": "identity"}
        if start > 0:
            headers["Range"] = f"bytes={start}-"
        request = urllib.request.Request(url, headers=headers, method="GET")
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout_s, context=self._ssl)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code in (404, 410):
                raise NotFoundError(f"artifact not found: {url} (HTTP {exc.code})") from None
            raise UnavailableError(f"artifact server answered HTTP {exc.code} for {url}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:  # timeouts are OSError
            reason = getattr(exc, "reason", exc)
            raise UnavailableError(f"artifact server unreachable for {url}: {reason}") from None
        return self._stream(response, url, start, max_bytes)

    def _stream(
        self, response: http.client.HTTPResponse, url: str, start: int, max_bytes: int
    ) -> Iterator[bytes]:
        with response:
            skip = self._bytes_to_skip(response, url, start)
            length = response.getheader("Content-Length")
            expected = int(length) - skip if length and length.isdigit() else None
            sent = 0
            try:
                while sent < max_bytes:
                    chunk = response.read(self.chunk_size)
                    if not chunk:
                        break
                    if skip:
                        dropped = min(skip, len(chunk))
                        chunk, skip = chunk[dropped:], skip - dropped
                        if not chunk:
                            continue
                    chunk = chunk[: max_bytes - sent]
                    sent += len(chunk)
                    yield chunk
            except (OSError, http.client.HTTPException) as exc:
                raise UnavailableError(
                    f"download of {url} broke off after {start + sent} bytes: {exc}"
                ) from None
            if sent < max_bytes and expected is not None and sent < expected:
                raise UnavailableError(
                    f"download of {url} broke off after {start + sent} bytes (connection closed early)"
                )

    @staticmethod
    def _bytes_to_skip(response: http.client.HTTPResponse, url: str, start: int) -> int:
        """How many leading bytes to drop: a server that ignores Range sends the file from byte 0."""
        if response.status == 206:
            match = _CONTENT_RANGE_RE.fullmatch((response.getheader("Content-Range") or "").strip())
            if not match or int(match.group(1)) != start:
                raise UnavailableError(
                    f"artifact server sent the wrong range for {url} (wanted from {start})"
                )
            return 0
        if response.status == 200:
            return start
        raise UnavailableError(f"artifact server answered HTTP {response.status} for {url}")


def download(
    fetcher: Fetcher,
    url: str,
    dest: Path,
    *,
    expected_size: int,
    expected_sha256: str,
    progress: Callable[[int], None] | None = None,
    chunk_size: int = 65536,
    max_bytes_per_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Bring ``dest`` to the exact ``expected_size`` bytes with ``expected_sha256``, resuming what is there.

    An existing ``dest`` is taken as the first bytes of the artifact (resume). More bytes than
    ``expected_size`` from the server → ArtifactVerificationError and the file is deleted; a wrong hash →
    the same; a connection that ends early → UnavailableError with the partial file kept for next time.
    ``progress`` gets the number of bytes on disk after each write of at most ``chunk_size`` bytes.
    ``max_bytes_per_s`` caps the average rate of this call (a metered or shared link): after each piece
    the download sleeps until it is back under the cap.
    """
    if max_bytes_per_s is not None and max_bytes_per_s <= 0:
        raise ConfigError(f"download rate limit must be positive, got {max_bytes_per_s}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = dest.stat().st_size if dest.exists() else 0
    if have > expected_size:
        dest.unlink()
        have = 0
    started_at, started_have = clock(), have
    if have < expected_size:
        with dest.open("ab") as out:
            try:
                # ask for one byte more than we need: if it comes, the server is lying about the size
                for chunk in fetcher.fetch_range(url, have, expected_size - have + 1):
                    if have + len(chunk) > expected_size:
                        raise ArtifactVerificationError(
                            f"artifact server sent more than the signed {expected_size} bytes for {url}"
                        )
                    for offset in range(0, len(chunk), chunk_size):
                        piece = chunk[offset : offset + chunk_size]
                        out.write(piece)
                        have += len(piece)
                        if progress is not None:
                            progress(have)
                        if max_bytes_per_s is not None:
                            ahead = (have - started_have) / max_bytes_per_s - (clock() - started_at)
                            if ahead > 0:
                                sleep(ahead)
            except ArtifactVerificationError:
                out.close()
                dest.unlink(missing_ok=True)
                raise
            finally:
                if not out.closed:
                    out.flush()
                    os.fsync(out.fileno())
    if have < expected_size:
        raise UnavailableError(f"download of {url} stopped at {have} of {expected_size} bytes")
    actual = sha256_file(dest)
    if actual != expected_sha256:
        dest.unlink(missing_ok=True)
        raise ArtifactVerificationError(f"payload hash mismatch: expected {expected_sha256}, got {actual}")
