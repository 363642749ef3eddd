"""Every policy example in docs/privacy.md is a valid campaign (a whole document, or ``spec`` fields)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from fleetloop_shared.rules import parse_campaign

DOC = Path(__file__).resolve().parents[2] / "docs" / "privacy.md"
HEAD = """apiVersion: fleetloop/v1
kind: Campaign
metadata: {name: t, version: 1}
spec:
  trigger: {when: "Vehicle.Speed > 1"}
"""


def test_every_example_in_the_privacy_guide_reads_as_a_policy() -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) >= 6
    for block in blocks:
        text = block if block.startswith("apiVersion") else HEAD + textwrap.indent(block, "  ")
        assert parse_campaign(text, str(DOC)).privacy is not None, block
