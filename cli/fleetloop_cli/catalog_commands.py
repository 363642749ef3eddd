"""``fleetloop catalog import --dbc FILE | --vspec FILE``: a signal catalog (VSS-shaped: paths, datatypes,
units) from a DBC or a COVESA VSS specification, in the file shape ``rules validate --catalog`` reads.

From a DBC every signal becomes ``PREFIX.MESSAGE.SIGNAL`` (the name an agent gives an unmapped DBC
signal, ``CAN`` by default) with the datatype the CAN sources store it as (``float64`` when scaled or
IEEE float, else ``int64``) and its ``source`` (``MESSAGE.SIGNAL``, the key of a source's ``mapping:``);
from a vspec every sensor, actuator and attribute keeps its path, unit and datatype.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fleetloop_cli.output import render_object
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


def register(groups: dict[str, Any], with_cloud: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``catalog import`` (a new top-level group)."""
    catalog = groups["top"].add_parser("catalog", help="signal catalogs: import from a DBC or a VSS vspec")
    sub = catalog.add_subparsers(dest="sub", required=True)
    s = sub.add_parser("import", help="a catalog file (for rules validate --catalog) from a DBC or a vspec")
    s.add_argument("--dbc", help="a DBC: each signal as PREFIX.MESSAGE.SIGNAL")
    s.add_argument("--vspec", help="a COVESA VSS .vspec (with its #include files)")
    s.add_argument("--prefix", help="path prefix (DBC default: CAN; vspec default: none)")
    s.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml")
    s.add_argument("--out", help="write the catalog to this file instead of printing it")
    s.set_defaults(func=cmd_catalog_import)
