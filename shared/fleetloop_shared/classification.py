"""Signal classes: how much a signal says about a person, which decides who may read it in the cloud.

Five classes, from least to most protected: ``public`` (could be published), ``internal`` (the fleet's
own engineering data), ``location`` (where a vehicle is: latitude and longitude above all), ``personal``
(identifies a person: a VIN, a driver id) and ``sensitive`` (special categories: health, biometrics,
cabin audio). Devices do not send classes (their hello carries paths and types only); the cloud assigns
them from a fleet-level :class:`Classification` — rules of (fleet glob, signal glob, class) — on top of
built-in defaults by VSS path. A signal no rule matches is ``internal``: a fleet that forgot to classify
a signal does not publish it, and the classes that need a decision (``location``, ``personal``,
``sensitive``) are named by the defaults or by the fleet.

Rules are ordered once (:meth:`Classification.ordered`) and the first match wins, so the Python answer
here and the query layer's row filter (built from the same ordered rules) always agree:

1. a fleet's own rules before rules for every fleet (``*``), and both before the defaults;
2. within one level, the more specific pattern first (more literal characters);
3. on a tie, the stricter class first — when two rules are equally sure, the safer one holds.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from fleetloop_shared.errors import UserError


class SignalClass(StrEnum):
    PUBLIC = "public"
    INTERNAL = "internal"
    LOCATION = "location"
    PERSONAL = "personal"
    SENSITIVE = "sensitive"

    @property
    def strictness(self) -> int:
        """0 (public) to 4 (sensitive): the order in which classes protect more."""
        return _ORDER.index(self)


class Visibility(StrEnum):
    """What a reader gets of a class: every value, positions rounded to a grid, or no row at all."""

    FULL = "full"
    COARSENED = "coarsened"
    WITHHELD = "withheld"


_ORDER = (SignalClass.PUBLIC, SignalClass.INTERNAL, SignalClass.LOCATION, SignalClass.PERSONAL,
          SignalClass.SENSITIVE)  # fmt: skip
#: The class of a signal no rule names: fail closed, never ``public``.
DEFAULT_CLASS = SignalClass.INTERNAL
#: Characters a classification pattern may hold: VSS/CAN path characters and the globs ``*`` and ``?``
#: (no ``[...]`` sets: one meaning however a reader matches it).
_PATTERN = re.compile(r"^[A-Za-z0-9_.:/\-*?]{1,256}$")
#: Rules a classification may hold.
MAX_RULES = 10_000


def parse_class(text: object, where: str = "class") -> SignalClass:
    """A class by name; UserError listing the classes for anything else."""
    try:
        return SignalClass(str(text))
    except ValueError:
        names = ", ".join(c.value for c in SignalClass)
        raise UserError(f"{where}: unknown signal class {text!r}; classes are {names}") from None


def check_pattern(pattern: object, where: str) -> str:
    if not isinstance(pattern, str) or not _PATTERN.match(pattern):
        raise UserError(
            f"{where}: {pattern!r} is not a signal or fleet pattern (letters, digits, . _ - : / and the "
            "globs * and ?; at most 256 characters)"
        )
    return pattern


@dataclass(frozen=True)
class ClassRule:
    """Signals of fleets matching ``fleet`` whose path matches ``signal`` are of class ``signal_class``."""

    fleet: str
    signal: str
    signal_class: SignalClass
    #: 0: a fleet's own rule, 1: a rule for every fleet, 2: a built-in default.
    level: int = 1

    def matches(self, fleet: str, path: str) -> bool:
        return fnmatch.fnmatchcase(fleet, self.fleet) and fnmatch.fnmatchcase(path, self.signal)

    @property
    def specificity(self) -> int:
        return sum(1 for ch in self.signal if ch not in "*?")


#: What a fleet gets without classifying anything (VSS paths): identifiers are personal, positions are
#: location, the driver's and the cabin's body signals are sensitive.
DEFAULT_RULES: tuple[ClassRule, ...] = tuple(
    ClassRule("*", pattern, cls, level=2)
    for pattern, cls in (
        ("Vehicle.VehicleIdentification.*", SignalClass.PERSONAL),
        ("*.VIN", SignalClass.PERSONAL),
        ("Vehicle.Driver.Identifier.*", SignalClass.PERSONAL),
        ("*.CurrentLocation.*", SignalClass.LOCATION),
        ("Vehicle.Driver.*", SignalClass.SENSITIVE),
        ("Vehicle.Cabin.*Microphone*", SignalClass.SENSITIVE),
        ("Vehicle.Cabin.*Camera*", SignalClass.SENSITIVE),
    )
)


def ordered(rules: Iterable[ClassRule]) -> list[ClassRule]:
    """``rules`` in the order the first match wins (see the module's docstring)."""
    return sorted(rules, key=lambda r: (r.level, -r.specificity, -r.signal_class.strictness))


@dataclass(frozen=True)
class Classification:
    """The rules one deployment classifies its fleets' signals by (defaults included)."""

    rules: tuple[ClassRule, ...] = ()
    defaults: tuple[ClassRule, ...] = DEFAULT_RULES

    def ordered(self) -> list[ClassRule]:
        return ordered([*self.rules, *self.defaults])

    def classify(self, fleet: str, path: str) -> SignalClass:
        for rule in self.ordered():
            if rule.matches(fleet, path):
                return rule.signal_class
        return DEFAULT_CLASS


def classification_from_document(doc: Any, source: str) -> Classification:
    """A classification file: ``{rules: [{fleet, signal, class}, ...]}`` (``fleet`` defaults to ``*``),
    or a catalog file whose signals carry a ``class`` (``{signals: [{path, class}, ...]}``: rules for
    every fleet, exact paths). UserError naming the entry for anything else."""
    if not isinstance(doc, Mapping) or not ({"rules", "signals"} & set(doc)):
        raise UserError(f"{source}: a classification holds 'rules: [{{fleet, signal, class}}]' or a "
                        "catalog's 'signals: [{path, class}]'")  # fmt: skip
    rules: list[ClassRule] = []
    for key in ("rules", "signals"):
        entries = doc.get(key) or []
        if not isinstance(entries, Sequence) or isinstance(entries, str):
            raise UserError(f"{source}: {key} must be a list")
        for i, entry in enumerate(entries):
            where = f"{source}: {key}[{i}]"
            if not isinstance(entry, Mapping):
                raise UserError(f"{where}: must be a mapping")
            if key == "signals" and "class" not in entry:
                continue  # a catalog entry without a class: the defaults decide
            fleet = check_pattern(entry.get("fleet", "*"), f"{where}.fleet")
            signal = check_pattern(entry.get("signal" if key == "rules" else "path"), f"{where}.signal")
            cls = parse_class(entry.get("class"), f"{where}.class")
            rules.append(ClassRule(fleet, signal, cls, level=1 if fleet == "*" else 0))
    if len(rules) > MAX_RULES:
        raise UserError(f"{source}: {len(rules)} rules, at most {MAX_RULES}")
    return Classification(tuple(rules))


@dataclass(frozen=True)
class ClassView:
    """What one reader may see of each class, and the rules signals get their class by."""

    visibility: Mapping[SignalClass, Visibility]
    classification: Classification = field(default_factory=Classification)

    def of(self, cls: SignalClass) -> Visibility:
        """A class the mapping does not name is withheld (fail closed)."""
        return self.visibility.get(cls, Visibility.WITHHELD)

    def limited(self) -> dict[str, str]:
        """The classes this view does not show whole, and how it shows them (what access records name)."""
        return {c.value: self.of(c).value for c in SignalClass if self.of(c) is not Visibility.FULL}


#: The coordinator itself (rollout gates, in-process tools): every class whole.
FULL_VIEW = ClassView({c: Visibility.FULL for c in SignalClass})


def read_classification(path: Path) -> Classification:
    """A classification file (YAML or JSON; see :func:`classification_from_document`)."""
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such classification file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not YAML or JSON ({str(exc).splitlines()[0]})") from None
    return classification_from_document(doc, str(path))
