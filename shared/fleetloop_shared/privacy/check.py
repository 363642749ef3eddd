"""The cloud's second look: does an uploaded segment carry what its campaign's policy keeps on the device?

The agent applies the policy before storing (:mod:`.apply`); an older agent, a tampered one or a bug
could still send a dropped signal or a clear identifier. Ingest asks :func:`violations` before writing
anything and refuses the segment when the answer is not empty. Only what can be told from the segment
itself is checked: a dropped signal is present, or a hashed signal holds a value that is not a hashed
identifier (positions and times cannot be told apart from coarsened ones without the raw data).
"""

from __future__ import annotations

from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.privacy.keys import is_hashed
from fleetloop_shared.privacy.policy import PrivacyPolicy
from fleetloop_shared.segment import Segment


def violations(policy: PrivacyPolicy, segment: Segment, catalog: Catalog) -> list[str]:
    """What in ``segment`` breaks ``policy``, one sentence each (empty: nothing). Signal ids the catalog
    does not name are ingest's own check, not this one."""
    dropped = {s.id: s.path for s in catalog.match(policy.drop)} if policy.drop else {}
    hashed = {s.id: s.path for s in catalog.match(policy.hash)} if policy.hash else {}
    found: list[str] = []
    label = f"privacy policy {policy.name}@{policy.version}"
    for group in segment.groups():
        for sid, column in group.columns.items():
            if sid in dropped:
                found.append(f"signal {dropped[sid]} is dropped by {label}")
            elif sid in hashed:
                text = group.data_types.get(sid) == DataType.STRING
                if not text or not all(isinstance(v, str) and is_hashed(v) for v in column):
                    found.append(f"signal {hashed[sid]} carries a clear identifier; {label} hashes it")
    return sorted(set(found))
