"""The rule language: expressions (values, Kleene logic, exactness, windows), validation errors with their
exact line/column inside a YAML document, campaign documents, selectors, and a hypothesis check of the
compiler against a tiny slow reference interpreter written here."""

from __future__ import annotations

import contextlib
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.errors import RuleError
from fleetloop_shared.rules import (
    CampaignSpec,
    check_against_catalog,
    compile_expression,
    parse_campaign,
    selector_matches,
)

S = 1_000_000_000
BIG = 2**62 + 1  # not representable as a float64: 2**62 + 1 rounds to 2**62


class ArrayHistory:
    """A WindowSource over fixed arrays (the protocol is the rules package's own, so this is its simplest
    real implementation, not a mock of something else)."""

    def __init__(self, series: dict[str, tuple[list[int], list[Any]]]) -> None:
        self._series = {p: (np.asarray(t, np.int64), np.asarray(v)) for p, (t, v) in series.items()}

    def samples(
        self, path: str, from_ns_exclusive: int, to_ns_inclusive: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[Any]]:
        if path not in self._series:
            return np.empty(0, np.int64), np.empty(0)
        t, v = self._series[path]
        mask = (t > from_ns_exclusive) & (t <= to_ns_inclusive)
        return t[mask], v[mask]


NO_HISTORY = ArrayHistory({})


def evaluate(
    text: str, values: Mapping[str, object] | None = None, history: ArrayHistory = NO_HISTORY, t: int = 0
) -> object:
    return compile_expression(text).evaluator().evaluate(t, values or {}, history)


# --- values ----------------------------------------------------------------------------------------------

OPERATOR_TABLE = [
    ("1 + 2", {}, 3),
    ("7 - 10", {}, -3),
    ("6 * 7", {}, 42),
    ("2 * 3.5", {}, 7.0),
    ("7 / 2", {}, 3.5),
    ("8 / 2", {}, 4),
    ("7 % 3", {}, 1),
    ("-7 % 3", {}, 2),
    ("7.5 % 2", {}, 1.5),
    ("-x", {"x": 5}, -5),
    ("- -x", {"x": 5}, 5),
    ("abs(x)", {"x": -3}, 3),
    ("abs(-2.5)", {}, 2.5),
    ("min(3, x, 2)", {"x": 1}, 1),
    ("max(1, 2.5, x)", {"x": 2}, 2.5),
    ("x == 3", {"x": 3}, True),
    ("x == 3", {"x": 3.0}, True),
    ("x != 3", {"x": 3}, False),
    ("x < 3", {"x": 2}, True),
    ("x < 3", {"x": 3}, False),
    ("x <= 3", {"x": 3}, True),
    ("x > 3", {"x": 3}, False),
    ("x >= 3", {"x": 3}, True),
    ("x > 3", {"x": 3.5}, True),
    ("flag == true", {"flag": True}, True),
    ("true != false", {}, True),
    ('"abc" == "abc"', {}, True),
    ("not flag", {"flag": False}, True),
    ("1 + 2 * 3", {}, 7),
    ("(1 + 2) * 3", {}, 9),
    ("10 - 2 - 3", {}, 5),
    ("8 / 4 / 2", {}, 1),
    ("-2 * 3 + 1", {}, -5),
    ("not 1 > 2", {}, True),
    ("true or false and false", {}, True),
    ("(true or false) and false", {}, False),
    ("not true or true", {}, True),
    ("Vehicle.Speed > 50", {"Vehicle.Speed": 50.5}, True),
    ("Vehicle.Speed > 50", {"Vehicle.Speed": np.float64(49.0)}, False),
    ("x + 1", {"x": np.int64(41)}, 42),
    ("flag and true", {"flag": np.bool_(True)}, True),
    (".5 + 1e1", {}, 10.5),
    # missing operands
    ("x + 1", {}, None),
    ("x > 1", {}, None),
    ("-x", {}, None),
    ("abs(x)", {}, None),
    ("min(1, x)", {}, None),
    ("x > 1", {"x": float("nan")}, None),
    ("x > 1", {"x": "text"}, None),
    ("x + 1", {"x": True}, None),
    # division by zero is missing, and missing is absorbed by Kleene logic
    ("x / 0", {"x": 1}, None),
    ("x % 0", {"x": 1}, None),
    ("x / 0.0", {"x": 1.0}, None),
    ("x / 0 > 1", {"x": 1}, None),
    ("x / 0 > 1 or true", {"x": 1}, True),
    ("x / 0 > 1 and false", {"x": 1}, False),
]


@pytest.mark.parametrize(("text", "values", "expected"), OPERATOR_TABLE)
def test_operator_table(text: str, values: dict[str, object], expected: object) -> None:
    result = evaluate(text, values)
    assert result == expected
    assert type(result) is type(expected), f"{text}: {result!r} has type {type(result).__name__}"


KLEENE = [True, False, None]


@pytest.mark.parametrize("a", KLEENE)
@pytest.mark.parametrize("b", KLEENE)
def test_kleene_three_valued_logic(a: bool | None, b: bool | None) -> None:
    values = {k: v for k, v in (("a", a), ("b", b)) if v is not None}
    expect_and = False if False in (a, b) else (True if a is True and b is True else None)
    expect_or = True if True in (a, b) else (False if a is False and b is False else None)
    assert evaluate("a and b", values) is expect_and
    assert evaluate("a or b", values) is expect_or
    assert evaluate("not a", values) is {True: False, False: True, None: None}[a]


def test_integers_stay_exact_beyond_float_precision() -> None:
    values = {"x": BIG, "n": np.int64(BIG)}
    assert float(BIG) == float(BIG - 1)  # the premise: a float round trip would lose the +1
    assert evaluate("x > 4611686018427387904", values) is True
    assert evaluate("n > 4611686018427387904", values) is True
    assert evaluate("x == 4611686018427387904.0", values) is False
    assert evaluate("x - 4611686018427387904", values) == 1
    assert evaluate("x * 2", values) == 2 * BIG
    assert evaluate("x / 1 == x", values) is True
    assert evaluate("(x * 3) / 3", values) == BIG
    assert evaluate("x + 1 == 4611686018427387906", values) is True
    assert evaluate("max(x, 4611686018427387904.0)", values) == BIG
    assert evaluate("x % 2", values) == 1


def test_overflow_is_missing_not_an_exception() -> None:
    # int * float beyond float range overflows in Python; the rule must just see a missing value
    assert evaluate("x * 1.5 > 0", {"x": 10**400}) is None
    assert evaluate("x * 10.0 > 1", {"x": 1e308}) is True  # float overflow to inf is a value


# --- windows --------------------------------------------------------------------------------------------

HISTORY = ArrayHistory(
    {
        "v": ([1 * S, 2 * S, 3 * S, 4 * S, 5 * S], [10.0, 20.0, 40.0, 30.0, 35.0]),
        "i": ([1 * S, 2 * S, 3 * S], [BIG - 1, BIG, BIG + 1]),
        "b": ([1 * S, 2 * S, 3 * S], [True, False, True]),
        "gap": ([1 * S, 2 * S], [float("nan"), float("nan")]),
    }
)

WINDOW_TABLE = [
    # (now, text, expected) — the window is (now - w, now]
    (5 * S, "avg(v, 2s)", 32.5),  # 4 s and 5 s; 3 s is exactly now - w and excluded
    (5 * S, "avg(v, 2001ms)", (40.0 + 30.0 + 35.0) / 3),
    (5 * S, "delta(v, 3s)", 35.0 - 40.0),
    (5 * S, "min_over(v, 10s)", 10.0),
    (5 * S, "max_over(v, 2s)", 35.0),
    (3 * S, "max_over(v, 1m)", 40.0),  # samples after now are not in the window
    (5 * S, "delta(v, 500ms)", 0.0),  # one sample: last - first = 0
    (5 * S, "avg(v, 500ms)", 35.0),
    (9 * S, "avg(v, 1s)", None),  # empty window
    (3 * S, "delta(i, 1h)", 2),
    (3 * S, "avg(i, 1h)", BIG),  # exact: 3 * BIG / 3, no float on the way
    (2 * S, "avg(i, 1h)", (2 * BIG - 1) / 2),
    (3 * S, "min_over(i, 1h)", BIG - 1),
    (3 * S, "avg(b, 1h)", 2 / 3),
    (2 * S, "max_over(gap, 1h)", None),  # only NaN: nothing usable
    (5 * S, "avg(nothing, 1s)", None),
    (5 * S, "delta(v, 3s) < -3 and v > 30", True),
]


@pytest.mark.parametrize(("now", "text", "expected"), WINDOW_TABLE)
def test_window_functions(now: int, text: str, expected: object) -> None:
    result = evaluate(text, {"v": 35.0}, HISTORY, t=now)
    if isinstance(expected, float):
        assert result == pytest.approx(expected, rel=1e-12)
    else:
        assert result == expected
        assert type(result) is type(expected)


def test_expression_metadata() -> None:
    expr = compile_expression("Vehicle.Speed > 50 and delta(Vehicle.Speed, 1s) < -15 or avg(A.b, 2m) > 1")
    assert expr.signals == frozenset({"Vehicle.Speed", "A.b"})
    assert expr.max_window_ns == 120 * S
    assert compile_expression("x > 1").max_window_ns == 0
    assert expr == compile_expression(expr.text)
    assert expr.text == "Vehicle.Speed > 50 and delta(Vehicle.Speed, 1s) < -15 or avg(A.b, 2m) > 1"


# --- compile errors with positions ----------------------------------------------------------------------

ERROR_TABLE = [
    # (text, column of the fault (1-based, expression starting at column 1), words in the reason)
    ("avg(x)", 1, "avg() takes 2 arguments"),
    ("dleta(x, 1s) < 0", 1, "unknown function 'dleta'"),
    ("x > 1 and avg(x, 5) > 0", 18, "must be a duration"),
    ("x > 1 and avg(x, y) > 0", 18, "must be a duration"),
    ("avg(x + 1, 1s) > 0", 5, "must be a signal path"),
    ("avg(x, 0s) > 0", 8, "longer than 0"),
    ("avg(x, 2h) > 0", 8, "at most 1h"),
    ('"abc" > 5', 7, "cannot compare string with number"),
    ('x == "abc"', 3, "cannot compare signal value with string"),
    ("x > 1s", 5, "duration 1s is only allowed"),
    ("abs(1, 2)", 1, "abs() takes 1 argument"),
    ("min(1)", 1, "min() takes at least 2 arguments"),
    ("x +", 4, "expected a value, found end"),
    ("(x > 1", 7, "expected ')'"),
    ("x > 1)", 6, "expected an operator or the end"),
    ("a < b < c", 7, "cannot be chained"),
    ("x ** 2", 3, "'**' is not supported"),
    ("x = 2", 3, "use '=='"),
    ("a && b", 3, "use 'and'"),
    ("x > 2x", 5, "neither a number nor a duration"),
    ("x > 1.5.2", 5, "malformed number"),
    ("Vehicle. > 1", 1, "incomplete signal path"),
    ("x > $", 5, "unexpected character '$'"),
    ('x == "abc', 6, "string is not closed"),
    ("x > 99999999999999999999", 5, "does not fit in 64 bits"),
    ("x > 1e999", 5, "out of range"),
    ("-true", 1, "needs number"),
    ("1 + true", 3, "'+' needs numbers"),
    ("x > 1 and 5", 7, "'and' needs true/false, got number"),
    ("not 5", 1, "'not' needs true/false"),
    ('"abc"', 1, "computes a string"),
    ("", 1, "empty"),
    ("(" * 100 + "1" + ")" * 100, 65, "nested deeper"),
    ("+".join(["1"] * 200), 1, "nested deeper"),
]


@pytest.mark.parametrize(("text", "col", "reason"), ERROR_TABLE)
def test_compile_errors_point_at_the_fault(text: str, col: int, reason: str) -> None:
    with pytest.raises(RuleError) as info:
        compile_expression(text, source="rules.yaml", line=7, col=1)
    err = info.value
    assert reason in err.reason
    assert (err.source, err.line, err.col) == ("rules.yaml", 7, col)
    assert str(err).startswith(f"rules.yaml:7:{col}: ")


def test_error_columns_are_offset_by_the_expression_start() -> None:
    with pytest.raises(RuleError) as info:
        compile_expression("x > 1 and dleta(x, 1s) < 0", line=12, col=11)
    assert (info.value.line, info.value.col) == (12, 21)


def test_catalog_checks_signals_and_types() -> None:
    catalog = Catalog()
    catalog.add("Vehicle.Speed", DataType.FLOAT64)
    catalog.add("Vehicle.Gear", DataType.INT64)
    catalog.add("Vehicle.Braking", DataType.BOOL)
    ok = compile_expression("Vehicle.Speed > 3 and Vehicle.Braking and Vehicle.Gear == 2", catalog=catalog)
    assert ok.signals == {"Vehicle.Speed", "Vehicle.Braking", "Vehicle.Gear"}
    cases = [
        ("Vehicle.Sped > 3", 1, "unknown signal 'Vehicle.Sped'"),
        ("Vehicle.Braking > 3", 17, "cannot compare true/false with number"),
        ("Vehicle.Speed and true", 15, "'and' needs true/false, got number"),
        ("avg(Vehicle.Braking, 1s) > 0", 5, "avg() needs number"),
        ("delta(Vehicle.Nope, 1s) > 0", 7, "unknown signal"),
    ]
    for text, col, reason in cases:
        with pytest.raises(RuleError) as info:
            compile_expression(text, catalog=catalog)
        assert reason in info.value.reason, text
        assert info.value.col == col, text
    # without a catalog every path is accepted
    assert compile_expression("Vehicle.Sped > 3").signals == {"Vehicle.Sped"}


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab.xyz019 ()+-*/%<>=!,\"'_andortuefls\n\t$\\")), max_size=40))
def test_hostile_expression_text_only_ever_raises_rule_error(text: str) -> None:
    try:
        expr = compile_expression(text)
    except RuleError as err:
        assert err.line >= 1 and err.col >= 1
        return
    expr.evaluator().evaluate(5 * S, {"x": 1, "a": True, "y": 0}, HISTORY)


# --- campaign documents ---------------------------------------------------------------------------------

DOC = textwrap.dedent(
    """\
    apiVersion: fleetloop/v1
    kind: Campaign
    metadata: {name: harsh-braking, version: 3}
    spec:
      target: {selector: "fleet=taxi,hw=gen2"}
      trigger:
        when: "Vehicle.Speed > 50 and delta(Vehicle.Speed, 1s) < -15"
        mode: rising
        min_interval: 30s
      collect:
        signals: ["Vehicle.Speed", "Vehicle.Chassis.*", "Vehicle.Acceleration.*"]
        pre: 10s
        post: 5s
      priority: 8
      upload: {network: [wifi, cellular], max_per_hour: 6}
      expires: 2027-06-30T00:00:00Z
    """
)
WHEN = "Vehicle.Speed > 50 and delta(Vehicle.Speed, 1s) < -15"
WHEN_COL = 12  # column of the first character inside the quotes on line 7


def test_parse_campaign_reads_every_field() -> None:
    spec = parse_campaign(DOC, "harsh.yaml")
    assert isinstance(spec, CampaignSpec)
    assert (spec.name, spec.version, spec.when, spec.mode) == ("harsh-braking", 3, WHEN, "rising")
    assert spec.min_interval_ns == 30 * S
    assert spec.collect_signals == ("Vehicle.Speed", "Vehicle.Chassis.*", "Vehicle.Acceleration.*")
    assert (spec.pre_ns, spec.post_ns, spec.priority) == (10 * S, 5 * S, 8)
    assert spec.selector == "fleet=taxi,hw=gen2"
    assert spec.upload_networks == ("wifi", "cellular")
    assert spec.max_per_hour == 6
    assert spec.expires == datetime(2027, 6, 30, tzinfo=UTC)
    assert spec.document == DOC and spec.source == "harsh.yaml"
    assert spec.expression.signals == {"Vehicle.Speed"}
    assert spec.expression.max_window_ns == S


def test_parse_campaign_defaults() -> None:
    spec = parse_campaign(
        "apiVersion: fleetloop/v1\nkind: Campaign\nmetadata: {name: a, version: 1}\n"
        "spec:\n  trigger:\n    when: A.x > 1 or avg(B.y, 1s) > 2\n"
    )
    assert spec.mode == "rising" and spec.min_interval_ns == 0
    assert spec.collect_signals == ("A.x", "B.y")  # what the condition reads
    assert (spec.pre_ns, spec.post_ns, spec.priority, spec.selector) == (0, 0, 5, "")
    assert spec.upload_networks == ("wifi",) and spec.max_per_hour is None and spec.expires is None


def _error(text: str) -> RuleError:
    with pytest.raises(RuleError) as info:
        parse_campaign(text, "c.yaml")
    return info.value


DOC_ERRORS = [
    # (replace, with, line, col, words in the reason)
    ("delta(Vehicle.Speed, 1s)", "dleta(Vehicle.Speed, 1s)", 7, WHEN_COL + 23, "unknown function 'dleta'"),
    ("delta(Vehicle.Speed, 1s)", "delta(Vehicle.Speed)", 7, WHEN_COL + 23, "delta() takes 2 arguments"),
    ("delta(Vehicle.Speed, 1s)", "delta(Vehicle.Speed, 1)", 7, WHEN_COL + 44, "must be a duration"),
    (f'when: "{WHEN}"', "when: '\"abc\" > 50'", 7, WHEN_COL + 6, "cannot compare string with number"),
    ("Vehicle.Speed > 50 and", "Vehicle.Speed >> 50 and", 7, WHEN_COL + 15, "expected a value"),
    ("    mode: rising", "   mode: rising", 8, 4, "invalid YAML"),  # indentation slip: YAML syntax error
    (
        "    min_interval: 30s",
        "  min_interval: 30s",
        9,
        3,
        "unknown field 'spec.min_interval'",
    ),  # wrong mapping
    ("    mode: rising", "    mod: rising", 8, 5, "unknown field 'spec.trigger.mod'; did you mean 'mode'"),
    ("mode: rising", "mode: sometimes", 8, 11, "rising or always"),
    ("min_interval: 30s", "min_interval: 30", 9, 19, "not a duration"),
    ("min_interval: 30s", "min_interval: 30x", 9, 19, "not a duration"),
    ("pre: 10s", "pre: 2h", 12, 10, "at most 1h"),
    ("priority: 8", "priority: 10", 14, 13, "between 0 and 9"),
    ("priority: 8", "priority: high", 14, 13, "whole number"),
    ("priority: 8", "priority: [8]", 14, 13, "single value"),
    ("priority: 8", "priority: 8\n  priority: 9", 15, 3, "duplicate field 'spec.priority'"),
    ("max_per_hour: 6", "max_per_hour: 0", 15, 53, "between 1"),
    ("network: [wifi, cellular]", "network: [wifi, Cell phone]", 15, 28, "not a network name"),
    ("2027-06-30T00:00:00Z", "2027-06-30T00:00:00", 16, 12, "needs a time zone"),
    ("2027-06-30T00:00:00Z", "next tuesday", 16, 12, "must be a timestamp"),
    ("hw=gen2", "hw=gen2,,x", 5, 42, "malformed selector requirement"),
    ('"Vehicle.Chassis.*"', '"Vehicle Chassis"', 11, 32, "not a signal path or glob"),
    ("apiVersion: fleetloop/v1", "apiVersion: fleetloop/v2", 1, 13, "apiVersion must be 'fleetloop/v1'"),
    ("kind: Campaign", "kind: Rollout", 2, 7, "kind must be 'Campaign'"),
    ("name: harsh-braking", "name: Harsh_Braking", 3, 18, "lowercase"),
    ("version: 3", "version: 0", 3, 42, "between 1"),
    ("version: 3", "version: '3'", 3, 42, "whole number"),
    (
        "metadata: {name: harsh-braking, version: 3}",
        "metadata: {name: harsh-braking}",
        3,
        11,
        "missing required field 'metadata.version'",
    ),
    ("  priority: 8\n", "  privacy: {drop: [VIN]}\n", 14, 3, "unknown field 'spec.privacy'"),
    (f'when: "{WHEN}"', "when: !cmd 'rm -rf /'", 7, 11, "YAML tag '!cmd' is not allowed"),
    ("  priority: 8", "  priority: !!python/object/apply:os.system ['true']", 14, 13, "single value"),
]


@pytest.mark.parametrize(("old", "new", "line", "col", "reason"), DOC_ERRORS)
def test_document_errors_point_at_line_and_column(
    old: str, new: str, line: int, col: int, reason: str
) -> None:
    assert old in DOC
    err = _error(DOC.replace(old, new, 1))
    assert reason in err.reason
    assert (err.source, err.line, err.col) == ("c.yaml", line, col)
    assert str(err).startswith(f"c.yaml:{line}:{col}: ")


def test_expression_positions_survive_yaml_quoting_and_folding() -> None:
    head = "apiVersion: fleetloop/v1\nkind: Campaign\nmetadata: {name: a, version: 1}\nspec:\n  trigger:\n"
    plain = _error(head + "    when: A.x > 1 and dleta(A.x, 1s) < 0\n")
    assert (plain.line, plain.col) == (6, 23)
    single = _error(head + "    when: 'A.x > 1 and ''a'' > 1'\n")
    assert (single.line, single.col) == (6, 30)  # after the doubled quotes of the YAML escape
    folded = _error(head + "    when: >-\n      A.x > 1 and\n      dleta(A.x, 1s) < 0\n")
    assert (folded.line, folded.col) == (8, 7)
    multiline_plain = _error(head + "    when: A.x > 1\n      and B.y >\n")
    assert (multiline_plain.line, multiline_plain.col) == (7, 16)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty document"),
        ("just a string", "must be a mapping"),
        ("- a\n- b\n", "must be a mapping"),
        ("a: [1, 2\n", "invalid YAML"),
        ("[" * 5000, "invalid YAML"),
        ("a: 1\n---\nb: 2\n", "invalid YAML"),
        ("\x00\x01garbage", "invalid YAML"),
        ("apiVersion: fleetloop/v1\nkind: Campaign\nmetadata: {name: a, version: 1}\nspec: {}\n", "missing"),
    ],
)
def test_malformed_documents_are_rule_errors(text: str, reason: str) -> None:
    assert reason in _error(text).reason


def test_alias_bombs_are_not_expanded() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 30)]
    err = _error("\n".join(lines) + "\n")
    assert "unknown field 'a0'" in err.reason


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_documents_only_ever_raise_rule_error(data: st.DataObject) -> None:
    pos = data.draw(st.integers(0, len(DOC) - 1))
    cut = data.draw(st.integers(0, 8))
    insert = data.draw(st.text(alphabet=st.sampled_from(list(" \n\t:-[]{}'\"#&*!|>x1.,")), max_size=6))
    text = DOC[:pos] + insert + DOC[pos + cut :]
    with contextlib.suppress(RuleError):
        parse_campaign(text)


def test_check_against_catalog() -> None:
    catalog = Catalog()
    catalog.add("Vehicle.Speed", DataType.FLOAT64)
    catalog.add("Vehicle.Chassis.Brake", DataType.FLOAT64)
    catalog.add("Vehicle.Acceleration.Longitudinal", DataType.FLOAT64)
    spec = parse_campaign(DOC, "c.yaml")
    check_against_catalog(spec, catalog)

    unknown = parse_campaign(DOC.replace("delta(Vehicle.Speed", "delta(Vehicle.Sped"), "c.yaml")
    with pytest.raises(RuleError) as info:
        check_against_catalog(unknown, catalog)
    assert "unknown signal 'Vehicle.Sped'" in info.value.reason
    assert (info.value.line, info.value.col) == (7, WHEN_COL + 29)

    no_match = parse_campaign(DOC.replace('"Vehicle.Chassis.*"', '"Vehicle.Cabin.*"'), "c.yaml")
    with pytest.raises(RuleError) as info:
        check_against_catalog(no_match, catalog)
    assert "'Vehicle.Cabin.*' matches no signal" in info.value.reason
    assert (info.value.line, info.value.col) == (11, 32)


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ("", {}, True),
        ("  ", {"fleet": "taxi"}, True),
        ("fleet=taxi,hw=gen2", {"fleet": "taxi", "hw": "gen2", "x": "y"}, True),
        ("fleet=taxi,hw=gen2", {"fleet": "taxi", "hw": "gen1"}, False),
        ("fleet=taxi, hw = gen2", {"fleet": "taxi", "hw": "gen2"}, True),
        ("fleet==taxi", {"fleet": "taxi"}, True),
        ("fleet!=taxi", {"fleet": "bus"}, True),
        ("fleet!=taxi", {}, True),
        ("fleet!=taxi", {"fleet": "taxi"}, False),
        ("beta", {"beta": ""}, True),
        ("beta", {}, False),
        ("!beta", {}, True),
        ("!beta", {"beta": "1"}, False),
        ("example.com/tier=gold", {"example.com/tier": "gold"}, True),
    ],
)
def test_selector_matches(selector: str, labels: dict[str, str], expected: bool) -> None:
    assert selector_matches(selector, labels) is expected


@pytest.mark.parametrize(
    ("selector", "col"), [("fleet=taxi,,hw=gen2", 12), ("=taxi", 1), ("a=b c", 1), ("a in (b)", 1)]
)
def test_malformed_selector(selector: str, col: int) -> None:
    with pytest.raises(RuleError) as info:
        selector_matches(selector, {})
    assert "malformed selector" in info.value.reason and info.value.col == col


# --- hypothesis: the compiler against a tiny slow reference ---------------------------------------------


@dataclass(frozen=True)
class Ref:
    """An expression tree with its own printer and interpreter, independent of the compiler."""

    op: str
    args: tuple[Any, ...]

    # precedence levels of the language (loosest first), as documented in parser.py
    LEVELS: ClassVar[dict[str, int]] = {
        "or": 1,
        "and": 2,
        "not": 3,
        "cmp": 4,
        "+": 5,
        "-": 5,
        "*": 6,
        "/": 6,
        "%": 6,
        "neg": 7,
    }

    @property
    def level(self) -> int:
        if self.op in ("==", "!=", "<", "<=", ">", ">="):
            return 4
        return self.LEVELS.get(self.op, 8)

    def text(self) -> str:
        if self.op in ("lit", "sig"):
            return str(self.args[0]).lower() if isinstance(self.args[0], bool) else str(self.args[0])
        if self.op in ("abs", "min", "max"):
            return f"{self.op}({', '.join(a.text() for a in self.args)})"
        if self.op == "not":
            return "not " + self._wrap(self.args[0], self.args[0].level < 3)
        if self.op == "neg":
            return "-" + self._wrap(self.args[0], self.args[0].level < 7)
        left, right = self.args
        strict_left = self.level == 4  # comparisons do not chain
        return (
            f"{self._wrap(left, left.level < self.level or (strict_left and left.level == 4))} {self.op} "
            f"{self._wrap(right, right.level <= self.level)}"
        )

    @staticmethod
    def _wrap(node: Ref, parens: bool) -> str:
        return f"({node.text()})" if parens else node.text()

    def value(self, env: dict[str, Any]) -> Any:
        op, args = self.op, self.args
        if op == "lit":
            return args[0]
        if op == "sig":
            return env.get(args[0])
        vals = [a.value(env) for a in args]
        num = [v is not None and not isinstance(v, bool) for v in vals]
        if op == "and":
            return False if False in vals else (True if vals == [True, True] else None)
        if op == "or":
            return True if True in vals else (False if vals == [False, False] else None)
        if op == "not":
            return None if vals[0] is None else not vals[0]
        if op in ("==", "!=") and None in vals:
            return None
        if op not in ("==", "!=") and not all(num):
            return None
        if op == "neg":
            return -vals[0]
        if op == "abs":
            return abs(vals[0])
        if op in ("min", "max"):
            return min(vals) if op == "min" else max(vals)
        a, b = vals
        if op in ("==", "!=") and isinstance(a, bool) != isinstance(b, bool):
            return None
        if op == "+":
            return a + b
        if op == "-":
            return a - b
        if op == "*":
            return a * b
        if op == "/":
            if b == 0:
                return None
            return a // b if isinstance(a, int) and isinstance(b, int) and a % b == 0 else a / b
        if op == "%":
            return None if b == 0 else a % b
        return {"==": a == b, "!=": a != b, "<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]


NUM_LEAVES = st.one_of(
    st.integers(0, 50).map(lambda v: Ref("lit", (v,))),
    st.sampled_from([0.5, 2.25, 10.0]).map(lambda v: Ref("lit", (v,))),
    st.sampled_from(["a", "b", "S.c"]).map(lambda v: Ref("sig", (v,))),
)
BOOL_LEAVES = st.one_of(
    st.booleans().map(lambda v: Ref("lit", (v,))), st.sampled_from(["p", "q"]).map(lambda v: Ref("sig", (v,)))
)


def _num_tree(children: st.SearchStrategy[Ref]) -> st.SearchStrategy[Ref]:
    return st.one_of(
        st.tuples(st.sampled_from(["+", "-", "*", "/", "%"]), children, children).map(
            lambda t: Ref(t[0], t[1:])
        ),
        children.map(lambda c: Ref("neg", (c,))),
        children.map(lambda c: Ref("abs", (c,))),
        st.tuples(st.sampled_from(["min", "max"]), st.lists(children, min_size=2, max_size=3)).map(
            lambda t: Ref(t[0], tuple(t[1]))
        ),
    )


NUMBERS = st.recursive(NUM_LEAVES, _num_tree, max_leaves=6)


def _bool_tree(children: st.SearchStrategy[Ref]) -> st.SearchStrategy[Ref]:
    return st.one_of(
        st.tuples(st.sampled_from(["and", "or"]), children, children).map(lambda t: Ref(t[0], t[1:])),
        children.map(lambda c: Ref("not", (c,))),
    )


COMPARISONS = st.tuples(st.sampled_from(["==", "!=", "<", "<=", ">", ">="]), NUMBERS, NUMBERS).map(
    lambda t: Ref(t[0], t[1:])
)
CONDITIONS = st.recursive(st.one_of(BOOL_LEAVES, COMPARISONS), _bool_tree, max_leaves=5)
ENV_VALUE = st.one_of(st.none(), st.integers(-(2**62), 2**62), st.sampled_from([0, 1, -3, 2.5, 0.0]))


@settings(max_examples=400, deadline=None)
@given(
    tree=st.one_of(NUMBERS, CONDITIONS),
    a=ENV_VALUE,
    b=ENV_VALUE,
    c=ENV_VALUE,
    p=st.one_of(st.none(), st.booleans()),
    q=st.one_of(st.none(), st.booleans()),
)
def test_compiler_matches_reference(tree: Ref, a: Any, b: Any, c: Any, p: Any, q: Any) -> None:
    env = {k: v for k, v in {"a": a, "b": b, "S.c": c, "p": p, "q": q}.items() if v is not None}
    text = tree.text()
    got = compile_expression(text).evaluator().evaluate(0, env, NO_HISTORY)
    try:
        want = tree.value(env)
    except (OverflowError, ZeroDivisionError):
        want = None
    if isinstance(want, float) and want != want:
        want = None
    assert got == want, text
    assert type(got) is type(want), text
