"""Where a value sits in a JSON payload: JSON paths, and the safe subset of Home Assistant value templates.

A home hub's devices publish JSON (``{"temperature": 21.5, "battery": 97, "color": {"x": 0.3}}``); a
signal is found by a path — ``temperature``, ``color.x``, ``$.update.state``, ``$['weird key'][0]``.
Home Assistant's MQTT discovery announces Jinja ``value_template``\\ s instead; only the shape that maps
onto a path is accepted — ``{{ value_json.PATH }}`` or ``{{ value }}``, followed by filters from a fixed
list — and anything else is refused with the template quoted, never evaluated.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from fleetloop_shared.errors import ConfigError


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


#: What a path finds where the payload has nothing.
MISSING: Final = _Missing()

_SEGMENT = re.compile(
    r"""\.?(?P<name>[^.\[\]'"\s]+)      # .name or a leading name
      | \[\s*(?P<index>-?\d+)\s*\]        # [0]
      | \[\s*'(?P<sq>[^']*)'\s*\]         # ['key']
      | \[\s*"(?P<dq>[^"]*)"\s*\]         # ["key"]""",
    re.X,
)


@dataclass(frozen=True)
class JsonPath:
    """A sequence of object keys and array indexes; ``$`` alone is the whole payload."""

    text: str
    steps: tuple[str | int, ...]

    @classmethod
    def parse(cls, text: str) -> JsonPath:
        src = text.strip()
        rest = src[1:] if src.startswith("$") else src
        steps: list[str | int] = []
        pos = 0
        while pos < len(rest):
            m = _SEGMENT.match(rest, pos)
            if m is None or m.end() == pos or (m.group("name") and pos and rest[pos] != "."):
                raise ConfigError(f"JSON path {text!r}: cannot read {rest[pos:]!r} (use a.b, a[0], a['k'])")
            if m.group("name") is not None:
                steps.append(m.group("name"))
            elif m.group("index") is not None:
                steps.append(int(m.group("index")))
            else:
                steps.append(m.group("sq") if m.group("sq") is not None else m.group("dq"))
            pos = m.end()
        if not steps and not src.startswith("$"):
            raise ConfigError(f"JSON path {text!r}: empty")
        return cls(src, tuple(steps))

    def get(self, doc: Any) -> Any:
        """The value at this path in ``doc``, or :data:`MISSING`."""
        cur = doc
        for step in self.steps:
            if isinstance(step, int):
                if not isinstance(cur, list) or not -len(cur) <= step < len(cur):
                    return MISSING
                cur = cur[step]
            else:
                if not isinstance(cur, dict) or step not in cur:
                    return MISSING
                cur = cur[step]
        return cur


def _num(kind: type, default: Any) -> Callable[[Any], Any]:
    def convert(v: Any) -> Any:
        try:
            return kind(float(v)) if kind is int else kind(v)
        except (TypeError, ValueError):
            if default is MISSING:
                return MISSING
            return default

    return convert


def _round(ndigits: int) -> Callable[[Any], Any]:
    def convert(v: Any) -> Any:
        try:
            return round(float(v), ndigits)
        except (TypeError, ValueError):
            return MISSING

    return convert


def _text(op: Callable[[str], str]) -> Callable[[Any], Any]:
    return lambda v: op(v) if isinstance(v, str) else MISSING


#: Filters accepted after a path: name → (factory from its literal arguments)
_FILTERS: Final[dict[str, Callable[..., Callable[[Any], Any]]]] = {
    "float": lambda default=MISSING: _num(float, default),
    "int": lambda default=MISSING: _num(int, default),
    "round": lambda ndigits=0: _round(int(ndigits)),
    "string": lambda: lambda v: v if isinstance(v, str) else str(v),
    "lower": lambda: _text(str.lower),
    "upper": lambda: _text(str.upper),
    "trim": lambda: _text(str.strip),
    "is_defined": lambda: lambda v: v,
}
_TEMPLATE = re.compile(r"^\s*\{\{\s*(?P<expr>.*?)\s*\}\}\s*$", re.S)
_FILTER = re.compile(r"^\s*(?P<name>[a-z_]+)\s*(?:\(\s*(?P<args>[^()]*)\)\s*)?$")
_LITERAL = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*$")


@dataclass(frozen=True)
class Extractor:
    """A path into the payload (None: the raw payload text) and the filters applied to what it finds."""

    source: str
    path: JsonPath | None
    filters: tuple[Callable[[Any], Any], ...] = field(default=())

    @property
    def needs_json(self) -> bool:
        return self.path is not None

    def extract(self, doc: Any, raw: str) -> Any:
        value = raw if self.path is None else self.path.get(doc)
        for f in self.filters:
            if value is MISSING:
                break
            value = f(value)
        return value


def path_extractor(text: str) -> Extractor:
    return Extractor(text, JsonPath.parse(text))


def template_extractor(template: str) -> Extractor:
    """The extractor of a Home Assistant value template in the accepted subset; ConfigError otherwise."""
    m = _TEMPLATE.match(template)
    refusal = (
        f"value template {template!r} is outside the supported subset "
        f"({{{{ value_json.PATH | filter }}}} or {{{{ value }}}}, filters: {', '.join(_FILTERS)})"
    )
    if m is None or "{{" in m.group("expr") or "{%" in template:
        raise ConfigError(refusal)
    head, *filters = m.group("expr").split("|")
    head = head.strip()
    if head == "value":
        path = None
    elif head == "value_json" or head.startswith(("value_json.", "value_json[")):
        try:
            path = JsonPath.parse("$" + head[len("value_json") :])
        except ConfigError:
            raise ConfigError(refusal) from None
    else:
        raise ConfigError(refusal)
    funcs = []
    for f in filters:
        fm = _FILTER.match(f)
        if fm is None or fm.group("name") not in _FILTERS:
            raise ConfigError(refusal)
        args = []
        if fm.group("args"):
            for a in fm.group("args").split(","):
                lit = _LITERAL.match(a)
                if lit is None:
                    raise ConfigError(refusal)
                args.append(float(lit.group(1)) if "." in lit.group(1) else int(lit.group(1)))
        try:
            funcs.append(_FILTERS[fm.group("name")](*args))
        except TypeError:
            raise ConfigError(refusal) from None
    return Extractor(template, path, tuple(funcs))
