"""The catalog file, read in one place for every command that takes one.

``fleetloop catalog import`` writes it, ``catalog push`` sends it to a fleet, ``rules validate``, ``rules
test`` and ``rules eval --catalog`` check campaigns against it: ``{signals: [{path, data_type, unit,
...}]}``, or the bare list, YAML or JSON. What every command refuses in the same words (a missing file,
a file that is not YAML or JSON, a document without a list of signals) is refused here; each command then
checks the fields it uses. Entries that are mappings keep their FILE:LINE:COL
(:func:`fleetloop_shared.yaml_marks.location`), so a command can point at the line that is wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fleetloop_shared.errors import NotFoundError, UserError

#: What a catalog file must hold, for the refusal of one that does not.
CATALOG_SHAPE = (
    "expected a list of signals (or {signals: [...]}) with path and data_type "
    "(float64, int64, bool or string), optionally id and unit"
)


def read_catalog_entries(path: Path) -> list[Any]:
    """The entries of the catalog file at ``path``, unchecked but for being a list."""
    import yaml

    from fleetloop_shared.yaml_marks import load_marked

    if not path.is_file():
        raise NotFoundError(f"catalog {path}: no such file")
    try:
        doc = load_marked(path.read_text(), source=str(path))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"catalog {path}: not YAML or JSON ({str(exc).splitlines()[0]})") from None
    entries = doc.get("signals") if isinstance(doc, dict) else doc
    if not isinstance(entries, list):
        raise UserError(f"catalog {path}: {CATALOG_SHAPE}")
    return entries
