"""``fleetloop catalog import --dbc FILE | --vspec FILE``: a signal catalog (VSS-shaped: paths, datatypes,
units) from a DBC or a COVESA VSS specification, in the file shape ``rules validate --catalog`` reads
and ``fleetloop catalog push FLEET FILE`` pre-registers (each path gets its fleet-wide id before any
device says hello); ``fleetloop catalog list FLEET`` shows a fleet's ids, paths, datatypes and units.

From a DBC every signal becomes ``PREFIX.MESSAGE.SIGNAL`` (the name an agent gives an unmapped DBC
signal, ``CAN`` by default) with the datatype the CAN sources store it as (``float64`` when scaled or
IEEE float, else ``int64``) and its ``source`` (``MESSAGE.SIGNAL``, the key of a source's ``mapping:``);
from a vspec every sensor, actuator and attribute keeps its path, unit and datatype.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fleetloop_cli.catalog_files import read_catalog_entries
from fleetloop_cli.client import client_from_args, cloud_command
from fleetloop_cli.output import emit, render_object, render_records
from fleetloop_shared.errors import NotFoundError, UserError


def _from_dbc(path: Path, prefix: str) -> list[dict[str, Any]]:
    from fleetloop_shared.dbc import load_dbc

    db = load_dbc(path)
    out = []
    for message in db.message_names():
        for name, unit, is_float in db.signals_of(message):
            out.append(
                {
                    "path": ".".join(p for p in (prefix, message, name) if p),
                    "data_type": "float64" if is_float else "int64",
                    "unit": unit,
                    "source": f"{message}.{name}",
                }
            )
    return out


def _from_vspec(path: Path, prefix: str) -> list[dict[str, Any]]:
    from fleetloop_shared.vspec import read_vspec

    out = []
    for s in read_vspec(path):
        entry = {"path": ".".join(p for p in (prefix, s.path) if p), "data_type": s.data_type.name.lower()}
        entry |= {"unit": s.unit, "kind": s.kind}
        if s.description:
            entry["description"] = s.description
        out.append(entry)
    return out


def cmd_catalog_import(args: argparse.Namespace) -> int:
    if bool(args.dbc) == bool(args.vspec):
        raise UserError("catalog import: give exactly one of --dbc FILE or --vspec FILE")
    path = Path(args.dbc or args.vspec)
    if not path.is_file():
        raise NotFoundError(f"{path}: no such file")
    if args.dbc:
        signals = _from_dbc(path, "CAN" if args.prefix is None else args.prefix)
    else:
        signals = _from_vspec(path, args.prefix or "")
    # Each signal's class as the cloud would assign it by default (edit it, and give the file to the
    # coordinator as its classification: classification.file)
    from fleetloop_shared.classification import Classification

    defaults = Classification()
    for s in signals:
        s["class"] = defaults.classify("*", s["path"]).value
    seen: dict[str, int] = {}
    for i, s in enumerate(signals):
        if s["path"] in seen:
            raise UserError(f"{path}: two signals would have the path {s['path']!r}")
        seen[s["path"]] = i
    text = render_object({"signals": signals}, args.output)
    if args.out:
        Path(args.out).write_text(text if text.endswith("\n") else text + "\n")
        print(f"{args.out}: {len(signals)} signals", flush=True)
    else:
        print(text, flush=True)
    return 0


def read_catalog_file(path: Path) -> list[dict[str, Any]]:
    """The signals of a catalog file, each checked here so a mistake is named at its FILE:LINE:COL
    before anything is sent; only path, datatype and unit travel."""
    from fleetloop_cloud.services.catalogs import catalog_file_signals, catalog_signal
    from fleetloop_shared.yaml_marks import location

    out = []
    for i, entry in enumerate(read_catalog_entries(path)):
        where = (location(entry) if isinstance(entry, dict) else "").rstrip(": ") or f"{path}: signals[{i}]"
        name, dtype, unit = catalog_signal(entry, where)
        out.append({"path": name, "data_type": dtype.name.lower(), "unit": unit})
    catalog_file_signals({"signals": out}, str(path))  # a path twice
    return out


def cmd_catalog_push(args: argparse.Namespace) -> int:
    signals = read_catalog_file(Path(args.file))
    result = client_from_args(args).post_json(f"/v1/fleets/{quote(args.fleet, safe='')}/catalog",
                                              {"signals": signals})  # fmt: skip
    for r in result["refused"]:
        print(f"refused: {r['path']}: {r['reason']}", file=sys.stderr)
    if args.output in ("table", "csv"):
        emit(render_records(result["signals"], args.output, ["id", "path", "data_type", "unit"]))
        print(f"fleet {result['fleet']}: {result['added']} signals added, {len(result['refused'])} refused",
              file=sys.stderr)  # fmt: skip
    else:
        emit(render_object(result, args.output))
    return 1 if result["refused"] else 0


def cmd_catalog_list(args: argparse.Namespace) -> int:
    result = client_from_args(args).get(f"/v1/fleets/{quote(args.fleet, safe='')}/catalog")
    if args.output in ("table", "csv"):
        emit(render_records(result["signals"], args.output, ["id", "path", "data_type", "unit"]))
    else:
        emit(render_object(result, args.output))
    return 0


def register(groups: dict[str, Any], with_cloud: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``catalog import | push | list`` (a new top-level group)."""
    catalog = groups["top"].add_parser(
        "catalog", help="signal catalogs: import from a DBC or a VSS vspec, a fleet's ids in the cloud"
    )
    sub = catalog.add_subparsers(dest="sub", required=True)
    s = sub.add_parser("import", help="a catalog file (for rules validate --catalog) from a DBC or a vspec")
    s.add_argument("--dbc", help="a DBC: each signal as PREFIX.MESSAGE.SIGNAL")
    s.add_argument("--vspec", help="a COVESA VSS .vspec (with its #include files)")
    s.add_argument("--prefix", help="path prefix (DBC default: CAN; vspec default: none)")
    s.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml")
    s.add_argument("--out", help="write the catalog to this file instead of printing it")
    s.set_defaults(func=cmd_catalog_import)
    s = cloud_command(
        sub, "push", cmd_catalog_push, help="pre-register a catalog file's signals in a fleet (operator)"
    )
    s.add_argument("fleet", help="the fleet whose catalog takes the signals")
    s.add_argument("file", help="a catalog file (catalog import's output, YAML or JSON)")
    s = cloud_command(sub, "list", cmd_catalog_list, help="a fleet's catalog: ids, paths, datatypes, units")
    s.add_argument("fleet")
