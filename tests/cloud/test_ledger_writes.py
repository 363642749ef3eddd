"""The ingest ledger's rows written together: concurrent acks share one transaction, each still told
whether its segment was new, and a failed transaction fails every call in it (the devices retry)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fleetloop_cloud.repositories import open_repositories
from fleetloop_cloud.repositories.records import SegmentReceipt
from fleetloop_cloud.services.ingest import LedgerWrites
from fleetloop_shared.errors import UnavailableError


class HeldLedger:
    """The SQL ledger whose first transaction waits until the test lets it go (others queue behind)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.release = threading.Event()
        self.calls: list[int] = []
        self.fail = False

    def record_many(self, entries: Sequence[tuple[str, bytes, SegmentReceipt, float]]) -> list[bool]:
        self.calls.append(len(entries))
        if len(self.calls) == 1:
            assert self.release.wait(30)
        if self.fail:
            raise UnavailableError("the database went away")
        return list(self.inner.record_many(entries))


def receipt(i: int) -> SegmentReceipt:
    return SegmentReceipt(f"cap-{i % 3}", "braking", 5, 100, i * 1000, i * 1000 + 999)


def run_concurrently(ledger: LedgerWrites, held: HeldLedger, ids: list[int]) -> dict[int, Any]:
    results: dict[int, Any] = {}

    def one(k: int, i: int) -> None:
        try:
            results[k] = ledger.record(f"car-{i % 2}", i.to_bytes(16, "big"), receipt(i), 1000.0 + i)
        except UnavailableError as exc:
            results[k] = exc

    first = threading.Thread(target=one, args=(0, ids[0]))
    first.start()
    while not held.calls:
        time.sleep(0.001)
    rest = [threading.Thread(target=one, args=(k, i)) for k, i in enumerate(ids) if k]
    for t in rest:
        t.start()
    deadline = time.monotonic() + 30
    while len(ledger._queue) < len(rest):  # everyone queued behind the held transaction
        assert time.monotonic() < deadline
        time.sleep(0.001)
    held.release.set()
    for t in [first, *rest]:
        t.join(30)
    return results


def test_concurrent_acks_share_a_transaction_and_repeats_are_told_apart(tmp_path: Path) -> None:
    repos = open_repositories(tmp_path / "metadata.sqlite")
    held = HeldLedger(repos.segments)
    ledger = LedgerWrites(held)  # type: ignore[arg-type]
    ids = [*range(30), 3, 7]  # two segments sent twice at once
    results = run_concurrently(ledger, held, ids)
    assert held.calls == [1, 31]  # the first alone, then everyone who queued meanwhile
    assert ledger.counters == {"transactions": 2, "rows": 32}
    assert sum(results.values()) == 30
    assert [results[3], results[30]].count(True) == [results[7], results[31]].count(True) == 1
    totals = repos.segments.totals()
    assert (totals.segments, totals.samples, totals.captures) == (30, 3000, 6)
    assert not ledger.record("car-1", (5).to_bytes(16, "big"), receipt(5), 2000.0)  # a later retry
    repos.close()


def test_a_failed_transaction_fails_every_ack_in_it_and_the_next_one_writes(tmp_path: Path) -> None:
    repos = open_repositories(tmp_path / "metadata.sqlite")
    held = HeldLedger(repos.segments)
    held.fail = True
    ledger = LedgerWrites(held, max_rows=8)  # type: ignore[arg-type]
    results = run_concurrently(ledger, held, list(range(12)))
    assert held.calls == [1, 8, 3]  # bounded: what did not fit waited for the next transaction
    assert all(isinstance(r, UnavailableError) for r in results.values()) and len(results) == 12
    assert repos.segments.totals().segments == 0
    held.fail = False
    assert ledger.record("car-0", (4).to_bytes(16, "big"), receipt(4), 2000.0)
    assert repos.segments.totals().segments == 1


def test_the_memory_ledger_records_many_like_the_sql_one(tmp_path: Path) -> None:
    from fleetloop_cloud.repositories.segments import MemorySegments

    repos = open_repositories(tmp_path / "metadata.sqlite")
    entries = [("car-1", i.to_bytes(16, "big"), receipt(i), 1000.0 + i) for i in (1, 2, 1, 4)]
    memory = MemorySegments()
    assert memory.record_many(entries) == repos.segments.record_many(entries) == [True, True, False, True]
    assert memory.captures() == repos.segments.captures()
    assert repos.segments.record_many([]) == []
    repos.close()
