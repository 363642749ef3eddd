"""``fleetloop rules ...``: validate campaigns offline, replay samples through them, push them, list them.

``rules test`` and ``rules eval`` run the agent's own trigger engine and evaluator over a CSV of samples,
so what an operator tries on a laptop is exactly what fires in the machine.
"""

from __future__ import annotations

import argparse
import csv
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


_CATALOG_SHAPE = (
    "expected a list of signals (or {signals: [...]}) with path and data_type "
    "(float64, int64, bool or string), optionally id and unit"
)


def _load_catalog(path: Path) -> Any:
    """A catalog file as operators write it (YAML or JSON) or as the cloud lists a device's catalog
    (JSON records with ids). Ids are optional (given in order); datatypes in any case."""
    import yaml

    from fleetloop_shared.catalog import Catalog, DataType, SignalSpec

    if not path.is_file():
        raise NotFoundError(f"catalog {path}: no such file")
    try:
        doc = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"catalog {path}: not YAML or JSON ({str(exc).splitlines()[0]})") from None
    records = doc.get("signals") if isinstance(doc, dict) else doc
    if not isinstance(records, list):
        raise UserError(f"catalog {path}: {_CATALOG_SHAPE}")
    names = ", ".join(t.name.lower() for t in DataType)
    specs = []
    for i, record in enumerate(records):
        where = f"catalog {path}: signals[{i}]"
        if not isinstance(record, dict) or not isinstance(record.get("path"), str):
            raise UserError(f"{where}: {_CATALOG_SHAPE}")
        kind = record.get("data_type", record.get("type"))
        try:
            data_type = DataType[str(kind).upper()]
        except KeyError:
            raise UserError(f"{where} ({record['path']}): data_type {kind!r} is not one of {names}") from None
        raw_id = record.get("id", i + 1)
        if type(raw_id) is not int or raw_id < 1:
            raise UserError(f"{where} ({record['path']}): id must be a positive integer, got {raw_id!r}")
        specs.append(SignalSpec(raw_id, record["path"], data_type, str(record.get("unit", ""))))
    return Catalog(specs)


_INT = re.compile(r"[+-]?\d+")
_MAX_CSV_BYTES = 512 * 1024 * 1024


@dataclass
class _Samples:
    """Samples read from a CSV, per signal path, in file order; ``seconds`` = the file's time unit.

    Values stay the cell's text (stripped) until the signal's datatype is known: a string signal keeps
    every cell verbatim (``"1"``, ``"nan"`` and ``"true"`` included), a numeric one parses them. ``rows``
    holds each sample's line, for messages.
    """

    seconds: bool
    by_path: dict[str, tuple[list[int], list[str], list[int]]]


class _Text:
    """A cell that is neither true/false nor a number: its signal holds strings."""


_TEXT = _Text()


@dataclass(frozen=True)
class _TooBig:
    """An integer cell outside 64 bits: an error, unless its signal holds strings anyway."""

    raw: str


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


def _parse_value(raw: str) -> bool | int | float | _Text | _TooBig:
    if raw in ("true", "false"):
        return raw == "true"
    if _INT.fullmatch(raw):
        number = int(raw)
        return number if -(2**63) <= number < 2**63 else _TooBig(raw)
    try:
        value = float(raw)
    except ValueError:
        return _TEXT
    if math.isnan(value) and raw.lower() not in ("nan", "+nan", "-nan"):
        return _TEXT
    return value


def _read_samples(path: Path) -> _Samples:
    if not path.is_file():
        raise NotFoundError(f"{path}: no such file")
    if path.stat().st_size > _MAX_CSV_BYTES:
        raise UserError(f"{path}: larger than {_MAX_CSV_BYTES // (1024 * 1024)} MiB")
    by_path: dict[str, tuple[list[int], list[str], list[int]]] = {}
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
                times, raws, rows = by_path.setdefault(signal, ([], [], []))
                times.append(t)
                raws.append(row[2].strip())
                rows.append(reader.line_num)
        except csv.Error as exc:
            raise UserError(f"{path}:{reader.line_num}: {exc}") from None
    return _Samples(seconds, by_path)


def _infer_catalog(samples: _Samples, source: Path, reads: frozenset[str]) -> Any:
    """A catalog from the values: any text makes a string signal; else all true/false is BOOL, all
    integers INT64, numbers FLOAT64. A string signal that also has numbers is usually a typo in the
    input, so when the rule reads it (``reads``) a note on stderr says which line made it text.
    """
    from fleetloop_shared.catalog import Catalog, DataType

    catalog = Catalog()
    for signal, (_, raws, rows) in sorted(samples.by_path.items()):
        parsed = [_parse_value(raw) for raw in raws]
        text = next((i for i, v in enumerate(parsed) if isinstance(v, _Text)), None)
        if text is not None:
            number = next((i for i, v in enumerate(parsed) if not isinstance(v, _Text)), None)
            if number is not None and signal in reads:
                print(
                    f"{source}:{rows[text]}: note: signal {signal} has the text {raws[text]!r} (and "
                    f"{raws[number]!r} at line {rows[number]}): all its values are read as strings",
                    file=sys.stderr,
                )
            catalog.add(signal, DataType.STRING)
            continue
        flags = [type(v) is bool for v in parsed]
        if all(flags):
            catalog.add(signal, DataType.BOOL)
            continue
        if any(flags):
            odd = flags.index(not flags[0])
            raise UserError(
                f"{source}:{rows[odd]}: signal {signal} mixes true/false with numbers "
                f"({raws[odd]!r}; line {rows[0]} has {raws[0]!r})"
            )
        catalog.add(signal, DataType.INT64 if all(type(v) is int for v in parsed) else DataType.FLOAT64)
    return catalog


def _typed_values(signal: str, data_type: Any, raws: list[str], rows: list[int], source: Path) -> list[Any]:
    """The cells of ``signal`` as values of its catalog datatype; the first that is not one is refused."""
    from fleetloop_shared.catalog import DataType

    if data_type is DataType.STRING:
        return list(raws)
    wanted = {DataType.BOOL: "true/false", DataType.INT64: "an integer", DataType.FLOAT64: "a number"}
    values: list[Any] = []
    for raw, row in zip(raws, rows, strict=True):
        value = _parse_value(raw)
        if isinstance(value, _TooBig):
            raise UserError(f"{source}:{row}: integer {raw} does not fit in 64 bits")
        kind = type(value)
        ok = (
            kind is bool
            if data_type is DataType.BOOL
            else kind is int
            if data_type is DataType.INT64
            else kind in (int, float)
        )
        if not ok:
            has = "text" if isinstance(value, _Text) else "true/false" if kind is bool else "a number"
            raise UserError(
                f"{source}:{row}: signal {signal} is {wanted[data_type]} in the catalog "
                f"({data_type.name}), the input has {has}: {raw!r}"
            )
        values.append(value)
    return values


def _batches(samples: _Samples, catalog: Any, source: Path) -> list[Any]:
    """One batch per signal (its own group), sorted by time; equal times keep file order."""
    import numpy as np

    from fleetloop_shared.samples import GroupBatch

    batches = []
    for signal, (times, raws, rows) in samples.by_path.items():
        spec = catalog.get(signal)
        if spec is None:  # not in the given catalog: no rule can read it; say so (a typo in the input?)
            print(
                f"{source}:{rows[0]}: note: signal {signal} is not in the catalog; ignored",
                file=sys.stderr,
            )
            continue
        values = _typed_values(signal, spec.data_type, raws, rows, source)
        t = np.asarray(times, np.int64)
        order = np.argsort(t, kind="stable")
        column = np.empty(len(values), dtype=spec.data_type.numpy_dtype)
        column[:] = values  # element by element: a list of strings never becomes a 2-D array
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


def _load_inputs(args: argparse.Namespace, reads: frozenset[str]) -> tuple[_Samples, Any, list[Any]]:
    input_path = Path(args.input)
    samples = _read_samples(input_path)
    if args.catalog:
        catalog = _load_catalog(Path(args.catalog))
    else:
        catalog = _infer_catalog(samples, input_path, reads)
    return samples, catalog, _batches(samples, catalog, input_path)


def cmd_rules_test(args: argparse.Namespace) -> int:
    from fleetloop_agent.trigger_engine import TriggerEngine
    from fleetloop_shared.rules import compile_expression, parse_campaign

    path = Path(args.campaign)
    if not path.is_file():
        raise NotFoundError(f"{path}: no such file")
    spec = parse_campaign(path.read_text(), source=str(path))
    samples, catalog, batches = _load_inputs(args, compile_expression(spec.when).signals)
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

    reads = compile_expression(args.expression, source="<expression>").signals
    samples, catalog, batches = _load_inputs(args, reads)
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
