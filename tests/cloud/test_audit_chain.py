"""The audit log is tamper-evident: on SQLite and PostgreSQL, an entry edited or removed in the
database afterwards breaks the hash chain, and both the coordinator's check and ``fleetloop audit
verify`` (which walks the chain itself, over the REST API) name the first entry that does not hold."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from fleetloop_cloud.http_api import start_http_server
from fleetloop_cloud.identity.audit_chain import GENESIS, entry_hash, verify
from fleetloop_cloud.repositories import memory_repositories
from fleetloop_cloud.repositories.records import AuditFilter, NewAuditEntry
from fleetloop_cloud.server import Coordinator
from fleetloop_cloud.services.access import Caller

LOCAL = Caller.local()
CAMPAIGN = """apiVersion: fleetloop/v1
kind: Campaign
metadata: {name: NAME, version: 1}
spec:
  trigger: {when: "Vehicle.Speed > 50"}
  collect: {signals: ["Vehicle.*"], pre: 1s, post: 1s}
"""


def run_sql(location: str | Path, sql: str) -> None:
    """What someone with the database's credentials could do behind the coordinator's back."""
    if isinstance(location, Path):
        with sqlite3.connect(location) as conn:
            conn.execute(sql)
    else:
        with psycopg.connect(location, autocommit=True) as conn:
            conn.execute(sql)  # type: ignore[arg-type]


@pytest.fixture
def audited(tmp_path: Path, sql_location: str | Path) -> Iterator[tuple[Coordinator, str | Path, str, str]]:
    db = None if isinstance(sql_location, Path) else sql_location
    c = Coordinator(tmp_path / "cloud", db=db)
    location: str | Path = tmp_path / "cloud" / "metadata.sqlite" if db is None else db
    token = c.tokens.bootstrap(c.clock()).secret  # entry 1
    for name in ("one", "two", "three"):  # entries 2..4
        c.campaigns.apply(LOCAL, CAMPAIGN.replace("NAME", name), now=c.clock())
    server, port = start_http_server(c, "127.0.0.1", 0)
    try:
        yield c, location, f"http://127.0.0.1:{port}", token
    finally:
        server.shutdown()
        c.stop()
        c.close()


def cli_verify(base: str, token: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, FLEETLOOP_TOKEN=token, FLEETLOOP_CLOUD=base)
    return subprocess.run([sys.executable, "-m", "fleetloop_cli.main", "audit", "verify"],
                          capture_output=True, text=True, timeout=120, env=env)  # fmt: skip


def test_an_edited_entry_breaks_the_chain(audited: tuple[Coordinator, str | Path, str, str]) -> None:
    c, location, base, token = audited
    report = c.audit.verify(LOCAL)
    assert report.ok and report.entries == 4 and report.head_seq == 4
    done = cli_verify(base, token)
    assert done.returncode == 0 and f"4 entries; head #4 {report.head_hash}" in done.stdout
    # someone rewrites who applied campaign "two"
    run_sql(location, "UPDATE audit_log SET actor = 'someone-else' WHERE seq = 3")
    broken = c.audit.verify(LOCAL)
    assert not broken.ok and broken.broken_at == 3 and "changed after it was written" in broken.reason
    done = cli_verify(base, token)
    assert done.returncode == 5, done.stderr
    assert "audit log broken at entry 3: entry 3 was changed after it was written" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_removed_entry_breaks_the_chain(audited: tuple[Coordinator, str | Path, str, str]) -> None:
    c, location, base, token = audited
    run_sql(location, "DELETE FROM audit_log WHERE seq = 2")
    broken = c.audit.verify(LOCAL)
    assert not broken.ok and broken.broken_at == 3 and broken.reason == "entry 2 is missing"
    assert cli_verify(base, token).returncode == 5
    # writing on after tampering does not mend it: the chain goes on from the head it finds
    c.campaigns.apply(LOCAL, CAMPAIGN.replace("NAME", "four"), now=c.clock())
    assert not c.audit.verify(LOCAL).ok


def test_entries_are_filtered_by_time_actor_and_kind() -> None:
    log = memory_repositories().audit_log
    for i, (actor, action) in enumerate([("a", "campaigns.apply"), ("b", "rollouts.create"),
                                         ("a", "rollouts.pause"), ("b", "tokens.create")]):  # fmt: skip
        log.append(NewAuditEntry(100.0 + i, actor, "admin", "http", "", f"r{i}", action, "t", "", "", ""))
    assert [e.seq for e in log.entries(AuditFilter(kind="rollouts"))] == [2, 3]
    assert [e.seq for e in log.entries(AuditFilter(actor="a"))] == [1, 3]
    assert [e.seq for e in log.entries(AuditFilter(since=102.0))] == [3, 4]
    assert [e.seq for e in log.entries(AuditFilter(after_seq=1, limit=2))] == [2, 3]
    assert [e.seq for e in log.entries(AuditFilter(kind="rollouts.create"))] == [2]
    assert [e.seq for e in log.entries(AuditFilter(kind="rollout"))] == []  # a kind is a whole name
    chain = [e.fields() for e in log.chain(0, 100)]
    assert chain[0]["prev_hash"] == GENESIS and chain[1]["prev_hash"] == entry_hash(chain[0])
    assert verify(chain).ok
    assert verify(chain[1:]).reason == "entry 1 is missing"
