"""Fleet-signal gate statistics: exact against rational arithmetic and closed forms, false trips bounded by
1 − confidence, power growing with exposure, monotone in the evidence, silent below the minimums."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetloop_cloud.rollout.gates import (
    GateEvaluation,
    binomial_sf,
    mean_shift_gate,
    rate_ratio_gate,
    regularized_beta,
    student_t_sf,
)
from fleetloop_shared.errors import UserError

RATE_KEYS = {
    "treated_events", "treated_exposure_h", "control_events", "control_exposure_h", "confidence",
    "min_effect", "min_exposure_h", "null_ratio", "treated_rate_per_h", "control_rate_per_h",
    "null_treated_share", "ratio_lower_bound",
}  # fmt: skip


def exact_binomial_sf(k: int, n: int, p: Fraction) -> Fraction:
    return sum((Fraction(math.comb(n, i)) * p**i * (1 - p) ** (n - i) for i in range(max(k, 0), n + 1)),
               Fraction(0))  # fmt: skip


def rate(x1: int, t1: float, x2: int, t2: float, **kw: float) -> GateEvaluation:
    args = {"confidence": 0.95, "min_effect": 0.0, "min_exposure_h": 0.0} | kw
    return rate_ratio_gate(x1, t1, x2, t2, **args)


def trips(x1: int, t1: float, x2: int, t2: float, confidence: float) -> bool:
    return rate(x1, t1, x2, t2, confidence=confidence).decision == "trip"


# -- exactness --------------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 80),
    k_frac=st.floats(0, 1),
    num=st.integers(1, 99),
    den=st.integers(2, 100),
)
def test_binomial_tail_matches_rational_arithmetic(n: int, k_frac: float, num: int, den: int) -> None:
    p = Fraction(min(num, den - 1), den)
    k = round(k_frac * (n + 1))
    exact = exact_binomial_sf(k, n, p)
    got = binomial_sf(k, n, float(p))
    assert got == pytest.approx(float(exact), rel=1e-10, abs=1e-300)


def test_rate_gate_p_value_is_the_exact_conditional_binomial_tail() -> None:
    # 8 of 10 events in the treated cohort at equal exposure: P(X ≥ 8 | 10, 1/2) = 56/1024
    e = rate(8, 1.0, 2, 1.0)
    assert e.p_value == pytest.approx(56 / 1024, rel=1e-13) and e.statistic == 8.0
    # null ratio 2 (min_effect 1): the treated share under the null is 2/3
    e = rate(8, 1.0, 2, 1.0, min_effect=1.0)
    assert e.p_value == pytest.approx(17664 / 59049, rel=1e-13)
    # unequal exposures, a rational share: 5 device-h against 15, null ratio 1.25 → share 25/85 = 5/17
    e = rate(30, 5.0, 40, 15.0, min_effect=0.25)
    assert e.inputs["null_treated_share"] == pytest.approx(5 / 17, rel=1e-15)
    assert e.p_value == pytest.approx(float(exact_binomial_sf(30, 70, Fraction(5, 17))), rel=1e-11)


def test_rate_ratio_lower_bound_is_where_the_p_value_reaches_alpha() -> None:
    e = rate(40, 10.0, 20, 20.0, confidence=0.99, min_effect=0.25)
    bound = e.inputs["ratio_lower_bound"]
    assert e.decision == "trip" and bound > 1.25
    assert binomial_sf(40, 60, bound * 10 / (bound * 10 + 20)) == pytest.approx(0.01, rel=1e-8)
    # all events treated: the Clopper–Pearson bound has the closed form p_L = alpha^(1/x)
    for x in (1, 2, 7):
        p_low = 0.05 ** (1 / x)
        assert rate(x, 1.0, 0, 2.0).inputs["ratio_lower_bound"] == pytest.approx(
            p_low / (1 - p_low) * 2.0, rel=1e-8
        )


@pytest.mark.parametrize("t", [-30.0, -2.5, -0.3, 0.0, 0.7, 1.0, 4.0, 250.0])
def test_student_t_matches_its_closed_forms(t: float) -> None:
    assert student_t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, rel=1e-12, abs=1e-15)
    assert student_t_sf(t, 2) == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), rel=1e-12, abs=1e-15)
    x = t / math.sqrt(3)
    cdf3 = 0.5 + (x / (1 + x * x) + math.atan(x)) / math.pi
    assert student_t_sf(t, 3) == pytest.approx(1 - cdf3, rel=1e-10, abs=1e-15)


def test_student_t_matches_tables_and_the_normal_limit() -> None:
    # printed tables carry ten significant digits
    assert student_t_sf(2.228138852, 10) == pytest.approx(0.025, rel=1e-8)
    assert student_t_sf(2.015048373, 5) == pytest.approx(0.05, rel=1e-8)
    assert student_t_sf(63.65674116, 1) == pytest.approx(0.005, rel=1e-8)
    from statistics import NormalDist

    for z in (0.5, 1.644853626951472, 3.0):
        assert student_t_sf(z, 1e9) == pytest.approx(1 - NormalDist().cdf(z), rel=1e-7)


def test_incomplete_beta_is_accurate_in_both_tails() -> None:
    # I_x(1, b) = 1 − (1 − x)^b, and its complement (1 − x)^b stays accurate when tiny
    value, complement = regularized_beta(1.0, 400.0, 0.2)
    assert complement == pytest.approx(0.8**400, rel=1e-11) and value == pytest.approx(1.0)
    value, complement = regularized_beta(3.0, 1.0, 1e-4)
    assert value == pytest.approx(1e-12, rel=1e-11)


def test_welch_matches_a_published_example() -> None:
    """Welch's t-test on Wikipedia's first example: t = −2.46, ν = 24.99, two-sided p = 0.021."""
    a = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
    b = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]
    e = mean_shift_gate(a, b, confidence=0.95, min_effect=0.0, min_devices=2, direction="decrease")
    assert e.statistic == pytest.approx(-2.46, abs=0.005)
    assert e.inputs["degrees_of_freedom"] == pytest.approx(24.99, abs=0.005)
    assert 2 * e.p_value == pytest.approx(0.021, abs=0.0005)
    assert e.decision == "trip" and e.effect == pytest.approx(sum(a) / 15 - sum(b) / 15)
    # the same data asked about an increase: no evidence at all
    up = mean_shift_gate(a, b, confidence=0.95, min_effect=0.0, min_devices=2, direction="increase")
    assert up.decision == "pass" and up.p_value == pytest.approx(1 - e.p_value)


def test_welch_bound_is_where_the_p_value_reaches_alpha() -> None:
    rng = np.random.default_rng(7)
    a, b = list(rng.normal(12, 1, 6)), list(rng.normal(10, 2, 30))
    e = mean_shift_gate(a, b, confidence=0.99, min_effect=0.5, min_devices=3, direction="increase")
    bound = e.inputs["shift_bound"]
    at_bound = mean_shift_gate(a, b, confidence=0.99, min_effect=bound, min_devices=3, direction="increase")
    assert at_bound.p_value == pytest.approx(0.01, rel=1e-6)


# -- false trips and power ----------------------------------------------------------------------------------


def test_rate_gate_false_trips_stay_below_one_minus_confidence_exactly() -> None:
    """Equal rates, five canaries against forty-five: the probability of a trip, summed over the Poisson
    totals (not simulated), is at most 1 − confidence at every size and confidence."""
    for confidence in (0.9, 0.95, 0.99):
        for per_device_h in (0.2, 1.0, 3.0):
            t1, t2, rate_h = 5 * per_device_h, 45 * per_device_h, 3.0
            mean_total = rate_h * (t1 + t2)
            share = t1 / (t1 + t2)
            size = 0.0
            critical = 0  # the fewest treated events that trip, for n events in all: never decreasing in n
            for n in range(int(mean_total + 10 * math.sqrt(mean_total) + 20) + 1):
                while critical <= n and not trips(critical, t1, n - critical, t2, confidence):
                    critical += 1
                if critical > n:
                    continue
                # trips are exactly x1 ≥ critical: one binomial tail
                assert critical == 0 or rate(critical - 1, t1, n - critical + 1, t2,
                                             confidence=confidence).decision == "pass"  # fmt: skip
                p_n = math.exp(n * math.log(mean_total) - mean_total - math.lgamma(n + 1))
                # the tail by the module's own binomial (checked against rational arithmetic above)
                size += p_n * binomial_sf(critical, n, share)
            assert 0 < size <= 1 - confidence, (confidence, per_device_h, size)


@pytest.mark.parametrize("confidence", [0.95, 0.99])
def test_rate_gate_false_trip_rate_by_simulation(confidence: float) -> None:
    rng = np.random.default_rng(20260101)
    draws, t1, t2, lam = 4000, 5 * 2.0, 25 * 2.0, 6.0
    x1 = rng.poisson(lam * t1, draws)
    x2 = rng.poisson(lam * t2, draws)
    trips = sum(
        rate(int(a), t1, int(b), t2, confidence=confidence, min_exposure_h=1.0).decision == "trip"
        for a, b in zip(x1, x2, strict=True)
    )
    assert trips / draws <= 1 - confidence
    # with an allowed effect of 25 % the noise of five canaries almost never trips
    allowed = sum(
        rate(int(a), t1, int(b), t2, confidence=confidence, min_effect=0.25).decision == "trip"
        for a, b in zip(x1, x2, strict=True)
    )
    assert allowed <= trips and allowed / draws <= (1 - confidence) / 2


def rate_power(ratio: float, per_device_h: float, draws: int = 1500, seed: int = 3) -> float:
    rng = np.random.default_rng(seed)
    t1, t2, base = 5 * per_device_h, 25 * per_device_h, 15.0
    x1 = rng.poisson(base * ratio * t1, draws)
    x2 = rng.poisson(base * t2, draws)
    return sum(
        rate(int(a), t1, int(b), t2, confidence=0.99, min_effect=0.25).decision == "trip"
        for a, b in zip(x1, x2, strict=True)
    ) / draws


def test_rate_gate_power_grows_with_exposure() -> None:
    powers = [rate_power(2.0, h) for h in (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)]
    assert all(a < b for a, b in itertools.pairwise(powers)), powers
    assert powers[0] < 0.5 < 0.99 < powers[-1], powers
    # a bigger effect is seen sooner
    assert rate_power(4.0, 0.1) > rate_power(2.0, 0.1) > rate_power(1.25, 0.1)


def test_mean_gate_false_trip_rate_with_unequal_spreads() -> None:
    """The Behrens–Fisher case a canary meets: five devices with three times the control's spread."""
    rng = np.random.default_rng(11)
    for confidence in (0.95, 0.99):
        draws = 4000
        trips = sum(
            mean_shift_gate(list(rng.normal(100, 30, 5)), list(rng.normal(100, 10, 45)),
                            confidence=confidence, min_effect=0.0, min_devices=5,
                            direction="increase").decision == "trip"
            for _ in range(draws)
        )  # fmt: skip
        alpha = 1 - confidence
        assert trips / draws <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / draws), trips


def test_mean_gate_power_grows_with_devices_and_ignores_shifts_within_the_allowance() -> None:
    rng = np.random.default_rng(5)

    def power(n: int, shift: float, draws: int = 800) -> float:
        return sum(
            mean_shift_gate(list(rng.normal(100 + shift, 10, n)), list(rng.normal(100, 10, 5 * n)),
                            confidence=0.99, min_effect=5.0, min_devices=3,
                            direction="increase").decision == "trip"
            for _ in range(draws)
        ) / draws  # fmt: skip

    powers = [power(n, 15.0) for n in (3, 6, 12, 24, 48)]
    assert all(a < b for a, b in itertools.pairwise(powers)), powers
    assert powers[-1] > 0.99
    assert power(24, 5.0) <= 0.01  # a shift exactly at the allowance trips at most 1 − confidence


# -- monotonicity ------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    x1=st.integers(0, 200), x2=st.integers(0, 200),
    t1=st.floats(0.5, 100), t2=st.floats(0.5, 100),
    confidence=st.sampled_from([0.8, 0.9, 0.95, 0.99, 0.999]),
    min_effect=st.floats(0, 2),
)  # fmt: skip
def test_rate_gate_is_monotone_in_the_evidence(
    x1: int, x2: int, t1: float, t2: float, confidence: float, min_effect: float
) -> None:
    kw = {"confidence": confidence, "min_effect": min_effect}
    e = rate(x1, t1, x2, t2, **kw)
    more_treated = rate(x1 + 1, t1, x2, t2, **kw)
    more_control = rate(x1, t1, x2 + 1, t2, **kw)
    longer_treated = rate(x1, t1 * 1.5, x2, t2, **kw)
    assert more_treated.p_value <= e.p_value <= more_control.p_value
    assert e.p_value <= longer_treated.p_value + 1e-12
    rank = {"pass": 0, "trip": 1}
    assert rank[more_treated.decision] >= rank[e.decision] >= rank[more_control.decision]
    stricter = rate(x1, t1, x2, t2, confidence=confidence, min_effect=min_effect + 0.5)
    assert stricter.p_value >= e.p_value - 1e-12
    if e.decision == "trip":
        assert rate(x1, t1, x2, t2, confidence=0.5, min_effect=min_effect).decision == "trip"
        assert e.inputs["ratio_lower_bound"] >= 1 + min_effect - 1e-9
    else:
        assert e.inputs["ratio_lower_bound"] <= 1 + min_effect + 1e-9


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    shift=st.floats(0.01, 50),
    direction=st.sampled_from(["increase", "decrease"]),
)
def test_mean_gate_is_monotone_in_the_shift(seed: int, shift: float, direction: str) -> None:
    rng = np.random.default_rng(seed)
    a, b = list(rng.normal(50, 5, 6)), list(rng.normal(50, 5, 20))
    sign = 1 if direction == "increase" else -1
    kw = {"confidence": 0.95, "min_effect": 2.0, "min_devices": 3, "direction": direction}
    e = mean_shift_gate(a, b, **kw)  # type: ignore[arg-type]
    worse = mean_shift_gate([v + sign * shift for v in a], b, **kw)  # type: ignore[arg-type]
    assert worse.p_value <= e.p_value
    assert worse.effect == pytest.approx(e.effect + sign * shift)
    if e.decision == "trip":
        assert worse.decision == "trip"


# -- minimums, edges and bad input ---------------------------------------------------------------------------


def test_insufficient_below_the_minimum_exposure_in_either_cohort() -> None:
    kw = {"confidence": 0.99, "min_effect": 0.25, "min_exposure_h": 2.0}
    for t1, t2 in ((1.99, 50.0), (50.0, 1.99), (0.0, 0.0)):
        e = rate_ratio_gate(60, t1, 10, t2, **kw)
        assert e.decision == "insufficient" and math.isnan(e.statistic) and math.isnan(e.p_value)
        assert e.reason.startswith("insufficient exposure") and "each needs ≥ 2" in e.reason
    assert rate_ratio_gate(60, 2.0, 10, 50.0, **kw).decision == "trip"  # at the minimum: decides


def test_insufficient_below_the_minimum_devices() -> None:
    kw = {"confidence": 0.99, "min_effect": 1.0, "min_devices": 5, "direction": "increase"}
    e = mean_shift_gate([90.0, 95, 99, 97], [10.0] * 10 + [11.0], **kw)  # type: ignore[arg-type]
    assert e.decision == "insufficient" and math.isnan(e.p_value) and e.effect > 80
    assert "4 updated" in e.reason and "each needs ≥ 5" in e.reason
    assert mean_shift_gate([90.0, 95, 99, 97, 96], [10.0] * 10 + [11.0], **kw).decision == "trip"  # type: ignore[arg-type]


def test_five_canaries_with_a_few_events_do_not_trip() -> None:
    # 3 captures on five canaries in an hour against 10 on fifty devices: 3× the rate, but noise
    e = rate_ratio_gate(3, 5.0, 10, 50.0, confidence=0.99, min_effect=0.25, min_exposure_h=1.0)
    assert e.decision == "pass" and e.effect == pytest.approx(3.0) and e.p_value > 0.01
    assert "ratio 3" in e.reason and "p=0.169" in e.reason


def test_no_events_and_no_control_events() -> None:
    none = rate(0, 5.0, 0, 50.0)
    assert none.decision == "pass" and none.p_value == 1.0 and math.isnan(none.effect)
    assert "no events in either cohort" in none.reason
    only_treated = rate(12, 5.0, 0, 50.0, confidence=0.99)
    assert only_treated.decision == "trip" and only_treated.effect == math.inf


def test_identical_values_decide_on_the_exact_difference() -> None:
    kw = {"confidence": 0.99, "min_devices": 2, "direction": "increase"}
    assert mean_shift_gate([5.0] * 3, [3.0] * 4, min_effect=1.0, **kw).decision == "trip"  # type: ignore[arg-type]
    assert mean_shift_gate([5.0] * 3, [3.0] * 4, min_effect=2.0, **kw).decision == "pass"  # type: ignore[arg-type]


def test_every_number_used_is_recorded_and_the_reason_has_them() -> None:
    e = rate_ratio_gate(40, 10.0, 20, 20.0, confidence=0.99, min_effect=0.25, min_exposure_h=2.0)
    assert set(e.inputs) == RATE_KEYS and all(math.isfinite(v) for v in e.inputs.values())
    assert e.reason.startswith("trip: capture rate 4/device-h updated vs 1/device-h not updated, ratio 4")
    assert "≥ 2.08" in e.reason and "allowed 1.25" in e.reason and "40 events in 10 device-h" in e.reason
    m = mean_shift_gate([12.0, 13, 12.5, 13.5, 12.2], [10.0, 10.5, 9.5, 10.2, 9.8, 10.1],
                        confidence=0.99, min_effect=0.5, min_devices=3, direction="increase")  # fmt: skip
    assert m.decision == "trip" and m.reason.startswith("trip: mean 12.64 on 5 updated devices vs 10.02")
    assert "Welch t=" in m.reason and "df=" in m.reason
    assert {"treated_mean", "control_sd", "degrees_of_freedom", "shift_bound", "direction"} <= set(m.inputs)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: rate_ratio_gate(-1, 1, 1, 1, confidence=0.9, min_effect=0, min_exposure_h=0),
         "treated_events"),
        (lambda: rate_ratio_gate(1, math.nan, 1, 1, confidence=0.9, min_effect=0, min_exposure_h=0),
         "treated_exposure_h"),
        (lambda: rate_ratio_gate(1, 1, 1, 1, confidence=1.0, min_effect=0, min_exposure_h=0), "confidence"),
        (lambda: rate_ratio_gate(1, 1, 1, 1, confidence=0.9, min_effect=-0.1, min_exposure_h=0),
         "min_effect"),
        (lambda: rate_ratio_gate(True, 1, 1, 1, confidence=0.9, min_effect=0, min_exposure_h=0),
         "treated_events"),
        (lambda: mean_shift_gate([1, 2], [1, math.inf], confidence=0.9, min_effect=0, min_devices=2,
                                 direction="increase"), r"control\[1\]"),
        (lambda: mean_shift_gate([1, 2], [1, 2], confidence=0.9, min_effect=0, min_devices=1,
                                 direction="increase"), "min_devices"),
        (lambda: mean_shift_gate([1, 2], [1, 2], confidence=0.9, min_effect=0, min_devices=2,
                                 direction="up"), "direction must be one of increase, decrease, got 'up'"),  # type: ignore[arg-type]
    ],
)  # fmt: skip
def test_bad_input_is_a_clear_user_error(call: object, message: str) -> None:
    assert callable(call)
    with pytest.raises(UserError, match=message):
        call()
