"""Drop-oldest keeps the newest items, in order, and counts what it dropped."""

from __future__ import annotations

import queue

from hypothesis import given
from hypothesis import strategies as st

from fleetloop_shared.bounded import put_drop_oldest


@given(maxsize=st.integers(1, 8), items=st.lists(st.integers(), max_size=40))
def test_keeps_the_newest_in_order(maxsize: int, items: list[int]) -> None:
    q: queue.Queue[int] = queue.Queue(maxsize=maxsize)
    dropped = sum(put_drop_oldest(q, x) for x in items)
    kept = []
    while not q.empty():
        kept.append(q.get_nowait())
    assert kept == items[-maxsize:] if items else kept == []
    assert dropped == max(0, len(items) - maxsize)
