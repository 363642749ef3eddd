"""``fleetloop rules ...``: validate campaigns offline, push them to the fleet, list them."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fleetloop_cli.client import client_from_args
from fleetloop_cli.output import emit, render_object, render_records
from fleetloop_shared.errors import FleetloopError, NotFoundError, UserError


def cmd_rules_validate(args: argparse.Namespace) -> int:
    from fleetloop_shared.catalog import Catalog
    from fleetloop_shared.rules import check_against_catalog, parse_campaign

    catalog = None
    if args.catalog:
        catalog = _load_catalog(Path(args.catalog))
    failures = 0
    for name in args.files:
        path = Path(name)
        try:
            if not path.is_file():
                raise NotFoundError(f"{path}: no such file")
            spec = parse_campaign(path.read_text(), source=str(path))
            if isinstance(catalog, Catalog):
                check_against_catalog(spec, catalog)
        except FleetloopError as exc:
            failures += 1
            print(str(exc), file=sys.stderr)
            continue
        emit(f"{path}: ok (campaign {spec.name} v{spec.version})")
    return 2 if failures else 0


def _load_catalog(path: Path) -> Any:
    from fleetloop_shared.catalog import Catalog

    if not path.is_file():
        raise NotFoundError(f"catalog {path}: no such file")
    try:
        doc = json.loads(path.read_text())
        return Catalog.from_records(doc["signals"] if isinstance(doc, dict) else doc)
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"catalog {path}: not a catalog JSON ({exc})") from None


def cmd_rules_apply(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    path = Path(args.file)
    if not path.is_file():
        raise NotFoundError(f"{path}: no such file")
    result = client_from_args(args).request(
        "POST", f"/v1/campaigns?source={quote(str(path))}", body=path.read_bytes(), content_type="text/yaml"
    )
    emit(render_object(result, "yaml" if args.output == "yaml" else "json"))
    return 0


def cmd_rules_get(args: argparse.Namespace) -> int:
    doc = client_from_args(args).get("/v1/campaigns")
    recs = [{"name": c["name"], "version": c["version"]} for c in doc["campaigns"]]
    emit(render_records(recs, args.output, ["name", "version"]))
    return 0


def register(groups: dict[str, Any], with_cloud: Callable[[argparse.ArgumentParser], None]) -> None:
    rules = groups["rules"]
    s = rules.add_parser("validate", help="check campaign files offline")
    s.add_argument("files", nargs="+")
    s.add_argument("--catalog", help="catalog JSON: check signal names too")
    s.set_defaults(func=cmd_rules_validate)
    s = rules.add_parser("apply", help="validate and push a campaign to the fleet")
    s.add_argument("file")
    with_cloud(s)
    s.set_defaults(func=cmd_rules_apply)
    s = rules.add_parser("get", help="list the fleet's campaigns")
    with_cloud(s)
    s.set_defaults(func=cmd_rules_get)
