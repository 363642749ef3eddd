"""YAML mappings that remember where each key was written, so a config error can say FILE:LINE:COL.

:func:`load_marked` reads like ``yaml.safe_load`` but builds every mapping as a :class:`MarkedDict` — a
plain ``dict`` (every ``isinstance(x, dict)`` check still holds) that also knows the file, its own
position and each key's. :func:`location` turns that into the ``FILE:LINE:COL`` prefix of an error.
:func:`read_config_file` is what a configuration loader starts with: the file's top-level mapping, or a
ConfigError saying where the file is unreadable or not YAML. The agent's and the coordinator's
configuration files are read through it, so both report mistakes the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from fleetloop_shared.errors import ConfigError


class MarkedDict(dict[Any, Any]):
    """A mapping read from YAML: ``source`` file, ``mark`` (line, col) of the mapping, ``marks`` per key
    (1-based, as editors count)."""

    source: str = ""
    mark: tuple[int, int] = (0, 0)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.marks: dict[Any, tuple[int, int]] = {}


def load_marked(text: str, *, source: str) -> Any:
    """The YAML document in ``text`` with every mapping a :class:`MarkedDict` (yaml.YAMLError as usual)."""

    class Loader(yaml.SafeLoader):
        pass

    def construct(loader: yaml.SafeLoader, node: yaml.MappingNode) -> MarkedDict:
        loader.flatten_mapping(node)
        out = MarkedDict()
        out.source = source
        out.mark = (node.start_mark.line + 1, node.start_mark.column + 1)
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            out[key] = loader.construct_object(value_node, deep=True)
            out.marks[key] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
        return out

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct)
    return yaml.load(text, Loader=Loader)  # a SafeLoader subclass: safe


def location(mapping: Mapping[Any, Any], key: Any = None) -> str:
    """``FILE:LINE:COL: `` of ``key`` in ``mapping`` (of the mapping itself when the key is absent), or
    ``""`` for a mapping that was not read from a file."""
    if not isinstance(mapping, MarkedDict) or not mapping.source:
        return ""
    line, col = mapping.marks.get(key, mapping.mark)
    return f"{mapping.source}:{line}:{col}: "


def read_config_file(path: Path) -> MarkedDict:
    """The top-level mapping of the YAML file at ``path`` (empty for an empty file); ConfigError
    (``FILE:LINE:COL: ...`` where the YAML parser knows the place) for a missing, unreadable or
    malformed file, or one whose top level is not a mapping."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        doc = load_marked(path.read_text(encoding="utf-8"), source=str(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    if doc is None:  # an empty file, or only comments: no settings
        doc = MarkedDict()
        doc.source = str(path)
    if not isinstance(doc, MarkedDict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return doc
