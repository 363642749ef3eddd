"""``fleetloop rules ...``: validate campaigns offline, replay samples through them, push them, list them.

``rules test`` and ``rules eval`` run the agent's own trigger engine and evaluator over a CSV of samples,
so what an operator tries on a laptop is exactly what fires in the machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from fleetloop_cli.client import client_from_args
from fleetloop_cli.output import FORMATS, emit, render_object, render_records
from fleetloop_shared.errors import FleetloopError, NotFoundError, RuleError, UserError


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


_INT = re.compile(r"[+-]?\d+")
_MAX_CSV_BYTES = 512 * 1024 * 1024


@dataclass
class _Samples:
    """Samples read from a CSV, per signal path, in file order; ``seconds`` = the file's time unit."""

    seconds: bool
    by_path: dict[str, tuple[list[int], list[object]]]
    lines: dict[str, int]  # first line of each signal, for messages


def _parse_time(text: str, seconds: bool, where: str) -> int:
    try:
        if seconds:
            ns = Decimal(text.strip()) * 1_000_000_000
            if not ns.is_finite() or ns != ns.to_integral_value():
                raise InvalidOperation
            return int(ns)
        if not _INT.fullmatch(text.strip()):
            raise InvalidOperation
        return int(text.strip())
    except InvalidOperation:
        unit = "seconds" if seconds else "whole nanoseconds"
        raise UserError(f"{where}: time {text!r} is not a number of {unit}") from None


def _parse_value(text: str, where: str) -> object:
    raw = text.strip()
    if raw in ("true", "false"):
        return raw == "true"
    if _INT.fullmatch(raw):
        number = int(raw)
        if not -(2**63) <= number < 2**63:
            raise UserError(f"{where}: integer {raw} does not fit in 64 bits")
        return number
    try:
        value = float(raw)
    except ValueError:
        return raw
    if math.isnan(value) and raw.lower() not in ("nan", "+nan", "-nan"):
        return raw
    return value


def _read_samples(path: Path) -> _Samples:
    if not path.is_file():
        raise NotFoundError(f"{path}: no such file")
    if path.stat().st_size > _MAX_CSV_BYTES:
        raise UserError(f"{path}: larger than {_MAX_CSV_BYTES // (1024 * 1024)} MiB")
    by_path: dict[str, tuple[list[int], list[object]]] = {}
    lines: dict[str, int] = {}
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise UserError(f"{path}: empty file; expected the header t,signal,value") from None
        except csv.Error as exc:
            raise UserError(f"{path}:1: {exc}") from None
        if header not in (["t", "signal", "value"], ["t_ns", "signal", "value"]):
            raise UserError(
                f"{path}:1: header must be t,signal,value or t_ns,signal,value, got {','.join(header)}"
            )
        seconds = header[0] == "t"
        try:
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(row) != 3:
                    raise UserError(f"{where}: expected 3 fields (t,signal,value), got {len(row)}")
                t = _parse_time(row[0], seconds, where)
                signal = row[1].strip()
                if not signal:
                    raise UserError(f"{where}: empty signal name")
                value = _parse_value(row[2], where)
                if isinstance(value, str):
                    raise UserError(
                        f"{where}: value {value!r} of {signal} is text; signals hold numbers or true/false"
                    )
                times, values = by_path.setdefault(signal, ([], []))
                lines.setdefault(signal, reader.line_num)
                times.append(t)
                values.append(value)
        except csv.Error as exc:
            raise UserError(f"{path}:{reader.line_num}: {exc}") from None
    return _Samples(seconds, by_path, lines)


def _infer_catalog(samples: _Samples, source: Path) -> Any:
    from fleetloop_shared.catalog import Catalog, DataType

    catalog = Catalog()
    for signal, (_, values) in sorted(samples.by_path.items()):
        kinds = {type(v) for v in values}
        if kinds == {bool}:
            catalog.add(signal, DataType.BOOL)
        elif bool in kinds:
            raise UserError(
                f"{source}:{samples.lines[signal]}: signal {signal} mixes true/false with numbers"
            )
        elif kinds == {int}:
            catalog.add(signal, DataType.INT64)
        else:
            catalog.add(signal, DataType.FLOAT64)
    return catalog


def _batches(samples: _Samples, catalog: Any, source: Path) -> list[Any]:
    """One batch per signal (its own group), sorted by time; equal times keep file order."""
    import numpy as np

    from fleetloop_shared.catalog import DataType
    from fleetloop_shared.samples import GroupBatch

    batches = []
    for signal, (times, values) in samples.by_path.items():
        spec = catalog.get(signal)
        if spec is None:  # not in the given catalog: no rule can read it; say so (a typo in the input?)
            print(
                f"{source}:{samples.lines[signal]}: note: signal {signal} is not in the catalog; ignored",
                file=sys.stderr,
            )
            continue
        where = f"{source}:{samples.lines[signal]}"
        kinds = {type(v) for v in values}
        if spec.data_type is DataType.BOOL and kinds != {bool}:
            raise UserError(f"{where}: signal {signal} is true/false in the catalog, the input has numbers")
        if spec.data_type is not DataType.BOOL and bool in kinds:
            raise UserError(f"{where}: signal {signal} is a number in the catalog, the input has true/false")
        if spec.data_type is DataType.INT64 and float in kinds:
            raise UserError(f"{where}: signal {signal} is an integer in the catalog, the input has fractions")
        t = np.asarray(times, np.int64)
        order = np.argsort(t, kind="stable")
        column = np.asarray(values, dtype=spec.data_type.numpy_dtype)
        batches.append(GroupBatch(signal, t[order], {spec.id: column[order]}))
    return batches


def _history(catalog: Any, batches: list[Any]) -> Any:
    from fleetloop_agent.ring_buffer import RingBuffers

    count = sum(len(b) for b in batches)
    span = 0
    if batches:
        span = max(int(b.t_ns[-1]) for b in batches) - min(int(b.t_ns[0]) for b in batches)
    buffers = RingBuffers(catalog, horizon_ns=span + 1, max_bytes=max(1, 32 * count + 1024))
    for batch in batches:
        buffers.append(batch)
    return buffers


def _time_out(ns: int, seconds: bool) -> int | float:
    if not seconds:
        return ns
    return int(ns // 1_000_000_000) if ns % 1_000_000_000 == 0 else ns / 1e9


def _load_inputs(args: argparse.Namespace) -> tuple[_Samples, Any, list[Any]]:
    input_path = Path(args.input)
    samples = _read_samples(input_path)
    catalog = _load_catalog(Path(args.catalog)) if args.catalog else _infer_catalog(samples, input_path)
    return samples, catalog, _batches(samples, catalog, input_path)


def cmd_rules_test(args: argparse.Namespace) -> int:
    from fleetloop_agent.trigger_engine import TriggerEngine
    from fleetloop_shared.rules import parse_campaign

    path = Path(args.campaign)
    if not path.is_file():
        raise NotFoundError(f"{path}: no such file")
    spec = parse_campaign(path.read_text(), source=str(path))
    samples, catalog, batches = _load_inputs(args)
    engine = TriggerEngine(catalog)
    refused = engine.set_campaigns([spec], now_ns=0)  # expiry is the device's business, not the replay's
    if refused:
        print(refused[spec.name], file=sys.stderr)
        return 2
    fires = engine.process(batches, _history(catalog, batches))
    fire_list: list[dict[str, Any]] = [
        {
            "t": _time_out(f.t_ns, samples.seconds),
            "window": [_time_out(f.from_ns, samples.seconds), _time_out(f.to_ns, samples.seconds)],
        }
        for f in fires
    ]
    doc = {"campaign": spec.name, "fires": fire_list}
    if args.output in ("json", "yaml"):
        emit(render_object(doc, args.output))
    else:
        rows = [{"t": f["t"], "from": f["window"][0], "to": f["window"][1]} for f in fire_list]
        emit(render_records(rows, args.output, ["t", "from", "to"]) if rows else f"{spec.name}: no fires")
    return 0


def cmd_rules_eval(args: argparse.Namespace) -> int:
    import numpy as np

    from fleetloop_shared.rules import Evaluator, compile_expression

    samples, catalog, batches = _load_inputs(args)
    expression = compile_expression(args.expression, catalog=catalog, source="<expression>")
    feeds = {}
    for batch in batches:
        (sid,) = batch.values
        path = catalog.by_id(sid).path
        if path in expression.signals:
            feeds[path] = (batch.t_ns, batch.values[sid])
    stamps = [feeds[p][0] for p in feeds]
    times = np.unique(np.concatenate(stamps)) if stamps else np.empty(0, np.int64)
    data, valid = Evaluator(expression).evaluate(times, feeds, _history(catalog, batches))
    out = []
    for t, value, ok in zip(times.tolist(), data.tolist(), valid.tolist(), strict=True):
        out.append({"t": _time_out(t, samples.seconds), "value": value if ok else None})
    if args.output in ("json", "yaml"):
        emit(render_object({"values": out}, args.output))
    else:
        emit(render_records(out, args.output, ["t", "value"]) if out else "no evaluation times")
    return 0


def _reporting_rule_errors(
    command: Callable[[argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    """Print a rule error as ``FILE:LINE:COL: message`` (no ``error:`` prefix), exit 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except RuleError as exc:
            print(str(exc), file=sys.stderr)
            return exc.exit_code

    return run


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
    s = rules.add_parser("test", help="replay samples through a campaign with the agent's engine")
    s.add_argument("campaign")
    s.add_argument("--input", required=True, help="CSV: t,signal,value (t in seconds) or t_ns,signal,value")
    s.add_argument("--catalog", help="catalog JSON (default: inferred from the input)")
    s.add_argument("-o", "--output", choices=FORMATS, default="table")
    s.set_defaults(func=_reporting_rule_errors(cmd_rules_test))
    s = rules.add_parser("eval", help="an expression's value at each evaluation time of a CSV of samples")
    s.add_argument("expression")
    s.add_argument("--input", required=True, help="CSV: t,signal,value (t in seconds) or t_ns,signal,value")
    s.add_argument("--catalog", help="catalog JSON (default: inferred from the input)")
    s.add_argument("-o", "--output", choices=FORMATS, default="table")
    s.set_defaults(func=_reporting_rule_errors(cmd_rules_eval))
    s = rules.add_parser("apply", help="validate and push a campaign to the fleet")
    s.add_argument("file")
    with_cloud(s)
    s.set_defaults(func=cmd_rules_apply)
    s = rules.add_parser("get", help="list the fleet's campaigns")
    with_cloud(s)
    s.set_defaults(func=cmd_rules_get)
