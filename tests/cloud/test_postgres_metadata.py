"""The metadata store on a real, private PostgreSQL (initdb + pg_ctl): the same code path as SQLite.

The SQLite suites' store-level tests (tests/cloud/test_metadata.py, test_rollout_controller.py) are run
again here, unchanged, against a fresh PostgreSQL database each.
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
import pytest

from fleetloop_cloud.metadata import MetadataStore
from fleetloop_shared.errors import ConfigError, UnavailableError

HERE = Path(__file__).resolve().parent


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


pg_fixture = _load("fleetloop_test_postgres", HERE.parent / "fixtures" / "postgres_server.py")
sqlite_metadata_tests = _load("fleetloop_test_metadata_on_pg", HERE / "test_metadata.py")
sqlite_rollout_tests = _load("fleetloop_test_rollouts_on_pg", HERE / "test_rollout_controller.py")
_counter = itertools.count()


@pytest.fixture(scope="module")
def pg_server() -> Iterator[str]:
    if pg_fixture.pg_bin_dir() is None:
        pytest.fail("PostgreSQL is not installed; .ci/run installs it (apt-get install postgresql)")
    with pg_fixture.private_postgres() as url:
        yield url


@pytest.fixture
def pg_url(pg_server: str) -> str:
    """A fresh, empty database on the shared private server."""
    name = f"t{next(_counter)}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return pg_server.rsplit("/", 1)[0] + "/" + name


def _store_tests(module: ModuleType) -> list[tuple[str, Callable[..., Any]]]:
    out = []
    for name, fn in vars(module).items():
        if name.startswith("test_") and list(inspect.signature(fn).parameters) == ["store"]:
            out.append((name, fn))
    return out


@pytest.mark.parametrize(
    ("name", "test"), _store_tests(sqlite_metadata_tests), ids=lambda v: v if isinstance(v, str) else ""
)
def test_metadata_suite_on_postgres(name: str, test: Callable[[MetadataStore], None], pg_url: str) -> None:
    test(MetadataStore(pg_url))


@pytest.mark.parametrize(
    ("name", "test"), _store_tests(sqlite_rollout_tests), ids=lambda v: v if isinstance(v, str) else ""
)
def test_rollout_suite_on_postgres(name: str, test: Callable[[MetadataStore], None], pg_url: str) -> None:
    store = MetadataStore(pg_url)
    sqlite_rollout_tests.put_release(store)
    for i in range(3):
        sqlite_rollout_tests.add_device(store, f"car-{i}")
    test(store)


def test_state_is_shared_between_two_stores(pg_url: str) -> None:
    a, b = MetadataStore(pg_url), MetadataStore(pg_url)
    a.upsert_device("car-1", fleet="f", labels={}, catalog=[], agent_version="1", data_origin="x", now=1.0)
    assert b.device("car-1") is not None
    sid = b"\x01" * 16
    kw: dict[str, Any] = dict(
        capture_id="c", campaign="k", priority=1, samples=5, first_ns=1, last_ns=2, now=3.0
    )
    assert a.record_segment("car-1", sid, **kw)
    assert not b.record_segment("car-1", sid, **kw)
    assert a.put_campaign("x", "doc", 1.0) == 1 and b.put_campaign("y", "doc", 1.0) == 2


def test_unreachable_and_wrong_databases_are_one_line_errors(pg_server: str) -> None:
    with pytest.raises(UnavailableError) as exc:
        MetadataStore("postgresql://fleetloop:secret@127.0.0.1:1/nothing")
    assert "secret" not in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises((UnavailableError, ConfigError)):
        MetadataStore(pg_server.rsplit("/", 1)[0] + "/no_such_database")
