"""Reading a rollout policy: one declarative document, validated with ``FILE:LINE:COL`` errors.

YAML read by :func:`fleetloop_shared.yaml_marks.load_marked` keeps each key's position; JSON from the API
has none. :func:`parse_policy` reads either into the model of :mod:`.policy`, naming every wrong field by
its dotted path (``spec.phases[1].percent``) and, from a file, its position. Policies written by earlier
versions (flat ``release_version``, ``success_percent``, …) still read.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum
from typing import Any, TypeVar

from fleetloop_cloud.rollout.policy import (
    API_VERSION,
    KIND,
    MAX_GATES,
    MAX_LISTED_DEVICES,
    MAX_PHASES,
    MAX_RULES,
    TEN_YEARS_S,
    AbortCriterion,
    BrakeAction,
    Direction,
    EndBehavior,
    Execution,
    ExponentialRate,
    FailureType,
    GateKind,
    Install,
    InstallType,
    Maintenance,
    MaintenanceWindow,
    PhaseSpec,
    Rate,
    RateCriterion,
    RetryRule,
    RolloutPolicy,
    Schedule,
    Selection,
    SignalGate,
    SuccessAction,
    SuccessCondition,
    Target,
    WindowScope,
)
from fleetloop_cloud.rollout.windows import parse_cron, zone
from fleetloop_shared.choices import check_choice
from fleetloop_shared.errors import UserError
from fleetloop_shared.yaml_marks import location

E = TypeVar("E", bound=StrEnum)


class _Reader:
    """Reads one mapping, naming each field by its dotted path and, for YAML, its FILE:LINE:COL."""

    def __init__(self, data: Any, path: str, parent: _Reader | None = None, key: Any = None) -> None:
        if not isinstance(data, Mapping):
            where = parent.where(key) if parent is not None else ""
            raise UserError(f"{where}{path or 'rollout policy'}: expected a mapping, got {_show(data)}")
        self.data = data
        self.path = path

    def where(self, key: Any = None) -> str:
        return location(self.data, key)

    def name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str | None, message: str) -> UserError:
        label = self.name(key) if key is not None else (self.path or "rollout policy")
        return UserError(f"{self.where(key)}{label}: {message}")

    def only(self, allowed: Sequence[str]) -> None:
        for key in self.data:
            if key not in allowed:
                hint = f" (expected one of {', '.join(allowed)})" if len(allowed) <= 12 else ""
                raise self.fail(str(key), f"unknown field{hint}")

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def raw(self, key: str, default: Any = None) -> Any:
        value = self.data.get(key)
        return default if value is None else value

    def required(self, key: str) -> Any:
        if self.data.get(key) is None:
            raise self.fail(key, "required")
        return self.data[key]

    def child(self, key: str) -> _Reader | None:
        return _Reader(self.data[key], self.name(key), self, key) if self.has(key) else None

    def items(self, key: str, limit: int) -> list[tuple[str, Any]]:
        value = self.data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(key, f"expected a list, got {_show(value)}")
        if len(value) > limit:
            raise self.fail(key, f"at most {limit} entries, got {len(value)}")
        return [(f"{self.name(key)}[{i}]", item) for i, item in enumerate(value)]

    def mapping_item(self, key: str, path: str, item: Any) -> _Reader:
        return _Reader(item, path, self, key)

    # typed fields
    def text(self, key: str, default: str | None = None, *, allow_empty: bool = False) -> str:
        value = self.raw(key, default) if default is not None else self.required(key)
        if not isinstance(value, str) or (not allow_empty and not value.strip()):
            raise self.fail(key, f"expected a non-empty string, got {_show(value)}")
        return value

    def number(self, key: str, default: float | None, *, lo: float, hi: float) -> float | None:
        value = self.raw(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"expected a number, got {_show(value)}")
        number = float(value)
        if not math.isfinite(number) or not lo <= number <= hi:
            raise self.fail(key, f"must be between {lo:g} and {hi:g}, got {value!r}")
        return number

    def integer(self, key: str, default: int | None, *, lo: int, hi: int = 2**31) -> int | None:
        value = self.raw(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected a whole number, got {_show(value)}")
        if not lo <= value <= hi:
            raise self.fail(key, f"must be between {lo} and {hi}, got {value}")
        return value

    def duration(self, key: str, default: float | None) -> float | None:
        value = self.raw(key, default)
        if value is None:
            return None
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise self.fail(key, str(exc)) from None

    def time(self, key: str) -> float | None:
        value = self.raw(key)
        if value is None:
            return None
        try:
            return parse_time(value)
        except ValueError as exc:
            raise self.fail(key, str(exc)) from None

    def choice(self, key: str, enum: type[E], default: E) -> E:
        value = self.raw(key, default.value)
        return enum(
            check_choice(value, [e.value for e in enum], error=lambda problem: self.fail(key, problem))
        )


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string like ``90s``, ``10m``, ``1h``, ``2d``; ValueError otherwise."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise ValueError(f"expected a duration like 30s, 10m, 1h or 2d, got {value!r}")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a duration like 30s, 10m, 1h or 2d, got {_show(value)}")
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or not 0 <= seconds <= TEN_YEARS_S:
        raise ValueError(f"duration must be between 0 and 10 years, got {value!r}")
    return seconds


def parse_time(value: Any) -> float:
    """Unix seconds from an ISO 8601 time (a YAML timestamp, or a string with a zone) or a number."""
    if isinstance(value, dt.datetime):
        moment = value
    elif isinstance(value, dt.date):
        moment = dt.datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        try:
            moment = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"expected a time like 2026-03-01T02:00:00Z, got {value!r}") from None
    elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    else:
        raise ValueError(f"expected a time like 2026-03-01T02:00:00Z, got {_show(value)}")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)  # YAML timestamps without a zone are UTC
    return moment.timestamp()


def format_time(unix: float) -> str:
    return dt.datetime.fromtimestamp(unix, dt.UTC).isoformat().replace("+00:00", "Z")


def _success(r: _Reader | None, default: SuccessCondition) -> SuccessCondition:
    if r is None:
        return default
    r.only(("percent", "timeout", "action"))
    return SuccessCondition(
        percent=r.number("percent", default.percent, lo=0.0, hi=100.0) or 0.0,
        timeout_s=r.duration("timeout", default.timeout_s) or 0.0,
        action=r.choice("action", SuccessAction, default.action),
    )


def _phases(spec: _Reader) -> tuple[PhaseSpec, ...]:
    items = spec.items("phases", MAX_PHASES)
    if not items:
        raise spec.fail("phases", "a rollout needs at least one phase")
    phases: list[PhaseSpec] = []
    seen: set[str] = set()
    last_percent = 0.0
    for path, item in items:
        r = spec.mapping_item("phases", path, item)
        r.only(("name", "percent", "count", "soak", "start", "success"))
        name = r.text("name")
        if name in seen:
            raise r.fail("name", f"phase name {name!r} is used twice")
        seen.add(name)
        if r.has("percent") and r.has("count"):
            raise r.fail(None, "give either percent or count, not both")
        percent = r.number("percent", None, lo=0.0, hi=100.0)
        if percent is not None:
            if percent < last_percent:
                raise r.fail(
                    "percent",
                    f"percents are cumulative and must not decrease ({percent:g} after {last_percent:g})",
                )
            last_percent = percent
        success = r.child("success")
        phases.append(
            PhaseSpec(
                name=name,
                percent=percent,
                count=r.integer("count", None, lo=0),
                min_soak_s=r.duration("soak", 0.0) or 0.0,
                start_at=r.time("start"),
                success=_success(success, SuccessCondition()) if success is not None else None,
            )
        )
    last = phases[-1]
    if last.percent is not None and last.percent < 100.0:
        path = items[-1][0]
        raise spec.mapping_item("phases", path, items[-1][1]).fail(
            "percent", f"the last phase must reach 100 (got {last.percent:g})"
        )
    return tuple(phases)


def _abort(spec: _Reader) -> tuple[AbortCriterion, ...]:
    if not spec.has("abort"):
        return (AbortCriterion(),)
    out = []
    for path, item in spec.items("abort", MAX_RULES):
        r = spec.mapping_item("abort", path, item)
        r.only(("failure_type", "threshold_percent", "min_executed", "action"))
        out.append(
            AbortCriterion(
                failure_type=r.choice("failure_type", FailureType, FailureType.FAILED),
                threshold_percent=r.number("threshold_percent", 20.0, lo=0.0, hi=100.0) or 0.0,
                min_executed=r.integer("min_executed", 1, lo=1) or 1,
                action=r.choice("action", BrakeAction, BrakeAction.PAUSE),
            )
        )
    return tuple(out)


def _gates(spec: _Reader, phase_names: set[str]) -> tuple[SignalGate, ...]:
    out: list[SignalGate] = []
    seen: set[str] = set()
    for path, item in spec.items("gates", MAX_GATES):
        r = spec.mapping_item("gates", path, item)
        r.only(
            (
                "name",
                "capture_rate",
                "signal",
                "confidence",
                "min_effect",
                "min_exposure",
                "min_devices",
                "interval",
                "phases",
                "action",
            )
        )
        name = r.text("name")
        if name in seen:
            raise r.fail("name", f"gate name {name!r} is used twice")
        seen.add(name)
        rate, signal = r.child("capture_rate"), r.child("signal")
        if (rate is None) == (signal is None):
            raise r.fail(None, "a gate needs exactly one of capture_rate: {campaign} or signal: {aggregate}")
        campaign = aggregate = where = ""
        direction = Direction.INCREASE
        if rate is not None:
            rate.only(("campaign",))
            campaign = rate.text("campaign")
            kind = GateKind.CAPTURE_RATE
        else:
            assert signal is not None
            signal.only(("aggregate", "where", "direction"))
            aggregate = signal.text("aggregate")
            where = signal.text("where", "", allow_empty=True)
            for key, text in (("aggregate", aggregate), ("where", where)):
                if ";" in text:
                    raise signal.fail(key, "one SQL expression over samples, without ';'")
            direction = signal.choice("direction", Direction, Direction.INCREASE)
            kind = GateKind.SIGNAL
        phases: list[str] = []
        for ppath, value in r.items("phases", MAX_PHASES):
            if value not in phase_names:
                raise UserError(f"{r.where('phases')}{ppath}: no phase named {_show(value)}")
            phases.append(str(value))
        min_effect = r.number("min_effect", 0.2, lo=0.0, hi=1e12) or 0.0
        out.append(
            SignalGate(
                name=name,
                kind=kind,
                campaign=campaign,
                aggregate=aggregate,
                where=where,
                direction=direction,
                confidence=r.number("confidence", 0.99, lo=0.5, hi=0.999999) or 0.99,
                min_effect=min_effect,
                min_exposure_h=(r.duration("min_exposure", 3600.0) or 0.0) / 3600.0,
                min_devices=r.integer("min_devices", 3, lo=1 if kind is GateKind.CAPTURE_RATE else 2) or 1,
                interval_s=max(r.duration("interval", 60.0) or 60.0, 1.0),
                phases=tuple(phases),
                action=r.choice("action", BrakeAction, BrakeAction.ROLL_BACK),
            )
        )
    return tuple(out)


def _rate(r: _Reader | None) -> Rate:
    if r is None:
        return Rate()
    r.only(("max_per_minute", "exponential"))
    exponential = None
    e = r.child("exponential")
    if e is not None:
        e.only(("base_per_minute", "increment_factor", "increase_after"))
        after = e.child("increase_after")
        if after is None:
            raise e.fail("increase_after", "required: {notified: N} or {succeeded: N}")
        after.only(("notified", "succeeded"))
        if after.has("notified") == after.has("succeeded"):
            raise after.fail(None, "give exactly one of notified or succeeded")
        criterion = RateCriterion.NOTIFIED if after.has("notified") else RateCriterion.SUCCEEDED
        exponential = ExponentialRate(
            base_per_minute=e.number("base_per_minute", None, lo=0.01, hi=1e6)
            or _missing(e, "base_per_minute"),
            increment_factor=e.number("increment_factor", 2.0, lo=1.0, hi=10.0) or 2.0,
            increase_after=after.integer(criterion.value, None, lo=1) or 1,
            criterion=criterion,
        )
    return Rate(max_per_minute=r.number("max_per_minute", None, lo=0.01, hi=1e6), exponential=exponential)


def _missing(r: _Reader, key: str) -> float:
    raise r.fail(key, "required")


def _schedule(r: _Reader | None) -> Schedule:
    if r is None:
        return Schedule()
    r.only(("start", "end", "end_behavior"))
    start, end = r.time("start"), r.time("end")
    if start is not None and end is not None and end <= start:
        raise r.fail("end", "must be after start")
    return Schedule(start, end, r.choice("end_behavior", EndBehavior, EndBehavior.STOP))


def _maintenance(r: _Reader | None) -> Maintenance:
    if r is None:
        return Maintenance()
    r.only(("windows", "scope", "default_time_zone"))
    windows = []
    default_zone = r.text("default_time_zone", "UTC")
    _check(r, "default_time_zone", lambda: zone(default_zone))
    for path, item in r.items("windows", MAX_RULES):
        w = r.mapping_item("windows", path, item)
        w.only(("cron", "duration", "time_zone"))
        cron = w.text("cron")
        _check(w, "cron", lambda c=cron: parse_cron(c))  # type: ignore[misc]
        tz = w.text("time_zone", "device")
        if tz != "device":
            _check(w, "time_zone", lambda z=tz: zone(z))  # type: ignore[misc]
        duration = w.duration("duration", None)
        if not duration:
            raise w.fail("duration", "required (a window of 0 s never opens)")
        windows.append(MaintenanceWindow(cron, duration, tz))
    if not windows:
        raise r.fail("windows", "at least one window (cron, duration, time_zone)")
    return Maintenance(tuple(windows), r.choice("scope", WindowScope, WindowScope.INSTALL), default_zone)


def _check(r: _Reader, key: str, check: Callable[[], object]) -> None:
    try:
        check()
    except UserError as exc:
        raise r.fail(key, str(exc)) from None


def _install(r: _Reader | None) -> Install:
    if r is None:
        return Install()
    r.only(("type", "forced_at"))
    kind = r.choice("type", InstallType, InstallType.SOFT)
    forced_at = r.time("forced_at")
    if (kind is InstallType.TIMEFORCED) != (forced_at is not None):
        raise r.fail("forced_at", "timeforced needs forced_at, and only timeforced takes it")
    return Install(kind, forced_at)


def _execution(r: _Reader | None) -> Execution:
    if r is None:
        return Execution()
    r.only(("retries", "in_progress_timeout"))
    retries = []
    seen: set[FailureType] = set()
    for path, item in r.items("retries", MAX_RULES):
        x = r.mapping_item("retries", path, item)
        x.only(("failure_type", "max", "backoff", "factor"))
        failure_type = x.choice("failure_type", FailureType, FailureType.FAILED)
        if failure_type in seen:
            raise x.fail("failure_type", f"{failure_type.value} has a retry rule already")
        seen.add(failure_type)
        retries.append(
            RetryRule(
                failure_type=failure_type,
                max=x.integer("max", 1, lo=0, hi=100) or 0,
                backoff_s=x.duration("backoff", 60.0) or 0.0,
                factor=x.number("factor", 2.0, lo=1.0, hi=10.0) or 1.0,
            )
        )
    return Execution(tuple(retries), r.duration("in_progress_timeout", None))


def _target(spec: _Reader) -> Target:
    r = spec.child("target")
    if r is None:
        return Target()
    r.only(("selector", "selection", "max_devices", "devices"))
    devices = []
    for path, value in r.items("devices", MAX_LISTED_DEVICES):
        if not isinstance(value, str) or not value:
            raise UserError(f"{r.where('devices')}{path}: expected a device id, got {_show(value)}")
        devices.append(value)
    if len(set(devices)) != len(devices):
        raise r.fail("devices", "a device is listed twice")
    return Target(
        selector=r.text("selector", "", allow_empty=True),
        selection=r.choice("selection", Selection, Selection.SNAPSHOT),
        max_devices=r.integer("max_devices", None, lo=1),
        devices=tuple(devices),
    )


_SPEC_FIELDS = (
    "release",
    "target",
    "phases",
    "success",
    "abort",
    "gates",
    "rate",
    "schedule",
    "maintenance",
    "install",
    "execution",
    "weight",
)
_LEGACY_FIELDS = frozenset(
    {
        "release_version",
        "release_name",
        "selector",
        "success_percent",
        "max_failure_percent",
        "min_executed_for_brake",
        "phase_timeout_s",
    }
)


def parse_policy(doc: Any) -> RolloutPolicy:
    """A policy from a whole document (``apiVersion``, ``kind: Rollout``, ``spec``) or a bare spec.

    UserError naming the field (``spec.phases[1].percent``) and, for YAML read with positions, where it
    is (``rollout.yaml:12:9: ``).
    """
    top = _Reader(doc, "")
    if "spec" in top.data or "apiVersion" in top.data or "kind" in top.data:
        top.only(("apiVersion", "kind", "metadata", "spec"))
        if top.raw("apiVersion", API_VERSION) != API_VERSION:
            raise top.fail("apiVersion", f"expected {API_VERSION}, got {_show(top.raw('apiVersion'))}")
        if top.raw("kind", KIND) != KIND:
            raise top.fail("kind", f"expected {KIND}, got {_show(top.raw('kind'))}")
        spec = top.child("spec")
        if spec is None:
            raise top.fail("spec", "required")
    else:
        spec = top
    if any(k in _LEGACY_FIELDS for k in spec.data):
        return parse_policy(_from_legacy(spec))
    spec.only(_SPEC_FIELDS)
    release = spec.child("release")
    if release is None:
        raise spec.fail("release", "required: {name, version}")
    release.only(("name", "version"))
    phases = _phases(spec)
    policy = RolloutPolicy(
        release_version=release.text("version"),
        release_name=release.text("name", "", allow_empty=True),
        phases=phases,
        target=_target(spec),
        success=_success(spec.child("success"), SuccessCondition()),
        abort=_abort(spec),
        gates=_gates(spec, {p.name for p in phases}),
        rate=_rate(spec.child("rate")),
        schedule=_schedule(spec.child("schedule")),
        maintenance=_maintenance(spec.child("maintenance")),
        install=_install(spec.child("install")),
        execution=_execution(spec.child("execution")),
        weight=spec.integer("weight", 0, lo=-1_000_000, hi=1_000_000) or 0,
    )
    return policy


def _from_legacy(r: _Reader) -> dict[str, Any]:
    """The flat form of earlier versions (still stored in older databases) as a spec."""
    r.only(tuple(sorted(_LEGACY_FIELDS | {"phases"})))
    phases = []
    for path, item in r.items("phases", MAX_PHASES):
        p = r.mapping_item("phases", path, item)
        p.only(("name", "percent", "count", "min_soak_s"))
        phase = {k: p.data[k] for k in ("name", "percent", "count") if p.data.get(k) is not None}
        phase["soak"] = p.data.get("min_soak_s", 0.0)
        phases.append(phase)
    return {
        "release": {"version": r.required("release_version"), "name": r.raw("release_name", "")},
        "target": {"selector": r.raw("selector", "")},
        "phases": phases,
        "success": {"percent": r.raw("success_percent", 100.0), "timeout": r.raw("phase_timeout_s", 600.0)},
        "abort": [
            {
                "failure_type": "FAILED",
                "threshold_percent": r.raw("max_failure_percent", 20.0),
                "min_executed": r.raw("min_executed_for_brake", 1),
                "action": "pause",
            }
        ],
    }
