"""The rule language's static side: validation errors with their exact line/column inside a YAML
document, campaign documents, selectors. (Evaluation semantics: ``test_rules_conformance.py``.)"""

from __future__ import annotations

import contextlib
import textwrap
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.errors import RuleError
from fleetloop_shared.rules import (
    CampaignSpec,
    Kind,
    check_against_catalog,
    compile_expression,
    parse_campaign,
    selector_matches,
)

S = 1_000_000_000
BIG = 2**62 + 1  # not representable as a float64: 2**62 + 1 rounds to 2**62


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
    ("dleta(x, 1s) < 0", 1, "unknown function 'dleta'; did you mean delta()?"),
    ("x > 1 and avg(x, 5) > 0", 18, "must be a duration"),
    ("x > 1 and avg(x, y) > 0", 18, "must be a duration"),
    ("avg(x + 1, 1s) > 0", 5, "must be a signal path"),
    ("avg(x, 0s) > 0", 8, "longer than 0"),
    ("avg(x, 2h) > 0", 8, "at most 1h"),
    ('"abc" > 5', 7, "cannot compare string with number"),
    ('x + "abc"', 3, "'+' needs numbers, got signal value and string"),
    ('"abc" == 1.5', 7, "cannot compare string with number using '=='"),
    ('"abc" != true', 7, "cannot compare string with true/false"),
    ('"a" < 1 or x > 1', 5, "cannot compare string with number using '<'"),
    ('-"a" < x', 1, "unary '-' needs a number, got string"),
    ('abs("a") > 1', 5, "abs() needs a number, got string"),
    ('not "a"', 1, "'not' needs true/false, got string"),
    ('count("a", 1s) > 1', 7, "count() needs true/false, got string"),
    ('"a" and x > 1', 5, "'and' needs true/false, got string"),
    ("true < false", 6, "(true/false has no order)"),
    ("x > 1s", 5, "duration 1s is only allowed"),
    ("abs(1, 2)", 1, "abs() takes 1 argument"),
    ("min(1)", 1, "min() takes at least 2 arguments"),
    ("x +", 4, "expected a value, found end"),
    ("(x > 1", 7, "expected ')'"),
    ("x > 1)", 6, "expected an operator or the end"),
    ("a < b < c", 7, "cannot be chained"),
    ("x // 2", 3, "'//' is not an operator"),
    ("x[0] > 1", 2, "subscripts"),
    ("lambda: 1", 1, "'lambda' is not part of the rule language"),
    ("[x for x in y]", 1, "subscripts"),
    ("x.__class__ > 1", 3, "may not start with '_'"),
    ("_x > 1", 1, "may not start with '_'"),
    ("Vehicle.Speed(1) > 1", 1, "is a signal, not a function"),
    ("(abs)(1) > 1", 6, "only functions can be called"),
    ("True", 1, "write true"),
    ("avg(x, 1s)(2) > 1", 11, "expected an operator"),
    ("count(x > 1) > 1", 1, "count() takes 2 arguments"),
    ("held(x > 1, 5) ", 13, "must be a duration"),
    ("rising(x)", 1, "condition computes a number") if False else ("rising(1)", 8, "needs true/false"),
    ("age(x + 1) > 1", 5, "must be a signal path"),
    ("model(x, 1s) > 1", 7, "quoted model name"),
    ("sqrt(1, 2)", 1, "sqrt() takes 1 argument"),
    ("floor(true)", 7, "needs a number"),
    ("prev_avg(x, 40m) > 1", 13, "") if False else ("prev_avg(x, 2h) > 1", 13, "at most 1h"),
    ("x = 2", 3, "use '=='"),
    ("a && b", 3, "use 'and'"),
    ("x > 2x", 5, "neither a number nor a duration"),
    ("x > 1.5.2", 5, "malformed number"),
    ("x > 1 and avg(x) > 0", 11, "avg() takes 2 arguments"),
    ("Vehicle. > 1", 1, "incomplete signal path"),
    ("x > $", 5, "unexpected character '$'"),
    ('x == "abc', 6, "string is not closed"),
    ("x > 99999999999999999999", 5, "does not fit in 64 bits"),
    ("x > 1e999", 5, "out of range"),
    ("-true", 1, "needs a number"),
    ("1 + true", 3, "'+' needs numbers"),
    ("x > 1 and 5", 7, "'and' needs true/false, got number"),
    ("not 5", 1, "'not' needs true/false"),
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
        ("avg(Vehicle.Braking, 1s) > 0", 5, "avg() needs a number"),
        ("delta(Vehicle.Nope, 1s) > 0", 7, "unknown signal"),
    ]
    for text, col, reason in cases:
        with pytest.raises(RuleError) as info:
            compile_expression(text, catalog=catalog)
        assert reason in info.value.reason, text
        assert info.value.col == col, text
    # without a catalog every path is accepted, and may hold strings
    assert compile_expression("Vehicle.Sped > 3").signals == {"Vehicle.Sped"}
    assert compile_expression('Vehicle.Sped == "D" and Vehicle.Sped < "E"').signals == {"Vehicle.Sped"}


def test_string_signals_type_check() -> None:
    catalog = Catalog()
    catalog.add("Vehicle.Mode", DataType.STRING)
    catalog.add("Vehicle.Speed", DataType.FLOAT64)
    catalog.add("Vehicle.Braking", DataType.BOOL)
    fine = {
        'Vehicle.Mode == "eco"': Kind.BOOL,
        'Vehicle.Mode != ""': Kind.BOOL,
        'Vehicle.Mode >= "b" and "z" > Vehicle.Mode': Kind.BOOL,  # code-point order
        "changed(Vehicle.Mode)": Kind.BOOL,
        "is_null(Vehicle.Mode)": Kind.BOOL,
        "age(Vehicle.Mode)": Kind.FLOAT,
        'count(Vehicle.Mode == "eco", 10s)': Kind.INT,
        'held(Vehicle.Mode == "eco", 1s) and rising(Vehicle.Mode != "x")': Kind.BOOL,
        "Vehicle.Mode": Kind.STRING,  # a value rules eval can print, not a trigger
    }
    for text, kind in fine.items():
        assert compile_expression(text, catalog=catalog).kind is kind, text
    cases = [
        ("Vehicle.Mode > 5", 14, "cannot compare string with number using '>'"),
        ("Vehicle.Mode == Vehicle.Speed", 14, "cannot compare string with number using '=='"),
        ("Vehicle.Mode == Vehicle.Braking", 14, "cannot compare string with true/false"),
        ("Vehicle.Mode + 1 > 2", 14, "'+' needs numbers, got string and number"),
        ("avg(Vehicle.Mode, 1s) > 2", 5, "avg() needs a numeric signal, Vehicle.Mode holds strings"),
        ('min_over(Vehicle.Mode, 1s) == "a"', 10, "min_over() needs a numeric signal"),
        ('delta(Vehicle.Mode, 1s) == "a"', 7, "delta() needs a numeric signal"),
        ('prev_max(Vehicle.Mode, 1s) == "a"', 10, "prev_max() needs a numeric signal"),
        ("max(Vehicle.Mode, Vehicle.Speed) > 1", 5, "max() needs a number, got string"),
        ("Vehicle.Mode and Vehicle.Braking", 14, "'and' needs true/false, got string"),
        ("rising(Vehicle.Mode)", 8, "rising() needs true/false, got string"),
    ]
    for text, col, reason in cases:
        with pytest.raises(RuleError) as info:
            compile_expression(text, catalog=catalog, source="c.yaml", line=3, col=1)
        assert reason in info.value.reason, (text, info.value.reason)
        assert (info.value.source, info.value.line, info.value.col) == ("c.yaml", 3, col), text
    # a trigger must be true/false: a string (or number) is refused where it is computed
    for text, what in (("Vehicle.Mode", "a string"), ('"abc"', "a string"), ("Vehicle.Speed", "a number")):
        with pytest.raises(RuleError) as info:
            compile_expression(text, catalog=catalog, require_condition=True)
        assert f"condition computes {what}; it must be true/false" in info.value.reason


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab.xyz019 ()+-*/%<>=!,\"'_andortuefls\n\t$\\")), max_size=40))
def test_hostile_expression_text_only_ever_raises_rule_error(text: str) -> None:
    try:
        compile_expression(text)
    except RuleError as err:
        assert err.line >= 1 and err.col >= 1


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
    ("mode: rising", "mode: sometimes", 8, 11, "trigger.mode must be one of rising, always, got 'sometimes'"),
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
    ("  priority: 8\n", "  prviacy: {drop: [VIN]}\n", 14, 3, "unknown field 'spec.prviacy'"),
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

    # a string signal compared with a number: refused on the device with the position in the YAML
    catalog.add("Vehicle.Mode", DataType.STRING)
    text = parse_campaign(DOC.replace("Vehicle.Speed > 50 and", "Vehicle.Mode > 50 and"), "c.yaml")
    with pytest.raises(RuleError) as info:
        check_against_catalog(text, catalog)
    assert "cannot compare string with number using '>'" in info.value.reason
    assert (info.value.line, info.value.col) == (7, WHEN_COL + 13)
    check_against_catalog(
        parse_campaign(DOC.replace("Vehicle.Speed > 50 and", "Vehicle.Mode == 'sport' and"), "c.yaml"),
        catalog,
    )


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


# --- fuzzing the parser: outside text never crashes it -------------------------------------------------

FUZZ_CATALOG = Catalog()
FUZZ_CATALOG.add("Vehicle.Speed", DataType.FLOAT64)
FUZZ_CATALOG.add("x", DataType.INT64)

TOKENS = st.sampled_from(
    [
        "Vehicle.Speed",
        "x",
        "1",
        "2.5",
        "1s",
        "500ms",
        "(",
        ")",
        ",",
        "+",
        "-",
        "*",
        "**",
        "/",
        "%",
        "==",
        "<",
        ">=",
        "and",
        "or",
        "not",
        "true",
        '"s"',
        "avg",
        "held",
        "count",
        "rising",
        "model",
        "lambda",
        "[",
        "]",
        ".",
        "_x",
        "__import__",
        "sqrt",
        "min",
        "is_null",
        "age",
        "delta",
        "prev_max",
        " ",
    ]
)


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.text(max_size=60),
        st.lists(TOKENS, max_size=25).map(" ".join),
        st.binary(max_size=60).map(lambda b: b.decode("utf-8", "replace")),
    )
)
def test_fuzzed_expressions_only_ever_raise_rule_error(text: str) -> None:
    for catalog in (None, FUZZ_CATALOG):
        try:
            compile_expression(text, catalog=catalog, source="f.yaml", line=3, col=9)
        except RuleError as err:
            assert err.line >= 3 and err.col >= 1 and "\n" not in err.reason
