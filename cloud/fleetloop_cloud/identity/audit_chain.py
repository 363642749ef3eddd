"""The audit log's hash chain: each entry carries the hash of the one before, so editing, removing or
inserting an entry anywhere but at the end breaks every hash after it.

The hash covers a canonical JSON of every field of the entry (sorted keys, no whitespace) including the
previous hash; the first entry's previous hash is :data:`GENESIS`. :func:`verify` walks the entries in
order and names the first one that does not hold. A chain only shows tampering *inside* it: cutting
entries off the end leaves a shorter valid chain, which is why ``audit verify`` prints the head hash
and sequence number for the operator to compare with one noted earlier.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

GENESIS = "0" * 64
#: The fields an entry's hash covers, in the stored entry's terms.
FIELDS = (
    "seq", "at", "actor", "role", "transport", "address", "request_id", "action", "target",
    "before", "after", "detail", "prev_hash",
)  # fmt: skip


def entry_hash(fields: Mapping[str, Any]) -> str:
    """The hash of one entry: SHA-256 of its canonical JSON (``prev_hash`` included)."""
    doc = {k: fields[k] for k in FIELDS}
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    entries: int
    #: The last entry's sequence number and hash: what to note down and compare later.
    head_seq: int
    head_hash: str
    #: The first entry that breaks the chain, and why.
    broken_at: int | None = None
    reason: str = ""


def verify(entries: Iterable[Mapping[str, Any]]) -> ChainReport:
    """Check a whole chain, oldest first: sequence numbers without gaps from 1, each ``prev_hash`` the
    hash of the entry before, each ``hash`` the hash of its own fields."""
    prev, count, seq = GENESIS, 0, 0
    for e in entries:
        count += 1
        expected_seq = seq + 1
        seq = int(e["seq"])
        if seq != expected_seq:
            return ChainReport(False, count, seq, prev, seq, f"entry {expected_seq} is missing")
        if e["prev_hash"] != prev:
            return ChainReport(
                False, count, seq, prev, seq, f"entry {seq} does not follow entry {seq - 1}"
            )
        actual = entry_hash(e)
        if e["hash"] != actual:
            return ChainReport(
                False, count, seq, prev, seq, f"entry {seq} was changed after it was written"
            )
        prev = actual
    return ChainReport(True, count, seq, prev)
