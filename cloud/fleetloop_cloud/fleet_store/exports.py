"""A capture's rows as files the tools data teams use: MCAP (Foxglove), Parquet (notebooks, Spark,
DuckDB) and CSV (PlotJuggler, spreadsheets).

Parquet and CSV hold exactly the rows and columns of ``samples`` (``docs/query.md``). MCAP holds the same
samples as messages, which is what Foxglove's plot panel reads: one channel per signal group (a signal's
path up to its last dot — ``Vehicle.Chassis.Brake`` for ``Vehicle.Chassis.Brake.PedalPressure``), topic
``/Vehicle/Chassis/Brake``, JSON messages described by a JSON schema, one message per group and sample
time holding the group's signals sampled then (``{"PedalPressure": 12.5, "IsPressed": 1}``), log and
publish time the sample time; chunks compressed with zstd. Integer and boolean signals keep their exact
integer, text signals their text; a non-finite number (NaN, ±inf), which JSON cannot carry, is ``null``.
The file's ``fleetloop.capture`` metadata record names the capture, its device and campaign.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from mcap.writer import CompressionType, Writer

from fleetloop_shared.errors import UserError


@dataclass(frozen=True)
class ExportFormat:
    name: str
    extension: str
    media_type: str


FORMATS: Mapping[str, ExportFormat] = {
    "mcap": ExportFormat("mcap", ".mcap", "application/octet-stream"),
    "parquet": ExportFormat("parquet", ".parquet", "application/vnd.apache.parquet"),
    "csv": ExportFormat("csv", ".csv", "text/csv"),
}
#: MCAP chunk size before compression (the library's default; Foxglove reads chunks independently).
MCAP_CHUNK_BYTES = 1024 * 1024


def export_format(name: str) -> ExportFormat:
    fmt = FORMATS.get(name)
    if fmt is None:
        raise UserError(f"unknown export format {name!r}; formats are {', '.join(FORMATS)}")
    return fmt


def export_capture(table: pa.Table, fmt: ExportFormat, metadata: Mapping[str, str]) -> bytes:
    """``table`` (rows of ``samples``, in time order) written as ``fmt``."""
    if fmt.name == "parquet":
        out = io.BytesIO()
        pq.write_table(table, out, compression="zstd")
        return out.getvalue()
    if fmt.name == "csv":
        out = io.BytesIO()
        pa_csv.write_csv(table, out)
        return out.getvalue()
    return _mcap(table, metadata)


def group_of(signal: str) -> tuple[str, str]:
    """(group, field) of a signal path: ``Vehicle.Chassis.Brake.IsPressed`` → (``Vehicle.Chassis.Brake``,
    ``IsPressed``); a path without a dot is its own field of the group ``""``."""
    group, _, name = signal.rpartition(".")
    return group, name


def topic_of(group: str) -> str:
    return "/" + group.replace(".", "/")


def _value(number: float | None, integer: int | None, text: str | None) -> Any:
    if text is not None:
        return text
    if integer is not None:
        return integer
    if number is None or not math.isfinite(number):
        return None
    return number


def _json_type(integer: int | None, text: str | None) -> str:
    return "string" if text is not None else "integer" if integer is not None else "number"


def _mcap(table: pa.Table, metadata: Mapping[str, str]) -> bytes:
    cols = {name: table.column(name).to_pylist() for name in ("signal", "t_ns", "value", "value_int",
                                                              "value_str")}  # fmt: skip
    signals, times = cols["signal"], cols["t_ns"]
    if any(t < 0 for t in times):
        raise UserError("this capture has sample times before 1970, which MCAP log times cannot hold")
    fields: dict[str, dict[str, str]] = {}  # group → field → JSON type
    for signal, integer, text in zip(signals, cols["value_int"], cols["value_str"], strict=True):
        group, name = group_of(signal)
        fields.setdefault(group, {}).setdefault(name, _json_type(integer, text))
    out = io.BytesIO()
    writer = Writer(out, chunk_size=MCAP_CHUNK_BYTES, compression=CompressionType.ZSTD)
    writer.start(profile="", library="fleetloop")
    channels: dict[str, int] = {}
    for group in sorted(fields):
        schema = {
            "type": "object",
            "title": group or "signals",
            "properties": {name: {"type": [kind, "null"]} for name, kind in sorted(fields[group].items())},
        }
        schema_id = writer.register_schema(group or "signals", "jsonschema", json.dumps(schema).encode())
        channels[group] = writer.register_channel(topic_of(group), "json", schema_id, {"signal_group": group})
    sequence: dict[str, int] = {}
    pending: dict[str, dict[str, Any]] = {}

    def send(group: str, t: int) -> None:
        sequence[group] = sequence.get(group, 0) + 1
        data = json.dumps(pending.pop(group)).encode()
        writer.add_message(channels[group], log_time=t, publish_time=t, data=data, sequence=sequence[group])

    current = times[0] if times else 0
    for row, signal in enumerate(signals):
        t = times[row]
        if t != current:
            for group in list(pending):
                send(group, current)
            current = t
        group, name = group_of(signal)
        if name in pending.get(group, {}):  # the same signal twice at one time: two messages
            send(group, t)
        pending.setdefault(group, {})[name] = _value(cols["value"][row], cols["value_int"][row],
                                                     cols["value_str"][row])  # fmt: skip
    for group in list(pending):
        send(group, current)
    writer.add_metadata("fleetloop.capture", dict(metadata))
    writer.finish()  # type: ignore[no-untyped-call]
    return out.getvalue()
