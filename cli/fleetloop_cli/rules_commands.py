"""``fleetloop rules ...``: validate campaigns offline, replay samples through them, push them, list them.

``rules test`` and ``rules eval`` run the agent's own trigger engine and evaluator over a recording read
by the agent's own reader (``fleetloop_agent.recordings``), so what an operator tries on a laptop is
exactly what fires in the machine.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetloop_cli.catalog_files import CATALOG_SHAPE, read_catalog_entries
from fleetloop_cli.client import client_from_args, cloud_command, post_file
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
    """A catalog file as operators write it (YAML or JSON) or as the cloud lists a device's catalog
    (JSON records with ids). Ids are optional (given in order); datatypes in any case."""
    from fleetloop_shared.catalog import Catalog, SignalSpec, data_type_named
    from fleetloop_shared.classification import parse_class

    records = read_catalog_entries(path)
    specs = []
    for i, record in enumerate(records):
        where = f"catalog {path}: signals[{i}]"
        if not isinstance(record, dict) or not isinstance(record.get("path"), str):
            raise UserError(f"{where}: {CATALOG_SHAPE}")
        kind = record.get("data_type", record.get("type"))
        data_type = data_type_named(kind, f"{where} ({record['path']}): data_type")
        raw_id = record.get("id", i + 1)
        if type(raw_id) is not int or raw_id < 1:
            raise UserError(f"{where} ({record['path']}): id must be a positive integer, got {raw_id!r}")
        cls = parse_class(record["class"], f"{where} ({record['path']})") if "class" in record else None
        specs.append(SignalSpec(raw_id, record["path"], data_type, str(record.get("unit", "")), cls))
    return Catalog(specs)


#: Missing signals whose datatypes are searched for one the rule compiles with (3 ** this tries at most).
_MAX_MISSING_SEARCH = 5


@dataclass
class _Inputs:
    """What ``rules test`` and ``rules eval`` replay: the catalog, one batch per signal (time order), the
    models, and whether times are shown in seconds (the input's own unit) or in ns."""

    catalog: Any
    batches: list[Any]
    seconds: bool
    models: Any


def _rule_path(recording: Any, group: Any, name: str) -> str:
    """The path a rule reads a signal by: a CSV's names as they stand; a CAN signal as a device names a
    DBC signal it does not map (``CAN.MESSAGE.SIGNAL``)."""
    if not recording.qualified:
        return str(name)
    return f"CAN.{group.name.rsplit('/', 1)[-1]}.{name}"


def _signals(recording: Any, source: Path) -> dict[str, tuple[Any, Any]]:
    """path → (t_ns, values) of every signal of the recording."""
    out: dict[str, tuple[Any, Any]] = {}
    for group in recording.groups:
        for name, values in group.columns.items():
            path = _rule_path(recording, group, name)
            if path in out:
                raise UserError(f"{source}: signal {path} comes from two buses; choose one with --bus N")
            out[path] = (group.t_ns, values)
    return out


def _as_catalog_type(path: str, values: Any, data_type: Any, source: Path) -> Any:
    """A decoded CAN column in the datatype a given catalog says (CSV cells are typed while read)."""
    import numpy as np

    from fleetloop_agent.recordings import data_type_of
    from fleetloop_shared.catalog import DataType

    have = data_type_of(values, f"{source}: {path}")
    if have is data_type or (have is DataType.INT64 and data_type is DataType.FLOAT64):
        return np.asarray(values, dtype=data_type.numpy_dtype)
    if have is DataType.FLOAT64 and data_type is DataType.INT64 and np.all(np.mod(values, 1) == 0):
        return np.asarray(values, dtype=np.int64)
    raise UserError(f"{source}: signal {path} is {have.name} in the input, {data_type.name} in the catalog")


def _missing_types(missing: list[str], catalog: Any, compiles: Callable[[Any], bool]) -> list[Any]:
    """Datatypes for signals the input lacks, chosen so the rule compiles (they never hold a value, so
    any datatype the rule accepts means the same: missing throughout). FLOAT64 when none does."""
    import itertools

    from fleetloop_shared.catalog import Catalog, DataType, SignalSpec

    options = (DataType.FLOAT64, DataType.BOOL, DataType.STRING, DataType.INT64)
    if len(missing) <= _MAX_MISSING_SEARCH:
        base = list(catalog)
        top = max((s.id for s in base), default=0)
        for types in itertools.product(options, repeat=len(missing)):
            extra = [
                SignalSpec(top + 1 + i, p, t) for i, (p, t) in enumerate(zip(missing, types, strict=True))
            ]
            if compiles(Catalog([*base, *extra])):
                return list(types)
    return [DataType.FLOAT64] * len(missing)


def _model_inputs(expression: Any, models: Any) -> set[str]:
    """The signals the installed models an expression calls read."""
    out: set[str] = set()
    if models is not None:
        for name, window_ns in expression.models:
            if name in models.names:
                out.update(models.inputs(name, window_ns))
    return out


def _inferred_catalog(
    signals: dict[str, tuple[Any, Any]],
    expression: Any,
    model_inputs: set[str],
    source: Path,
    condition: bool,
) -> Any:
    """The catalog the input's signals make, plus every signal the rule or its models read that the input
    lacks (missing throughout: named in a warning; a model input is a number, the rule's own signals get
    a datatype the rule compiles with)."""
    from fleetloop_agent.recordings import data_type_of
    from fleetloop_shared.catalog import Catalog, DataType
    from fleetloop_shared.rules import compile_expression

    catalog = Catalog()
    for path, (_, values) in sorted(signals.items()):
        catalog.add(path, data_type_of(values, f"{source}: {path}"))
    missing = sorted((expression.signals | model_inputs) - set(signals))
    for path in missing:
        print(f"warning: signal {path} is not in {source}; it is missing throughout", file=sys.stderr)
    for path in missing:
        if path in model_inputs and path not in expression.signals:
            catalog.add(path, DataType.FLOAT64)
    read = [p for p in missing if p not in catalog]

    def compiles(trial: Any) -> bool:
        try:
            compile_expression(expression.text, catalog=trial, require_condition=condition)
        except FleetloopError:
            return False
        return True

    for path, data_type in zip(read, _missing_types(read, catalog, compiles), strict=True):
        catalog.add(path, data_type)
    return catalog


def _load_inputs(args: argparse.Namespace, when: str, *, where: str, condition: bool) -> _Inputs:
    """Read ``--input`` with the one reader of recordings; the catalog is ``--catalog`` or the one the
    input's cells make. With an inferred catalog, a signal the rule (or a model it calls) reads that the
    input never has is missing throughout, and a warning names it; with ``--catalog``, an unknown name
    stays the rule's error."""
    import numpy as np

    from fleetloop_agent.models import ModelRegistry
    from fleetloop_agent.recordings import read_recording
    from fleetloop_shared.rules import compile_expression
    from fleetloop_shared.samples import GroupBatch

    source = Path(args.input)
    if not source.exists():
        raise NotFoundError(f"{source}: no such file")
    models = None
    if getattr(args, "models", None):
        if not Path(args.models).is_dir():
            raise NotFoundError(f"--models {args.models}: no such directory")
        models = ModelRegistry.from_directory(Path(args.models))
    given = _load_catalog(Path(args.catalog)) if args.catalog else None
    dbc = Path(args.dbc) if getattr(args, "dbc", None) else None

    def types(path: str) -> Any:
        spec = given.get(path) if given is not None else None
        return None if spec is None else spec.data_type

    bus = getattr(args, "bus", None)
    recording = read_recording(source, dbc=dbc, bus=bus, types=types if given is not None else None)
    catalog = given
    signals = _signals(recording, source)
    expression = compile_expression(when, source=where)
    model_inputs = _model_inputs(expression, models)
    reads = expression.signals | model_inputs
    for note in recording.notes:
        if catalog is not None or note.signal is None or note.signal in reads:
            print(note, file=sys.stderr)
    if catalog is None:
        catalog = _inferred_catalog(signals, expression, model_inputs, source, condition)
    batches = []
    for path, (t_ns, values) in signals.items():
        spec = catalog.get(path)
        if spec is None:
            continue
        column = _as_catalog_type(path, values, spec.data_type, source) if recording.qualified else values
        batches.append(GroupBatch(path, np.asarray(t_ns, np.int64), {spec.id: column}))
    return _Inputs(catalog, batches, recording.time_unit != "ns", models)


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


def cmd_rules_test(args: argparse.Namespace) -> int:
    from fleetloop_agent.trigger_engine import TriggerEngine
    from fleetloop_shared.rules import parse_campaign

    path = Path(args.campaign)
    if not path.is_file():
        raise NotFoundError(f"{path}: no such file")
    spec = parse_campaign(path.read_text(), source=str(path))
    inputs = _load_inputs(args, spec.when, where=str(path), condition=True)
    engine = TriggerEngine(inputs.catalog, inputs.models)
    refused = engine.set_campaigns([spec], now_ns=0)  # expiry is the device's business, not the replay's
    if refused:
        print(refused[spec.name], file=sys.stderr)
        return 2
    fires = engine.process(inputs.batches, _history(inputs.catalog, inputs.batches))
    seconds = inputs.seconds
    fire_list: list[dict[str, Any]] = [
        {
            "t": _time_out(f.t_ns, seconds),
            "window": [_time_out(f.from_ns, seconds), _time_out(f.to_ns, seconds)],
            "upload": _what_is_uploaded(spec, inputs, f.t_ns, f.from_ns, f.to_ns),
        }
        for f in fires
    ]
    doc = {"campaign": spec.name, "fires": fire_list}
    if spec.privacy is not None:
        doc["privacy"] = spec.privacy.stamp().text().split("#")[0]
    if args.output in ("json", "yaml"):
        emit(render_object(doc, args.output))
    else:
        rows = [{"t": f["t"], "from": f["window"][0], "to": f["window"][1],
                 "uploaded": _upload_text(f["upload"])} for f in fire_list]  # fmt: skip
        cols = ["t", "from", "to", "uploaded"]
        emit(render_records(rows, args.output, cols) if rows else f"{spec.name}: no fires")
    return 0


#: The key ``rules test`` hashes identifiers with: a fixed preview key (``h:preview:…``), never a
#: fleet's — an operator sees which values would be hashed, not what a fleet's hash of them is.
_PREVIEW_KEY_ID = "preview"


def _what_is_uploaded(spec: Any, inputs: _Inputs, t_ns: int, from_ns: int, to_ns: int) -> dict[str, Any]:
    """What the device would store for upload of one fire: the window's samples of the collected
    signals, after the campaign's ``spec.privacy`` (suppressed, dropped, hashed, coarsened, with the
    first value of each text signal as it would be stored)."""
    import hashlib

    import numpy as np

    from fleetloop_shared.privacy.apply import apply_policy
    from fleetloop_shared.privacy.keys import KeyRing, PrivacyKey
    from fleetloop_shared.samples import GroupBatch

    wanted = {s.id for s in inputs.catalog.match(spec.collect_signals)}
    # signals sampled at the same times travel as one group, as a device's source reads them (a GNSS
    # fix's latitude and longitude: the policy pairs positions within a group)
    by_times: dict[bytes, GroupBatch] = {}
    for batch in inputs.batches:
        keep = (batch.t_ns >= from_ns) & (batch.t_ns <= to_ns)
        values = {sid: np.asarray(v)[keep] for sid, v in batch.values.items() if sid in wanted}
        if values and keep.any():
            times = batch.t_ns[keep]
            joined = by_times.get(times.tobytes())
            if joined is not None:
                values = {**joined.values, **values}
            by_times[times.tobytes()] = GroupBatch(joined.group if joined else batch.group, times, values)
    window = list(by_times.values())
    out: dict[str, Any] = {}
    if spec.privacy is not None:
        secret = hashlib.sha256(b"fleetloop rules test").digest()
        key = PrivacyKey(_PREVIEW_KEY_ID, secret, -(2**63), 2**63 - 1)
        outcome = apply_policy(spec.privacy, window, inputs.catalog, KeyRing([key]), t_ns)
        taken = outcome.redacted
        out["privacy"] = {"suppressed": outcome.suppressed, "dropped_signals": taken.dropped_signals,
                          "hashed_values": taken.hashed_values,
                          "removed_positions": taken.removed_positions}  # fmt: skip
        window = outcome.batches or []
    signals: dict[str, dict[str, Any]] = {}
    for batch in window:
        for sid, column in batch.values.items():
            path = inputs.catalog.by_id(sid).path
            entry = signals.setdefault(path, {"samples": 0})
            entry["samples"] += len(column)
            if len(column) and "first" not in entry:
                first = column[0]
                entry["first"] = first if isinstance(first, str) else float(first)
    out["signals"] = dict(sorted(signals.items()))
    return out


def _upload_text(upload: dict[str, Any]) -> str:
    """One table cell: the signals and samples stored, and what the privacy policy did."""
    privacy = upload.get("privacy")
    if privacy is not None and privacy["suppressed"]:
        return "nothing (suppressed: a position inside a geofence)"
    samples = sum(e["samples"] for e in upload["signals"].values())
    text = f"{len(upload['signals'])} signals, {samples} samples"
    if privacy is not None:
        text += (f"; privacy: {privacy['dropped_signals']} dropped, {privacy['hashed_values']} hashed, "
                 f"{privacy['removed_positions']} positions removed")  # fmt: skip
    return text


def cmd_rules_eval(args: argparse.Namespace) -> int:
    import numpy as np

    from fleetloop_shared.rules import Evaluator, compile_expression

    inputs = _load_inputs(args, args.expression, where="<expression>", condition=False)
    catalog = inputs.catalog
    expression = compile_expression(args.expression, catalog=catalog, source="<expression>")
    feeds = {}
    for batch in inputs.batches:
        (sid,) = batch.values
        path = catalog.by_id(sid).path
        if path in expression.signals:
            feeds[path] = (batch.t_ns, batch.values[sid])
    stamps = [feeds[p][0] for p in feeds]
    times = np.unique(np.concatenate(stamps)) if stamps else np.empty(0, np.int64)
    history = _history(catalog, inputs.batches)
    data, valid = Evaluator(expression, inputs.models).evaluate(times, feeds, history)
    out = []
    for t, value, ok in zip(times.tolist(), data.tolist(), valid.tolist(), strict=True):
        out.append({"t": _time_out(t, inputs.seconds), "value": value if ok else None})
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
    return post_file(args, path, f"/v1/campaigns?source={quote(str(path))}", "text/yaml")


def cmd_rules_get(args: argparse.Namespace) -> int:
    doc = client_from_args(args).get("/v1/campaigns")
    recs = [{"name": c["name"], "version": c["version"]} for c in doc["campaigns"]]
    emit(render_records(recs, args.output, ["name", "version"]))
    return 0


def _input_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--input",
        required=True,
        help="a recording, read as a device's replay sources and store import read it: a long CSV "
        "(t,signal,value with t in seconds, or t_ns,signal,value), a wide CSV (time column first), or a "
        "CAN log with --dbc (its signals are CAN.MESSAGE.SIGNAL)",
    )
    s.add_argument("--dbc", help="DBC to decode a CAN log (candump .log, .asc, GVRET .csv, MF4, numpy dir)")
    s.add_argument(
        "--bus", type=int, help="with --dbc: decode only this bus of the log (as a device's source)"
    )
    s.add_argument("--catalog", help="catalog JSON or YAML (default: inferred from the input)")
    s.add_argument("--models", help="directory of model packs (DIR/*/model.yaml) for model() rules")
    s.add_argument("-o", "--output", choices=FORMATS, default="table")


def register(groups: dict[str, Any], with_cloud: Callable[[argparse.ArgumentParser], None]) -> None:
    rules = groups["rules"]
    s = rules.add_parser("validate", help="check campaign files offline")
    s.add_argument("files", nargs="+")
    s.add_argument("--catalog", help="catalog JSON: check signal names too")
    s.set_defaults(func=cmd_rules_validate)
    s = rules.add_parser("test", help="replay samples through a campaign with the agent's engine")
    s.add_argument("campaign")
    _input_arguments(s)
    s.set_defaults(func=_reporting_rule_errors(cmd_rules_test))
    s = rules.add_parser("eval", help="an expression's value at each evaluation time of a CSV of samples")
    s.add_argument("expression")
    _input_arguments(s)
    s.set_defaults(func=_reporting_rule_errors(cmd_rules_eval))
    s = cloud_command(rules, "apply", cmd_rules_apply, help="validate and push a campaign to the fleet")
    s.add_argument("file")
    cloud_command(rules, "get", cmd_rules_get, help="list the fleet's campaigns")
