"""``fleetloop store ...``: inspect and fill a device's local store (the store issue adds commands)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def register(groups: dict[str, Any], with_cloud: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add this area's subcommands to the parser groups (``top``, ``rules``, ``sim``, ``artifacts``).

    A new top-level group (``store``) is created from ``groups["top"]``.
    """
