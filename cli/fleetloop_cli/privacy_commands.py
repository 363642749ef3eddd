"""``fleetloop fleet retention get|set|clear`` and ``fleetloop devices erase|erasure``: how long a fleet's
data is kept, and the erasure of one device's data (docs/privacy.md). Both ask the coordinator; setting
a retention and erasing need an admin token, and both are in the audit log."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from fleetloop_cli.client import client_from_args, cloud_command
from fleetloop_cli.output import render_object


def _retention_path(fleet: str) -> str:
    return f"/v1/fleets/{quote(fleet, safe='')}/retention"


def _show(obj: Any, output: str) -> None:
    sys.stdout.write(render_object(obj, "json" if output == "json" else "yaml"))
    sys.stdout.flush()


def cmd_retention_get(args: argparse.Namespace) -> int:
    _show(client_from_args(args).get(_retention_path(args.fleet)), args.output)
    return 0


def cmd_retention_set(args: argparse.Namespace) -> int:
    body = f'{{"days": {int(args.days)}}}'.encode()
    _show(client_from_args(args).request("PUT", _retention_path(args.fleet), body=body), args.output)
    return 0


def cmd_retention_clear(args: argparse.Namespace) -> int:
    _show(client_from_args(args).request("DELETE", _retention_path(args.fleet)), args.output)
    return 0


def cmd_devices_erase(args: argparse.Namespace) -> int:
    status = client_from_args(args).post_json(f"/v1/devices/{quote(args.id, safe='')}/erase", {})
    _show(status, args.output)
    if status.get("state") != "done":
        print(f"device {args.id}: its data is erased from the store and the ledger; the erasure is "
              "confirmed by the coordinators' next pass (fleetloop devices erasure ID)",
              file=sys.stderr)  # fmt: skip
    return 0


def cmd_devices_erasure(args: argparse.Namespace) -> int:
    _show(client_from_args(args).get(f"/v1/devices/{quote(args.id, safe='')}/erasure"), args.output)
    return 0


def register(groups: dict[str, Any], with_cloud: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``fleet retention get|set|clear`` (a new top-level group) and ``devices erase|erasure``."""

    fleet = groups["top"].add_parser("fleet", help="fleet-wide settings: retention")
    retention = fleet.add_subparsers(dest="sub", required=True).add_parser(
        "retention", help="how many days a fleet's data is kept (docs/privacy.md)"
    )
    sub = retention.add_subparsers(dest="action", required=True)
    cloud_command(sub, "get", cmd_retention_get, help="the fleet's retention").add_argument("fleet")
    s = cloud_command(sub, "set", cmd_retention_set, help="keep the fleet's data N days (admin)")
    s.add_argument("fleet")
    s.add_argument("--days", type=int, required=True, help="days kept (today counts as one; UTC days)")
    cloud_command(
        sub, "clear", cmd_retention_clear, help="keep the fleet's data forever again (admin)"
    ).add_argument("fleet")
    devices = groups["devices"]
    s = cloud_command(devices, "erase", cmd_devices_erase,
                      help="erase every stored datum of one device (admin; its data from before now is "
                      "refused when it uploads again)")  # fmt: skip
    s.add_argument("id")
    cloud_command(
        devices, "erasure", cmd_devices_erasure, help="where a device's erasure stands"
    ).add_argument("id")
