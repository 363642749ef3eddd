"""Resumable artifact download against a real local HTTP server that speaks Range."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetloop_agent.ota.download import HttpFetcher, download
from fleetloop_shared.errors import ArtifactVerificationError, ConfigError, NotFoundError, UnavailableError
from tests.fixtures.http_range import send_head

PAYLOAD = hashlib.sha256(b"seed").digest() * 9000 + b"tail"  # ~288 KB, not a multiple of the chunk size
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class ArtifactServer:
    """A tiny artifact server: files by path, Range support, and knobs to misbehave."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.ranges: list[str | None] = []
        self.cut_next: int | None = None  # send only this many body bytes in the next response, then close
        self.ignore_range = False
        self.extra_bytes = 0  # append this many bytes beyond the file (endless-data server)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = server.files.get(self.path)
                range_header = self.headers.get("Range")
                server.ranges.append(range_header)
                if body is None:
                    self.send_error(404)
                    return
                body = body + b"\xee" * server.extra_bytes
                match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
                start = int(match.group(1)) if match and not server.ignore_range else None
                if start is not None and start >= len(body):
                    self.send_error(416)
                    return
                send_head(self, len(body), start)
                data = body[start or 0 :]
                if server.cut_next is not None:
                    data, server.cut_next = data[: server.cut_next], None
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def download_payload(server: ArtifactServer, dest: Path) -> None:
    """The payload from ``server`` into ``dest``, checked against its signed size and hash."""
    download(
        HttpFetcher(),
        server.url("/files/payload"),
        dest,
        expected_size=len(PAYLOAD),
        expected_sha256=PAYLOAD_SHA,
    )


@pytest.fixture
def server() -> Iterator[ArtifactServer]:
    srv = ArtifactServer()
    srv.files["/files/payload"] = PAYLOAD
    yield srv
    srv.close()


def test_fresh_download_writes_the_exact_bytes(server: ArtifactServer, tmp_path: Path) -> None:
    seen: list[int] = []
    dest = tmp_path / "p.bin"
    download(
        HttpFetcher(), server.url("/files/payload"), dest,
        expected_size=len(PAYLOAD), expected_sha256=PAYLOAD_SHA, progress=seen.append, chunk_size=10_000,
    )  # fmt: skip
    assert dest.read_bytes() == PAYLOAD
    assert server.ranges == [None]
    assert (
        seen[-1] == len(PAYLOAD)
        and seen == sorted(seen)
        and max(b - a for a, b in zip([0, *seen], seen, strict=False)) <= 10_000
    )


def test_cut_download_resumes_with_a_range_request(server: ArtifactServer, tmp_path: Path) -> None:
    dest = tmp_path / "p.bin"
    url = server.url("/files/payload")
    server.cut_next = 100_000
    with pytest.raises(UnavailableError, match="broke off after 100000 bytes"):
        download(HttpFetcher(), url, dest, expected_size=len(PAYLOAD), expected_sha256=PAYLOAD_SHA)
    assert dest.stat().st_size == 100_000  # the partial file is the resume point
    download(HttpFetcher(), url, dest, expected_size=len(PAYLOAD), expected_sha256=PAYLOAD_SHA)
    assert server.ranges == [None, "bytes=100000-"]
    assert dest.read_bytes() == PAYLOAD


def test_resume_against_a_server_that_ignores_range(server: ArtifactServer, tmp_path: Path) -> None:
    dest = tmp_path / "p.bin"
    dest.write_bytes(PAYLOAD[:50_000])
    server.ignore_range = True
    download_payload(server, dest)
    assert dest.read_bytes() == PAYLOAD


def test_complete_file_is_only_hash_checked(server: ArtifactServer, tmp_path: Path) -> None:
    dest = tmp_path / "p.bin"
    dest.write_bytes(PAYLOAD)
    download_payload(server, dest)
    assert server.ranges == []


def test_oversized_leftover_is_discarded(server: ArtifactServer, tmp_path: Path) -> None:
    dest = tmp_path / "p.bin"
    dest.write_bytes(PAYLOAD + b"junk")
    download_payload(server, dest)
    assert dest.read_bytes() == PAYLOAD and server.ranges == [None]


def test_endless_data_is_refused_and_never_written(server: ArtifactServer, tmp_path: Path) -> None:
    dest = tmp_path / "p.bin"
    server.extra_bytes = 5_000_000
    with pytest.raises(ArtifactVerificationError, match="more than the signed"):
        download_payload(server, dest)
    assert not dest.exists()


def test_wrong_bytes_are_deleted_after_the_hash_check(server: ArtifactServer, tmp_path: Path) -> None:
    dest = tmp_path / "p.bin"
    server.files["/files/payload"] = PAYLOAD[:-1] + b"X"
    with pytest.raises(
        ArtifactVerificationError, match=f"payload hash mismatch: expected {PAYLOAD_SHA}, got "
    ):
        download_payload(server, dest)
    assert not dest.exists()


def test_short_file_on_the_server_keeps_the_partial_download(server: ArtifactServer, tmp_path: Path) -> None:
    dest = tmp_path / "p.bin"
    server.files["/files/payload"] = PAYLOAD[:1000]
    with pytest.raises(UnavailableError, match="stopped at 1000 of"):
        download_payload(server, dest)
    assert dest.stat().st_size == 1000


def test_transport_errors_map_to_the_error_tree(server: ArtifactServer, tmp_path: Path) -> None:
    dest = tmp_path / "p.bin"
    with pytest.raises(NotFoundError, match="artifact not found"):
        download(HttpFetcher(), server.url("/nope"), dest, expected_size=10, expected_sha256="0" * 64)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UnavailableError, match="unreachable"):
        download(
            HttpFetcher(timeout_s=2),
            f"http://127.0.0.1:{port}/x",
            dest,
            expected_size=10,
            expected_sha256="0" * 64,
        )
    with pytest.raises(ConfigError, match="must be http or https"):
        download(HttpFetcher(), f"file://{dest}", dest, expected_size=10, expected_sha256="0" * 64)


def test_a_silent_server_times_out(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # accepts the connection, never answers
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/x"
        with pytest.raises(UnavailableError):
            download(
                HttpFetcher(timeout_s=0.3), url, tmp_path / "p", expected_size=10, expected_sha256="0" * 64
            )


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(1, 120_000), max_size=4))
def test_any_sequence_of_cuts_ends_with_the_exact_file(
    server: ArtifactServer, tmp_path_factory: pytest.TempPathFactory, cuts: list[int]
) -> None:
    dest = tmp_path_factory.mktemp("cuts") / "p.bin"
    url = server.url("/files/payload")
    for cut in cuts:
        server.cut_next = cut
        with contextlib.suppress(UnavailableError):
            download(HttpFetcher(), url, dest, expected_size=len(PAYLOAD), expected_sha256=PAYLOAD_SHA)
    server.cut_next = None
    download(HttpFetcher(), url, dest, expected_size=len(PAYLOAD), expected_sha256=PAYLOAD_SHA)
    assert dest.read_bytes() == PAYLOAD


def test_bandwidth_limit_keeps_the_average_rate_under_the_cap(server: ArtifactServer, tmp_path: Path) -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:  # a virtual clock: the limiter's arithmetic, not the machine's speed
        slept.append(s)
        now[0] += s

    rate = 50_000.0
    dest = tmp_path / "p.bin"
    download(
        HttpFetcher(), server.url("/files/payload"), dest,
        expected_size=len(PAYLOAD), expected_sha256=PAYLOAD_SHA, chunk_size=10_000,
        max_bytes_per_s=rate, clock=lambda: now[0], sleep=sleep,
    )  # fmt: skip
    assert dest.read_bytes() == PAYLOAD
    assert now[0] == pytest.approx(len(PAYLOAD) / rate)
    assert len(slept) >= -(-len(PAYLOAD) // 10_000)  # at least one pause per piece
    with pytest.raises(ConfigError, match="rate limit must be positive"):
        download(
            HttpFetcher(), server.url("/files/payload"), tmp_path / "q.bin",
            expected_size=len(PAYLOAD), expected_sha256=PAYLOAD_SHA, max_bytes_per_s=0,
        )  # fmt: skip
