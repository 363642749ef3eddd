"""The worked examples of docs/sources.md for the CAN kinds use exactly the keys the agent accepts, and
the replay examples run as written against the real recordings."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from fleetloop_agent.sources import build_source
from fleetloop_agent.sources.can_config import KEYS
from fleetloop_shared.catalog import Catalog

DOC = Path(__file__).resolve().parents[2] / "docs" / "sources.md"


def _examples() -> list[dict[str, object]]:
    entries: list[dict[str, object]] = []
    for block in re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.S):
        doc = yaml.safe_load(block if block.lstrip().startswith("sources:") else "sources:\n" + block)
        entries += [e for e in doc["sources"] if e.get("kind") in KEYS]
    return entries


def test_every_documented_key_is_accepted() -> None:
    examples = _examples()
    assert {e["kind"] for e in examples} == set(KEYS)
    for entry in examples:
        unknown = set(entry) - set(KEYS[str(entry["kind"])])
        assert not unknown, f"{entry['name']}: {unknown}"


def test_documented_log_replay_runs(recordings: Path) -> None:
    (entry,) = [e for e in _examples() if e["kind"] == "can_log"]
    # the example's paths are relative to a config file next to the repository (../shared/data/real)
    # a directory beside shared/, so that ../shared/data/real is the recordings
    base = next(p for p in sorted(recordings.parents[2].iterdir()) if p.is_dir() and p.name != "shared")
    source = build_source(entry, base_dir=base, start_ns=0)
    source.declare(Catalog())
    assert sum(b.sample_count for b in source.read(5 * 1_000_000_000)) > 0
