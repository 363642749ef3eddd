"""What the fleet-signal gates read from the fleet store: capture counts, exposures and per-device values.

:mod:`fleetloop_cloud.rollout.gates` decides on plain numbers; this is its I/O shell. A cohort is a set of
devices, each counted over its own span of time (a device joins the updated cohort when it reports the
new version, and leaves the control cohort then), so exposures are exact device-hours rather than
"cohort size × window". Both functions build one read-only SELECT for the query engine — the same SQL a
release manager can paste into ``fleetloop query`` to see why a gate decided what it did (it comes back
in ``sql``).

Which clock places a capture in a span:

* ``received`` (default) — ``captures.first_received``, the coordinator's clock when the capture's first
  segment arrived. The controller's own clock, so spans need no translation; right for devices without
  wall-clock time (boot-relative sample times) and for simulated devices replaying faster than real
  time. A capture made before the span but uploaded inside it counts in the span (uploads are normally
  seconds behind; a device that was offline for long shifts its captures later).
* ``sample`` — the capture's own sample time (``captures.first_ns``; ``samples.t_ns`` for aggregates):
  exact when the devices' clocks are wall-clock time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from fleetloop_cloud.fleet_store.query import MAX_ROWS_LIMIT, QueryResult
from fleetloop_cloud.rollout.gating import Cohorts, DeviceValues, RateCounts
from fleetloop_shared.choices import check_choice
from fleetloop_shared.errors import QueryError, UserError

Clock = Literal["received", "sample"]

#: Devices one cohort may hold: each is a row of the query's VALUES list. Overflow policy: refuse
#: (UserError) rather than truncate — a gate must not decide on part of a cohort.
MAX_COHORT_DEVICES: Final = 100_000
#: A gate's query is interrupted after this long unless the caller says otherwise (the controller must
#: not stall on one slow query; the engine's own cap is 120 s).
GATE_QUERY_TIMEOUT_S: Final = 30.0
_NS_PER_S: Final = 1_000_000_000


class GateQueries(Protocol):
    """The one thing the gate inputs need: run a read-only SELECT over ``samples`` and ``captures``
    (:class:`~fleetloop_cloud.fleet_store.query.QueryEngine`, ``coordinator.query_engine``, is one)."""

    def query(self, sql: str, *, max_rows: int, timeout_s: float) -> QueryResult: ...


@dataclass(frozen=True)
class Span:
    """The time a device counts in a cohort, ``[start_s, end_s)`` in Unix seconds."""

    start_s: float
    end_s: float

    @property
    def hours(self) -> float:
        return (self.end_s - self.start_s) / 3600.0


Cohort = Mapping[str, Span]


def cohort_over(device_ids: Iterable[str], start_s: float, end_s: float) -> dict[str, Span]:
    """Every device counted over the same ``[start_s, end_s)``."""
    span = Span(start_s, end_s)
    return {device_id: span for device_id in device_ids}


@dataclass(frozen=True)
class CaptureCounts:
    """A cohort's captures of one campaign and its exposure: what :func:`~.gates.rate_ratio_gate` takes."""

    events: int
    exposure_h: float
    devices: int
    #: Captures per device (every cohort device, zeros included).
    by_device: Mapping[str, int]
    #: The query that counted them.
    sql: str


@dataclass(frozen=True)
class CohortValues:
    """A cohort's per-device aggregate: what :func:`~.gates.mean_shift_gate` takes (its ``values``).

    Devices without data in their span (no sample matched, or the aggregate was NULL/NaN) are in
    ``missing``, not in ``values``: a device that did not drive has no mean brake pressure, not zero.
    """

    values: Mapping[str, float]
    missing: tuple[str, ...]
    exposure_h: float
    sql: str


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _checked(cohort: Cohort, what: str) -> list[tuple[str, Span]]:
    if len(cohort) > MAX_COHORT_DEVICES:
        raise UserError(f"{what}: {len(cohort)} devices is more than the {MAX_COHORT_DEVICES} a gate reads")
    rows: list[tuple[str, Span]] = []
    for device_id, span in sorted(cohort.items()):
        if not isinstance(device_id, str) or not device_id:
            raise UserError(f"{what}: device ids must be non-empty strings, got {device_id!r}")
        if not (math.isfinite(span.start_s) and math.isfinite(span.end_s)) or span.end_s < span.start_s:
            raise UserError(
                f"{what}: device {device_id!r} has the span [{span.start_s}, {span.end_s}); "
                "it must be finite and end at or after its start"
            )
        rows.append((device_id, span))
    return rows


def _cohort_cte(rows: list[tuple[str, Span]]) -> str:
    """``cohort(device_id, start_s, end_s, start_ns, end_ns, exposure_h)`` as a VALUES list."""
    values = ",\n    ".join(
        f"({_sql_string(d)}, {s.start_s!r}, {s.end_s!r}, {int(s.start_s * _NS_PER_S)}, "
        f"{int(s.end_s * _NS_PER_S)}, {s.hours!r})"
        for d, s in rows
    )
    return (
        "cohort AS (\n  SELECT col0 AS device_id,\n"
        "         CAST(col1 AS DOUBLE) AS start_s, CAST(col2 AS DOUBLE) AS end_s,\n"
        "         CAST(col3 AS BIGINT) AS start_ns, CAST(col4 AS BIGINT) AS end_ns,\n"
        "         CAST(col5 AS DOUBLE) AS exposure_h\n"
        f"  FROM (VALUES\n    {values}\n  )\n)"
    )


def _check_clock(clock: str) -> None:
    check_choice(clock, ("received", "sample"), "clock", error=UserError)


def _run(queries: GateQueries, sql: str, devices: int, timeout_s: float) -> QueryResult:
    result = queries.query(sql, max_rows=min(devices + 1, MAX_ROWS_LIMIT), timeout_s=timeout_s)
    if result.truncated or len(result.rows) > devices:
        raise QueryError(f"a gate query returned more rows than the cohort's {devices} devices")
    return result


def capture_counts(
    queries: GateQueries,
    cohort: Cohort,
    *,
    campaign: str,
    clock: Clock = "received",
    timeout_s: float = GATE_QUERY_TIMEOUT_S,
) -> CaptureCounts:
    """Captures of ``campaign`` each cohort device made within its span, and the cohort's device-hours."""
    if not isinstance(campaign, str) or not campaign:
        raise UserError(f"campaign must be a non-empty name, got {campaign!r}")
    _check_clock(clock)
    rows = _checked(cohort, "capture counts")
    exposure_h = math.fsum(span.hours for _, span in rows)
    if not rows:
        return CaptureCounts(0, 0.0, 0, {}, "")
    when = (
        "c.first_received >= cohort.start_s AND c.first_received < cohort.end_s"
        if clock == "received"
        else "c.first_ns >= cohort.start_ns AND c.first_ns < cohort.end_ns"
    )
    sql = (
        f"WITH {_cohort_cte(rows)}\n"
        "SELECT cohort.device_id, count(c.capture_id) AS captures\n"
        "FROM cohort LEFT JOIN captures c\n"
        f"  ON c.device_id = cohort.device_id AND c.campaign = {_sql_string(campaign)}\n"
        f" AND {when}\n"
        "GROUP BY cohort.device_id\n"
        "ORDER BY cohort.device_id"
    )
    result = _run(queries, sql, len(rows), timeout_s)
    by_device = {device_id: 0 for device_id, _ in rows}
    for device_id, count in result.rows:
        by_device[str(device_id)] = int(count)
    return CaptureCounts(sum(by_device.values()), exposure_h, len(rows), by_device, sql)


def device_values(
    queries: GateQueries,
    cohort: Cohort,
    *,
    aggregate: str,
    where: str = "",
    clock: Clock = "received",
    timeout_s: float = GATE_QUERY_TIMEOUT_S,
) -> CohortValues:
    """``aggregate`` (a SQL aggregate over ``samples`` columns, e.g. ``avg(value)``) per cohort device, over
    the samples of its span that match ``where`` (e.g. ``signal = 'Vehicle.Chassis.Brake.PedalPressure'``).

    The device's ``exposure_h`` is a column too, for per-device-hour values:
    ``count(*) FILTER (WHERE value > 2000) / any_value(exposure_h)``.
    """
    if not isinstance(aggregate, str) or not aggregate.strip():
        raise UserError("aggregate must be a SQL aggregate expression over samples, e.g. avg(value)")
    if not isinstance(where, str):
        raise UserError(f"where must be a SQL condition over samples (or empty), got {where!r}")
    _check_clock(clock)
    rows = _checked(cohort, "device values")
    exposure_h = math.fsum(span.hours for _, span in rows)
    if not rows:
        return CohortValues({}, (), 0.0, "")
    if clock == "received":
        source = (
            "samples s JOIN cohort ON s.device_id = cohort.device_id\n"
            "    JOIN captures c ON c.capture_id = s.capture_id AND c.device_id = s.device_id\n"
            "  WHERE c.first_received >= cohort.start_s AND c.first_received < cohort.end_s"
        )
    else:
        lo = min(span.start_s for _, span in rows)
        hi = max(span.end_s for _, span in rows)
        source = (
            "samples s JOIN cohort ON s.device_id = cohort.device_id\n"
            "  WHERE s.t_ns >= cohort.start_ns AND s.t_ns < cohort.end_ns\n"
            # the same bounds as literals: DuckDB skips row groups by their statistics on these
            f"    AND s.t_ns >= {int(lo * _NS_PER_S)} AND s.t_ns < {int(hi * _NS_PER_S)}"
        )
    sql = (
        f"WITH {_cohort_cte(rows)},\n"
        f"windowed AS (\n  SELECT s.*, cohort.exposure_h\n  FROM {source}\n)\n"
        f"SELECT device_id, ({aggregate}) AS value\n"
        "FROM windowed\n" + (f"WHERE ({where})\n" if where.strip() else "") + "GROUP BY device_id\n"
        "ORDER BY device_id"
    )
    result = _run(queries, sql, len(rows), timeout_s)
    values: dict[str, float] = {}
    for device_id, value in result.rows:
        if isinstance(value, bool) or not isinstance(value, int | float):
            if value is None:
                continue
            raise QueryError(f"aggregate {aggregate!r} gave {value!r} for {device_id}: expected a number")
        if math.isfinite(value):
            values[str(device_id)] = float(value)
    missing = tuple(device_id for device_id, _ in rows if device_id not in values)
    return CohortValues(values, missing, exposure_h, sql)


def _spans(since: Mapping[str, float], now: float) -> dict[str, Span]:
    return {device_id: Span(min(start, now), now) for device_id, start in since.items()}


@dataclass(frozen=True)
class FleetStoreGateInputs:
    """The controller's :class:`~.gating.GateInputs` over the fleet store: each device counted from its
    cohort time to the evaluation's ``now``."""

    queries: GateQueries
    clock: Clock = "received"
    timeout_s: float = GATE_QUERY_TIMEOUT_S

    def capture_counts(self, campaign: str, cohorts: Cohorts, now: float) -> RateCounts:
        treated, control = (
            capture_counts(
                self.queries, _spans(c, now), campaign=campaign, clock=self.clock, timeout_s=self.timeout_s
            )
            for c in (cohorts.treated, cohorts.control)
        )
        return RateCounts(treated.events, treated.exposure_h, control.events, control.exposure_h)

    def device_values(self, aggregate: str, where: str, cohorts: Cohorts, now: float) -> DeviceValues:
        treated, control = (
            device_values(
                self.queries,
                _spans(c, now),
                aggregate=aggregate,
                where=where,
                clock=self.clock,
                timeout_s=self.timeout_s,
            )
            for c in (cohorts.treated, cohorts.control)
        )
        return DeviceValues(list(treated.values.values()), list(control.values.values()))
