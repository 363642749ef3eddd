"""Overflow policies for bounded queues, named once so every queue says which one it uses."""

from __future__ import annotations

import queue
from typing import TypeVar

T = TypeVar("T")


def put_drop_oldest(q: queue.Queue[T], item: T) -> int:
    """Put ``item`` into ``q``; when full, drop the oldest entries first. Returns how many were dropped.

    For outboxes of control messages, where the newest state matters more than a stale one and a
    producer must never block on a slow or absent consumer.
    """
    dropped = 0
    while True:
        try:
            q.put_nowait(item)
            return dropped
        except queue.Full:
            try:
                q.get_nowait()
                dropped += 1
            except queue.Empty:
                pass
