"""Render results as a table, JSON, YAML or CSV (``-o``), the same way for every command."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any

import yaml

FORMATS = ("table", "json", "yaml", "csv")


def render_rows(columns: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps([dict(zip(columns, r, strict=False)) for r in rows], indent=2, default=str)
    if fmt == "yaml":
        return yaml.safe_dump([dict(zip(columns, r, strict=False)) for r in rows], sort_keys=False)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(columns)
        for r in rows:
            w.writerow(["" if v is None else (repr(v) if isinstance(v, float) else v) for v in r])
        return buf.getvalue().rstrip("\n")
    cells = [[str(c) for c in columns]] + [["" if v is None else _fmt(v) for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=False)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_records(records: Sequence[dict[str, Any]], fmt: str, columns: Sequence[str] | None = None) -> str:
    cols = list(columns) if columns else (list(records[0].keys()) if records else [])
    if fmt in ("json", "yaml"):
        data = [{k: r.get(k) for k in cols} for r in records] if columns else list(records)
        return (
            json.dumps(data, indent=2, default=str)
            if fmt == "json"
            else yaml.safe_dump(data, sort_keys=False)
        )
    return render_rows(cols, [[r.get(c) for c in cols] for r in records], fmt)


def render_object(obj: Any, fmt: str) -> str:
    if fmt == "yaml":
        return yaml.safe_dump(obj, sort_keys=False)
    return json.dumps(obj, indent=2, default=str)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, dict | list):
        return json.dumps(v, default=str)
    return str(v)


def emit(text: str) -> None:
    """Write ``text`` to stdout with one trailing newline, flushed (progress stays visible in pipes)."""
    import sys

    sys.stdout.write(text + ("\n" if not text.endswith("\n") else ""))
    sys.stdout.flush()
