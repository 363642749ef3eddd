"""Label selectors, kubectl style: which devices a campaign targets.

``"fleet=taxi,hw=gen2"`` — every requirement must hold. Supported requirements: ``k=v`` (or ``k==v``),
``k!=v`` (also true when the label is absent, as in Kubernetes), ``k`` (label present) and ``!k``
(label absent). The empty selector matches every device.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

from fleetloop_shared.rules.location import Locator

_KEY = r"[A-Za-z0-9](?:[A-Za-z0-9._/-]*[A-Za-z0-9])?"
_VALUE = r"(?:[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)?"
_REQUIREMENT = re.compile(
    rf"\s*(?:!\s*(?P<absent>{_KEY})|(?P<key>{_KEY})\s*(?:(?P<op>==|!=|=)\s*(?P<value>{_VALUE}))?)\s*"
)
#: Longest selector accepted (Kubernetes label keys and values are at most a few hundred characters).
MAX_SELECTOR_CHARS = 4096


@dataclass(frozen=True, slots=True)
class _Requirement:
    key: str
    op: str  # "=", "!=", "exists", "!exists"
    value: str

    def holds(self, labels: Mapping[str, str]) -> bool:
        if self.op == "exists":
            return self.key in labels
        if self.op == "!exists":
            return self.key not in labels
        if self.op == "=":
            return labels.get(self.key) == self.value
        return labels.get(self.key) != self.value


def parse_selector(selector: str, locator: Locator | None = None) -> tuple[_Requirement, ...]:
    """The requirements of ``selector``; :class:`RuleError` pointing at the first malformed one."""
    loc = locator or Locator.standalone(selector, source="<selector>")
    if len(selector) > MAX_SELECTOR_CHARS:
        raise loc.error(f"selector is longer than {MAX_SELECTOR_CHARS} characters", 0)
    if not selector.strip():
        return ()
    requirements: list[_Requirement] = []
    offset = 0
    for part in selector.split(","):
        match = _REQUIREMENT.fullmatch(part)
        if match is None:
            where = offset + (len(part) - len(part.lstrip()))
            raise loc.error(
                f"malformed selector requirement {part.strip()!r} (write key=value, key!=value, key or !key)",
                where,
            )
        if match["absent"] is not None:
            requirements.append(_Requirement(match["absent"], "!exists", ""))
        elif match["op"] is None:
            requirements.append(_Requirement(match["key"], "exists", ""))
        else:
            op = "!=" if match["op"] == "!=" else "="
            requirements.append(_Requirement(match["key"], op, match["value"]))
        offset += len(part) + 1
    return tuple(requirements)


@lru_cache(maxsize=256)
def _cached(selector: str) -> tuple[_Requirement, ...]:
    return parse_selector(selector)


def selector_matches(selector: str, labels: Mapping[str, str]) -> bool:
    """Whether a device with ``labels`` is targeted by ``selector``; :class:`RuleError` if malformed."""
    return all(req.holds(labels) for req in _cached(selector))
