"""Campaign documents: the YAML an operator writes, checked field by field with line and column.

Parsing goes through PyYAML's *compose* step only: we get the node tree with the position of every
key and value, and never construct Python objects from tags (so ``!!python/...`` tags do nothing but
get refused). Every structural mistake, including a YAML syntax error from an indentation slip, becomes
one :class:`RuleError` that names ``FILE:LINE:COL`` and the reason.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from fleetloop_shared.catalog import Catalog
from fleetloop_shared.choices import check_choice
from fleetloop_shared.errors import RuleError
from fleetloop_shared.privacy.policy import PrivacyPolicy
from fleetloop_shared.rules.durations import UNIT_NS, format_duration, parse_duration
from fleetloop_shared.rules.expression import Expression, compile_expression, compile_located
from fleetloop_shared.rules.location import Locator
from fleetloop_shared.rules.privacy_spec import read_privacy
from fleetloop_shared.rules.selector import parse_selector

API_VERSION = "fleetloop/v1"
KIND = "Campaign"
MODES = ("rising", "always")
#: Largest document accepted; campaigns are a few dozen lines.
MAX_DOCUMENT_CHARS = 256 * 1024
#: Upper bounds that keep a device's ring buffers and debounce state sane.
MAX_PRE_POST_NS = UNIT_NS["h"]
MAX_MIN_INTERVAL_NS = 7 * 24 * UNIT_NS["h"]
DEFAULT_PRIORITY = 5
#: Networks allowed when ``spec.upload.network`` is absent: cellular costs money, so only opt-in.
DEFAULT_NETWORKS = ("wifi",)

_NAME = re.compile(r"[a-z0-9](?:[-a-z0-9.]{0,61}[a-z0-9])?")
_PATTERN = re.compile(r"[A-Za-z0-9_.*?\[\]!-]+")
_NETWORK = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_INTEGER = re.compile(r"[+-]?\d{1,19}")
_STANDARD_TAG = "tag:yaml.org,2002:"


@dataclass(frozen=True)
class CampaignSpec:
    """A validated campaign: what to watch for, what to keep around it, and how urgently to upload it.

    ``document`` is the original YAML text (what the cloud stores and pushes, so the device compiles
    exactly what the operator validated) and ``source`` where it came from (a file name, for messages).
    """

    name: str
    version: int
    when: str
    mode: str  # "rising" | "always"
    min_interval_ns: int
    collect_signals: tuple[str, ...]
    pre_ns: int
    post_ns: int
    priority: int  # 0..9
    selector: str  # spec.target.selector, "" = all devices
    upload_networks: tuple[str, ...]
    max_per_hour: int | None
    expires: datetime | None
    document: str
    source: str
    expression: Expression
    #: ``(glob, minimum sample period ns)`` for ``collect.signals`` entries written as
    #: ``{signal: GLOB, min_period: 100ms}``: a capture keeps at most one sample of those signals per period.
    collect_min_periods: tuple[tuple[str, int], ...] = ()
    #: ``spec.privacy``: what the device must drop, hash, coarsen or suppress before storing a capture.
    privacy: PrivacyPolicy | None = None


def parse_campaign(text: str, source: str = "<campaign>") -> CampaignSpec:
    """Parse and validate one campaign document; :class:`RuleError` with line/col on any error.

    Defaults: ``target.selector`` "" (all devices), ``trigger.mode`` rising, ``trigger.min_interval`` 0,
    ``collect.signals`` the signals the condition reads, ``collect.pre``/``post`` 0, ``priority`` 5,
    ``upload.network`` [wifi], ``upload.max_per_hour`` unlimited, ``expires`` never.
    """
    return _DocumentReader(text, source, None).campaign()


def check_against_catalog(spec: CampaignSpec, catalog: Catalog) -> None:
    """Refuse ``spec`` on a device whose catalog lacks a signal the condition reads or that
    ``collect.signals`` names (each pattern must match at least one signal).

    The check re-reads ``spec.document`` so its errors carry line and column, and so the device checks
    exactly the text the operator validated; a spec built by hand without a document is checked from
    its fields (no positions).
    """
    if spec.document:
        _DocumentReader(spec.document, spec.source, catalog).campaign()
        return
    compile_expression(spec.when, catalog=catalog, source=spec.source, require_condition=True)
    for pattern in spec.collect_signals:
        if not catalog.match([pattern]):
            message = f"collect signal {pattern!r} matches no signal in the catalog"
            raise RuleError(message, source=spec.source)


class _DocumentReader:
    """Walks the composed node tree of one document, refusing anything unexpected with its position."""

    def __init__(self, text: str, source: str, catalog: Catalog | None) -> None:
        self._text = text
        self._source = source
        self._catalog = catalog

    # --- errors ------------------------------------------------------------------------------------

    def _error(self, message: str, node: Node | None) -> RuleError:
        if node is None:
            return RuleError(message, source=self._source)
        mark = node.start_mark
        return RuleError(message, line=mark.line + 1, col=mark.column + 1, source=self._source)

    def _compose(self) -> Node:
        if len(self._text) > MAX_DOCUMENT_CHARS:
            raise RuleError(f"document is larger than {MAX_DOCUMENT_CHARS} characters", source=self._source)
        try:
            root = yaml.compose(self._text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            problem = exc.problem or exc.context or "invalid YAML"
            context = f" ({exc.context})" if exc.context and exc.problem else ""
            message = f"invalid YAML: {problem}{context}"
            if mark is None:
                raise RuleError(message, source=self._source) from None
            raise RuleError(message, line=mark.line + 1, col=mark.column + 1, source=self._source) from None
        except yaml.YAMLError as exc:
            reason = str(exc).splitlines()[0] if str(exc) else "unreadable"
            raise RuleError(f"invalid YAML: {reason}", source=self._source) from None
        except RecursionError:
            raise RuleError("invalid YAML: document is nested too deeply", source=self._source) from None
        if root is None:
            raise RuleError("empty document: expected a Campaign", line=1, col=1, source=self._source)
        return root

    # --- typed field readers -----------------------------------------------------------------------

    def _mapping(
        self, node: Node, where: str, allowed: Sequence[str], required: Sequence[str] = ()
    ) -> dict[str, tuple[Node, Node]]:
        """The fields of a mapping node, by key, with both the key and the value node."""
        if not isinstance(node, MappingNode):
            raise self._error(f"{where} must be a mapping", node)
        self._check_tag(node, where)
        fields: dict[str, tuple[Node, Node]] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                raise self._error(f"{where}: keys must be plain names", key_node)
            key = key_node.value
            path = f"{where}.{key}" if where != "document" else key
            if key in fields:
                raise self._error(f"duplicate field {path!r}", key_node)
            if key not in allowed:
                hint = difflib.get_close_matches(key, allowed, n=1)
                suggestion = f"; did you mean {hint[0]!r}?" if hint else f" (expected: {', '.join(allowed)})"
                raise self._error(f"unknown field {path!r}{suggestion}", key_node)
            fields[key] = (key_node, value_node)
        for key in required:
            if key not in fields:
                path = f"{where}.{key}" if where != "document" else key
                raise self._error(f"missing required field {path!r}", node)
        return fields

    def _check_tag(self, node: Node, where: str) -> None:
        if not node.tag.startswith(_STANDARD_TAG):
            raise self._error(f"{where}: YAML tag {node.tag!r} is not allowed", node)

    def _scalar(self, node: Node, where: str) -> str:
        if not isinstance(node, ScalarNode):
            raise self._error(f"{where} must be a single value, not a list or mapping", node)
        self._check_tag(node, where)
        return str(node.value)

    def _string(self, node: Node, where: str) -> str:
        value = self._scalar(node, where)
        if not value.strip():
            raise self._error(f"{where} must not be empty", node)
        return value

    def _integer(self, node: Node, where: str, low: int, high: int) -> int:
        value = self._scalar(node, where).strip()
        quoted = isinstance(node, ScalarNode) and node.style is not None
        if not _INTEGER.fullmatch(value) or quoted:
            raise self._error(f"{where} must be a whole number, got {value!r}", node)
        number = int(value)
        if not low <= number <= high:
            raise self._error(f"{where} must be between {low} and {high}, got {number}", node)
        return number

    def _duration(self, node: Node, where: str, maximum: int) -> int:
        value = self._scalar(node, where).strip()
        if value == "0":
            return 0
        try:
            ns = parse_duration(value)
        except RuleError as exc:
            raise self._error(f"{where}: {exc.reason}", node) from None
        if ns > maximum:
            raise self._error(f"{where} may be at most {format_duration(maximum)}, got {value}", node)
        return ns

    def _list_of_strings(self, node: Node, where: str) -> list[tuple[str, Node]]:
        if isinstance(node, ScalarNode):
            return [(self._string(node, where), node)]
        if not isinstance(node, SequenceNode):
            raise self._error(f"{where} must be a list", node)
        self._check_tag(node, where)
        return [(self._string(item, f"{where}[{i}]"), item) for i, item in enumerate(node.value)]

    def _timestamp(self, node: Node, where: str) -> datetime:
        value = self._scalar(node, where).strip()
        try:
            stamp = datetime.fromisoformat(value)
        except ValueError:
            message = f"{where} must be a timestamp like 2027-06-30T00:00:00Z, got {value!r}"
            raise self._error(message, node) from None
        if stamp.tzinfo is None:
            raise self._error(f"{where} needs a time zone (e.g. 2027-06-30T00:00:00Z), got {value!r}", node)
        return stamp

    # --- the document --------------------------------------------------------------------------------

    def campaign(self) -> CampaignSpec:
        root = self._compose()
        top = self._mapping(
            root,
            "document",
            ("apiVersion", "kind", "metadata", "spec"),
            ("apiVersion", "kind", "metadata", "spec"),
        )
        api_node = top["apiVersion"][1]
        if self._scalar(api_node, "apiVersion") != API_VERSION:
            raise self._error(f"apiVersion must be {API_VERSION!r}, got {api_node.value!r}", api_node)
        kind_node = top["kind"][1]
        if self._scalar(kind_node, "kind") != KIND:
            raise self._error(f"kind must be {KIND!r}, got {kind_node.value!r}", kind_node)

        meta = self._mapping(
            top["metadata"][1], "metadata", ("name", "version", "description", "labels"), ("name", "version")
        )
        name_node = meta["name"][1]
        name = self._string(name_node, "metadata.name")
        if not _NAME.fullmatch(name):
            raise self._error(
                f"metadata.name {name!r} must be lowercase letters, digits, '-' or '.' (at most 63)",
                name_node,
            )
        version = self._integer(meta["version"][1], "metadata.version", 1, 2**63 - 1)
        if "description" in meta:
            self._scalar(meta["description"][1], "metadata.description")
        if "labels" in meta:
            for key, (_, value) in self._mapping(
                meta["labels"][1], "metadata.labels", self._keys(meta["labels"][1])
            ).items():
                self._scalar(value, f"metadata.labels.{key}")

        spec = self._mapping(
            top["spec"][1],
            "spec",
            ("target", "trigger", "collect", "priority", "upload", "expires", "privacy"),
            ("trigger",),
        )

        selector = ""
        if "target" in spec:
            target = self._mapping(spec["target"][1], "spec.target", ("selector",))
            if "selector" in target:
                node = target["selector"][1]
                selector = self._scalar(node, "spec.target.selector")
                parse_selector(selector, self._locator(selector, node))

        trigger = self._mapping(
            spec["trigger"][1], "spec.trigger", ("when", "mode", "min_interval"), ("when",)
        )
        when_node = trigger["when"][1]
        when = self._string(when_node, "spec.trigger.when")
        expression = compile_located(
            when, self._locator(when, when_node), self._catalog, require_condition=True
        )
        mode = "rising"
        if "mode" in trigger:
            mode_node = trigger["mode"][1]
            mode = check_choice(
                self._scalar(mode_node, "spec.trigger.mode"),
                MODES,
                "spec.trigger.mode",
                error=lambda message: self._error(message, mode_node),
            )
        min_interval = 0
        if "min_interval" in trigger:
            min_interval = self._duration(
                trigger["min_interval"][1], "spec.trigger.min_interval", MAX_MIN_INTERVAL_NS
            )

        collect_signals, pre, post, min_periods = self._collect(spec, expression)

        priority = DEFAULT_PRIORITY
        if "priority" in spec:
            priority = self._integer(spec["priority"][1], "spec.priority", 0, 9)

        networks: tuple[str, ...] = DEFAULT_NETWORKS
        max_per_hour: int | None = None
        if "upload" in spec:
            upload = self._mapping(spec["upload"][1], "spec.upload", ("network", "max_per_hour"))
            if "network" in upload:
                items = self._list_of_strings(upload["network"][1], "spec.upload.network")
                for network, network_node in items:
                    if not _NETWORK.fullmatch(network):
                        raise self._error(
                            f"spec.upload.network: {network!r} is not a network name", network_node
                        )
                if not items:
                    raise self._error("spec.upload.network must name a network", upload["network"][1])
                networks = tuple(dict.fromkeys(network for network, _ in items))
            if "max_per_hour" in upload:
                max_per_hour = self._integer(
                    upload["max_per_hour"][1], "spec.upload.max_per_hour", 1, 1_000_000
                )

        expires = None
        if "expires" in spec:
            expires = self._timestamp(spec["expires"][1], "spec.expires")

        privacy = None
        if "privacy" in spec:
            privacy = read_privacy(self, spec["privacy"][1], name, self._catalog)

        return CampaignSpec(
            name=name,
            version=version,
            when=when,
            mode=mode,
            min_interval_ns=min_interval,
            collect_signals=collect_signals,
            pre_ns=pre,
            post_ns=post,
            priority=priority,
            selector=selector,
            upload_networks=networks,
            max_per_hour=max_per_hour,
            expires=expires,
            document=self._text,
            source=self._source,
            expression=expression,
            collect_min_periods=min_periods,
            privacy=privacy,
        )

    def _collect(
        self, spec: dict[str, tuple[Node, Node]], expression: Expression
    ) -> tuple[tuple[str, ...], int, int, tuple[tuple[str, int], ...]]:
        if "collect" not in spec:
            return tuple(sorted(expression.signals)), 0, 0, ()
        collect = self._mapping(spec["collect"][1], "spec.collect", ("signals", "pre", "post"))
        patterns: tuple[str, ...] = tuple(sorted(expression.signals))
        min_periods: list[tuple[str, int]] = []
        if "signals" in collect:
            items = self._collect_items(collect["signals"][1])
            if not items:
                raise self._error("spec.collect.signals must name at least one signal", collect["signals"][1])
            for value, node, period in items:
                if not _PATTERN.fullmatch(value):
                    raise self._error(f"spec.collect.signals: {value!r} is not a signal path or glob", node)
                if self._catalog is not None and not self._catalog.match([value]):
                    raise self._error(
                        f"spec.collect.signals: {value!r} matches no signal in the catalog", node
                    )
                if period:
                    min_periods.append((value, period))
            patterns = tuple(dict.fromkeys(value for value, _, _ in items))
        pre = post = 0
        if "pre" in collect:
            pre = self._duration(collect["pre"][1], "spec.collect.pre", MAX_PRE_POST_NS)
        if "post" in collect:
            post = self._duration(collect["post"][1], "spec.collect.post", MAX_PRE_POST_NS)
        return patterns, pre, post, tuple(min_periods)

    def _collect_items(self, node: Node) -> list[tuple[str, Node, int]]:
        """``collect.signals``: a glob, or a list of globs and ``{signal: GLOB, min_period: DURATION}``."""
        where = "spec.collect.signals"
        if isinstance(node, ScalarNode):
            return [(self._string(node, where), node, 0)]
        if not isinstance(node, SequenceNode):
            raise self._error(f"{where} must be a list", node)
        self._check_tag(node, where)
        items: list[tuple[str, Node, int]] = []
        for i, item in enumerate(node.value):
            if isinstance(item, MappingNode):
                fields = self._mapping(item, f"{where}[{i}]", ("signal", "min_period"), ("signal",))
                value_node = fields["signal"][1]
                period = 0
                if "min_period" in fields:
                    period = self._duration(
                        fields["min_period"][1], f"{where}[{i}].min_period", MAX_PRE_POST_NS
                    )
                items.append((self._string(value_node, f"{where}[{i}].signal"), value_node, period))
            else:
                items.append((self._string(item, f"{where}[{i}]"), item, 0))
        return items

    def _keys(self, node: Node) -> tuple[str, ...]:
        """All keys of a free-form mapping (labels), so only structure is checked there."""
        if not isinstance(node, MappingNode):
            return ()
        return tuple(k.value for k, _ in node.value if isinstance(k, ScalarNode))

    def _locator(self, value: str, node: Node) -> Locator:
        start, end = node.start_mark.index, node.end_mark.index
        return Locator.within(value, self._text, start, end, source=self._source)
