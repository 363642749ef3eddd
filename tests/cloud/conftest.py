"""Fixtures of the cloud tests: a real coordinator in the test process (gRPC and HTTP on free loopback
ports), a private PostgreSQL (initdb + pg_ctl, one per session, a fresh database per test), and the
metadata repositories on each backend — the in-memory fakes, a SQLite file and PostgreSQL — so one
contract suite proves all three behave the same."""

from __future__ import annotations

import importlib.util
import itertools
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg
import pytest

from fleetloop_cloud.grpc_api import start_grpc_server
from fleetloop_cloud.http_api import start_http_server
from fleetloop_cloud.repositories import Repositories, memory_repositories, open_repositories
from fleetloop_cloud.server import Coordinator

_spec = importlib.util.spec_from_file_location(
    "fleetloop_test_postgres", Path(__file__).resolve().parents[1] / "fixtures" / "postgres_server.py"
)
assert _spec is not None and _spec.loader is not None
pg_fixture = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = pg_fixture
_spec.loader.exec_module(pg_fixture)
_databases = itertools.count()


@dataclass
class RunningCoordinator:
    coordinator: Coordinator
    grpc_target: str
    http_base: str
    channel: grpc.Channel
    #: The admin token ``cloud init`` would print: what the tests' HTTP calls authenticate with.
    token: str

    def call(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
        *, token: str | None = "admin",
    ) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
        """One HTTP request (with the admin token unless ``token`` says another, or None for none):
        status, headers, body."""
        return http_call(self.http_base, method, path, body, headers,
                         token=self.token if token == "admin" else token)  # fmt: skip


def http_call(
    base: str, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
    *, token: str | None = None,
) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    req = urllib.request.Request(base + path, data=body, method=method, headers=headers or {})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.fixture
def running_coordinator(tmp_path: Path) -> Iterator[RunningCoordinator]:
    c = Coordinator(tmp_path / "cloud")
    token = c.tokens.bootstrap(c.clock()).secret
    gserver, gport = start_grpc_server(c, "127.0.0.1", 0)
    hserver, hport = start_http_server(c, "127.0.0.1", 0)
    c.jobs.artifact_base_url = f"http://127.0.0.1:{hport}"
    c.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{gport}")
    try:
        yield RunningCoordinator(c, f"127.0.0.1:{gport}", f"http://127.0.0.1:{hport}", channel, token)
    finally:
        channel.close()
        c.stop()
        gserver.stop(grace=0).wait(2)
        hserver.shutdown()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A private PostgreSQL server for the whole session."""
    if pg_fixture.pg_bin_dir() is None:
        pytest.fail("PostgreSQL is not installed; .ci/run installs it (apt-get install postgresql)")
    with pg_fixture.private_postgres() as url:
        yield url


@pytest.fixture
def pg_url(pg_server: str) -> str:
    """A fresh, empty database on the session's server."""
    name = f"t{next(_databases)}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return pg_server.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(params=["sqlite", "postgres"])
def sql_location(request: pytest.FixtureRequest, tmp_path: Path) -> str | Path:
    """Where a SQL metadata database lives: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path / "meta" / "metadata.sqlite"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def repos(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Repositories]:
    """Every repository on one backend: the in-memory fakes, SQLite or PostgreSQL."""
    if request.param == "memory":
        r = memory_repositories()
    elif request.param == "sqlite":
        r = open_repositories(tmp_path / "meta" / "metadata.sqlite")
    else:
        r = open_repositories(request.getfixturevalue("pg_url"))
    try:
        yield r
    finally:
        r.close()
