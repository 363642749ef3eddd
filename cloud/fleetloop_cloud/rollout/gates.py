"""Fleet-signal gates: does the updated cohort's own data look worse than the not-yet-updated cohort's?

Install status says a release boots; it says nothing about what the release does to the machine. These
gates compare what the fleet store shows for the devices that took a phase's update (treated) against
the devices that have not yet (control), over the same time, and trip only when the data show — at a
stated confidence — a change larger than the release manager is willing to accept:

* :func:`rate_ratio_gate` — a campaign's capture rate per device-hour. Captures are counted events over
  an exposure, so the two cohorts are two Poisson processes. Conditional on the total ``n`` of events,
  the treated count is Binomial(``n``, ``ρ·T₁ / (ρ·T₁ + T₂)``) when the rate ratio is ``ρ``; testing
  ``ρ ≤ 1 + min_effect`` against ``ρ > 1 + min_effect`` with that binomial's upper tail is the exact
  conditional test (Przyborowski & Wileński), valid for any exposure however small: no normal
  approximation, so five canaries with three captures get a true p-value, not an optimistic one.
* :func:`mean_shift_gate` — a numeric per-device aggregate (mean brake pressure per device-hour, ...).
  Welch's two-sample t-test on the per-device values, shifted by the allowed effect. Welch rather than a
  rank test because (1) the allowed effect is a mean difference in the aggregate's own units, which is
  exactly Welch's null, while a rank test's shift null holds only if the release moves every device by
  the same amount; (2) a canary cohort is small and the control large, and a bad release often changes
  the spread as well as the level — the Behrens–Fisher case, where Welch keeps its false-trip rate and
  Student's t and Mann–Whitney do not; (3) each per-device value is already an average of many samples,
  so it is close to normal even when the samples are not. Its weakness — one device with a broken
  sensor drags a mean — is the aggregate SQL's to prevent (filter or clip there).

Both are one-sided (only a change for the worse trips), need a minimum amount of data in both cohorts
before they decide anything ("insufficient" until then), and return every number they used, so the
decision can be persisted, audited and explained. Pure: no I/O, no clock; the distributions are computed
here (regularized incomplete beta by its continued fraction) so the cloud needs no scientific stack.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from fleetloop_shared.choices import check_choice
from fleetloop_shared.errors import InternalError, UserError

Decision = Literal["pass", "trip", "insufficient"]
Direction = Literal["increase", "decrease"]

#: Iterations the incomplete beta's continued fraction may take. It needs about √max(a, b) near the
#: distribution's centre, so this covers event totals in the hundreds of millions; beyond, a bug.
_MAX_CF_ITERATIONS: Final = 200_000
_CF_EPS: Final = 1e-15
_TINY: Final = 1e-300
#: From here on ln Γ differences go through Stirling's series (see :func:`log_beta`).
_STIRLING_FROM: Final = 10.0
#: Safeguarded Newton steps for the confidence bounds, and their relative tolerance.
_ROOT_STEPS: Final = 200
_ROOT_TOL: Final = 1e-11
#: Rate ratio bounds are searched within e^±60 (about 1e-26 to 1e26).
_LOG_RATIO_RANGE: Final = 60.0
_NAN: Final = math.nan


@dataclass(frozen=True)
class GateEvaluation:
    """One evaluation of one gate: what it decided, on which numbers, and why in one line."""

    #: ``insufficient`` = not enough exposure or devices yet to decide either way.
    decision: Decision
    #: The test statistic (NaN when insufficient): the treated event count given the total for the rate
    #: gate (the exact test's statistic), Welch's t for the mean gate.
    statistic: float
    #: One-sided p-value against the null "no worse than the allowed effect" (NaN when insufficient).
    p_value: float
    #: Observed: rate ratio treated/control, or mean difference treated − control. ``inf`` when the control
    #: cohort has no event and the treated one has; NaN when neither cohort has data to compare.
    effect: float
    #: One line a release manager reads, with the numbers.
    reason: str
    #: Everything the decision used (inputs and what was derived from them), for persistence and audit.
    inputs: Mapping[str, float] = field(default_factory=dict)


# -- distributions ---------------------------------------------------------------------------------------


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta (DLMF 8.17.22), by modified Lentz."""
    f = 1.0
    c = 1.0
    d = 0.0
    for j in range(1, _MAX_CF_ITERATIONS + 1):
        m = j // 2
        if j % 2:
            coef = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:
            coef = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + coef * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + coef / c
        c = c if abs(c) > _TINY else _TINY
        step = c * d
        f *= step
        if abs(step - 1.0) < _CF_EPS:
            return 1.0 / f
    raise InternalError(f"incomplete beta did not converge for a={a}, b={b}, x={x}")


def _stirling_correction(x: float) -> float:
    """lgamma(x) − ((x − ½)·ln x − x + ½·ln 2π) for x ≥ 10, by Stirling's series (error < 1e-16)."""
    inv = 1.0 / x
    inv2 = inv * inv
    return inv * (1 / 12 - inv2 * (1 / 360 - inv2 * (1 / 1260 - inv2 / 1680)))


def log_beta(a: float, b: float) -> float:
    """ln B(a, b). With a large parameter, ``lgamma(a) − lgamma(a + b)`` would subtract two huge, nearly
    equal numbers; Stirling's series lets their big terms cancel on paper instead."""
    small, large = (a, b) if a <= b else (b, a)
    if large < _STIRLING_FROM:
        return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    total = a + b
    large_minus_total = (
        -(large - 0.5) * math.log1p(small / large)
        - small * math.log(total)
        + small
        + _stirling_correction(large)
        - _stirling_correction(total)
    )
    return math.lgamma(small) + large_minus_total


def regularized_beta(a: float, b: float, x: float, y: float | None = None) -> tuple[float, float]:
    """``(I_x(a, b), 1 − I_x(a, b))``, each accurate to ~1e-10 relative or better even when tiny.

    ``y`` is ``1 − x`` when the caller knows it more exactly than the subtraction would give (x near 1).
    The fraction converges fast below the distribution's mean, so above it the complement is computed
    from the mirrored fraction (I_x(a, b) = 1 − I_{1−x}(b, a)) and the small side is never a difference.
    """
    if not (a > 0 and b > 0):
        raise InternalError(f"incomplete beta needs a, b > 0, got a={a}, b={b}")
    if y is None:
        y = 1.0 - x
    if x <= 0.0:
        return 0.0, 1.0
    if y <= 0.0:
        return 1.0, 0.0
    log_x = math.log1p(-y) if x > 0.5 else math.log(x)
    log_y = math.log1p(-x) if y > 0.5 else math.log(y)
    log_front = a * log_x + b * log_y - log_beta(a, b)
    if x < (a + 1.0) / (a + b + 2.0):
        value = math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
        return value, 1.0 - value
    complement = math.exp(log_front) * _beta_continued_fraction(b, a, y) / b
    return 1.0 - complement, complement


def binomial_sf(k: int, n: int, p: float, q: float | None = None) -> float:
    """P(X ≥ k) for X ~ Binomial(n, p), exactly (up to floating point): I_p(k, n − k + 1).

    ``q`` is ``1 − p`` when known more exactly than the subtraction gives.
    """
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0 or (q is not None and q <= 0.0):
        return 1.0
    return regularized_beta(float(k), float(n - k + 1), p, q)[0]


def student_t_sf(t: float, df: float) -> float:
    """P(T ≥ t) for Student's t with ``df`` (real, > 0) degrees of freedom."""
    if math.isnan(t):
        return _NAN
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    t2 = t * t
    tail = 0.5 * regularized_beta(df / 2.0, 0.5, df / (df + t2), t2 / (df + t2))[0]  # P(|T| ≥ |t|) / 2
    return tail if t >= 0 else 1.0 - tail


def _student_t_pdf(t: float, df: float) -> float:
    log_pdf = -0.5 * math.log(df) - log_beta(df / 2.0, 0.5) - (df + 1) / 2 * math.log1p(t * t / df)
    return math.exp(log_pdf)


def _increasing_root(
    f: Callable[[float], float], slope: Callable[[float], float], lo: float, hi: float
) -> float:
    """The x in [lo, hi] where the increasing ``f`` crosses 0 (f(lo) ≤ 0 ≤ f(hi)): Newton's steps, with a
    bisection whenever a step would leave the bracket, so it always converges and usually in a few steps."""
    x = 0.5 * (lo + hi)
    for _ in range(_ROOT_STEPS):
        fx = f(x)
        if fx == 0.0:
            return x
        if fx < 0.0:
            lo = x
        else:
            hi = x
        d = slope(x)
        step = x - fx / d if d > 0.0 and math.isfinite(d) else math.nan
        nxt = step if lo < step < hi else 0.5 * (lo + hi)
        if abs(nxt - x) <= _ROOT_TOL * max(1.0, abs(x)) or hi - lo <= _ROOT_TOL * max(1.0, abs(x)):
            return nxt
        x = nxt
    return x


def _student_t_isf(alpha: float, df: float) -> float:
    """The t ≥ 0 with P(T ≥ t) = alpha (0 < alpha ≤ 0.5)."""
    hi = 1.0
    while student_t_sf(hi, df) > alpha:
        hi *= 2.0
        if hi > 1e300:
            return math.inf
    return _increasing_root(lambda t: alpha - student_t_sf(t, df), lambda t: _student_t_pdf(t, df), 0.0, hi)


# -- input checks ------------------------------------------------------------------------------------------


def _confidence(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < value < 1.0:
        raise UserError(f"confidence must be a number strictly between 0 and 1 (e.g. 0.99), got {value!r}")
    return float(value)


def _non_negative(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise UserError(f"{name} must be a finite number ≥ 0, got {value!r}")
    return float(value)


def _count(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"{name} must be a whole number ≥ 0, got {value!r}")
    return value


def _values(values: Sequence[float], name: str) -> list[float]:
    out: list[float] = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise UserError(f"{name}[{i}] must be a finite number, got {v!r}")
        out.append(float(v))
    return out


def _percent(confidence: float) -> str:
    return f"{confidence * 100:.6g}%"


def _p(p: float) -> str:
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


# -- (a) capture rate ratio ---------------------------------------------------------------------------------


def _rate_ratio_lower_bound(x1: int, n: int, t1: float, t2: float, alpha: float) -> float:
    """The one-sided exact lower confidence bound of the rate ratio: the ρ at which the test's p-value
    (increasing in ρ) reaches ``alpha`` — the Clopper–Pearson bound of the treated share, as a ratio."""
    if x1 == 0:
        return 0.0
    a, b = float(x1), float(n - x1 + 1)
    ln_beta = log_beta(a, b)
    offset = math.log(t1 / t2)

    def shares(log_rho: float) -> tuple[float, float]:
        """(treated share p, 1 − p) of the events under ratio ρ, each computed without a subtraction."""
        z = log_rho + offset
        return 1.0 / (1.0 + math.exp(-z)), 1.0 / (1.0 + math.exp(z))

    def excess(log_rho: float) -> float:
        return binomial_sf(x1, n, *shares(log_rho)) - alpha

    def slope(log_rho: float) -> float:  # d/dlogρ of I_p(a, b) = density(p) · p(1 − p)
        p, q = shares(log_rho)
        if p <= 0.0 or q <= 0.0:
            return 0.0
        return math.exp(a * math.log(p) + b * math.log(q) - ln_beta)

    lo, hi = -_LOG_RATIO_RANGE, _LOG_RATIO_RANGE
    if excess(lo) > 0.0:
        return math.exp(lo)
    if excess(hi) <= 0.0:
        return math.exp(hi)
    return math.exp(_increasing_root(excess, slope, lo, hi))


def rate_ratio_gate(
    treated_events: int,
    treated_exposure_h: float,
    control_events: int,
    control_exposure_h: float,
    *,
    confidence: float,
    min_effect: float,
    min_exposure_h: float,
) -> GateEvaluation:
    """Trip when the treated cohort's event rate exceeds ``1 + min_effect`` times the control's, at
    ``confidence`` (exact conditional binomial test); insufficient while either cohort has less than
    ``min_exposure_h`` device-hours (or none at all).

    ``min_effect`` is relative: 0.25 tolerates up to 25 % more captures per device-hour.
    """
    x1 = _count(treated_events, "treated_events")
    x2 = _count(control_events, "control_events")
    t1 = _non_negative(treated_exposure_h, "treated_exposure_h")
    t2 = _non_negative(control_exposure_h, "control_exposure_h")
    level = _confidence(confidence)
    effect_floor = _non_negative(min_effect, "min_effect")
    min_t = _non_negative(min_exposure_h, "min_exposure_h")
    alpha = 1.0 - level
    null_ratio = 1.0 + effect_floor
    inputs: dict[str, float] = {
        "treated_events": float(x1),
        "treated_exposure_h": t1,
        "control_events": float(x2),
        "control_exposure_h": t2,
        "confidence": level,
        "min_effect": effect_floor,
        "min_exposure_h": min_t,
        "null_ratio": null_ratio,
    }
    counts = f"{x1} events in {t1:.4g} device-h updated vs {x2} in {t2:.4g} device-h not updated"
    if t1 <= 0.0 or t2 <= 0.0 or t1 < min_t or t2 < min_t:
        effect = (x1 / t1) / (x2 / t2) if t1 > 0 and t2 > 0 and x2 > 0 else _NAN
        return GateEvaluation(
            "insufficient",
            _NAN,
            _NAN,
            effect,
            f"insufficient exposure: {t1:.4g} device-h updated, {t2:.4g} device-h not updated "
            f"(each needs ≥ {min_t:.4g}); {counts}",
            inputs,
        )
    rate1, rate2 = x1 / t1, x2 / t2
    effect = rate1 / rate2 if x2 > 0 else (math.inf if x1 > 0 else _NAN)
    n = x1 + x2
    share = null_ratio * t1 / (null_ratio * t1 + t2)
    p_value = binomial_sf(x1, n, share, t2 / (null_ratio * t1 + t2))
    lower = _rate_ratio_lower_bound(x1, n, t1, t2, alpha)
    inputs.update(
        treated_rate_per_h=rate1,
        control_rate_per_h=rate2,
        null_treated_share=share,
        ratio_lower_bound=lower,
    )
    trip = p_value <= alpha
    observed = "no events in either cohort" if n == 0 else f"ratio {effect:.3g}"
    verdict = (
        f"at {_percent(level)} confidence the ratio is ≥ {lower:.3g}, above the allowed {null_ratio:.3g}"
        if trip
        else f"not shown above the allowed {null_ratio:.3g} at {_percent(level)} confidence "
        f"(lower bound {lower:.3g})"
    )
    reason = (
        f"{'trip' if trip else 'pass'}: capture rate {rate1:.3g}/device-h updated vs {rate2:.3g}/device-h "
        f"not updated, {observed}; {verdict}; exact p={_p(p_value)}; {counts}"
    )
    return GateEvaluation("trip" if trip else "pass", float(x1), p_value, effect, reason, inputs)


# -- (b) per-device aggregate mean shift --------------------------------------------------------------------


def _mean_var(values: list[float]) -> tuple[float, float]:
    """Mean and sample variance (n − 1), two-pass for accuracy."""
    n = len(values)
    mean = math.fsum(values) / n
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, var


def mean_shift_gate(
    treated: Sequence[float],
    control: Sequence[float],
    *,
    confidence: float,
    min_effect: float,
    min_devices: int,
    direction: Direction,
) -> GateEvaluation:
    """Trip when the treated devices' mean is shifted beyond ``min_effect`` (absolute, in the aggregate's
    units) in ``direction`` relative to the control devices', at ``confidence`` (one-sided Welch t-test of
    ``μ_treated − μ_control ≤ min_effect`` for an increase, ``≥ −min_effect`` for a decrease);
    insufficient while either cohort has fewer than ``min_devices`` values (at least 2: a spread needs two).
    """
    check_choice(direction, ("increase", "decrease"), "direction", error=UserError)
    if isinstance(min_devices, bool) or not isinstance(min_devices, int) or min_devices < 2:
        raise UserError(f"min_devices must be a whole number ≥ 2 (a spread needs two), got {min_devices!r}")
    a = _values(treated, "treated")
    b = _values(control, "control")
    level = _confidence(confidence)
    allowed = _non_negative(min_effect, "min_effect")
    alpha = 1.0 - level
    sign = 1.0 if direction == "increase" else -1.0
    null_shift = sign * allowed
    inputs: dict[str, float] = {
        "treated_devices": float(len(a)),
        "control_devices": float(len(b)),
        "confidence": level,
        "min_effect": allowed,
        "min_devices": float(min_devices),
        "direction": sign,
        "null_shift": null_shift,
    }
    if len(a) < min_devices or len(b) < min_devices:
        effect = math.fsum(a) / len(a) - math.fsum(b) / len(b) if a and b else _NAN
        return GateEvaluation(
            "insufficient",
            _NAN,
            _NAN,
            effect,
            f"insufficient devices: {len(a)} updated and {len(b)} not updated with a value "
            f"(each needs ≥ {min_devices})",
            inputs,
        )
    m1, v1 = _mean_var(a)
    m2, v2 = _mean_var(b)
    diff = m1 - m2
    se2 = v1 / len(a) + v2 / len(b)
    se = math.sqrt(se2)
    excess = sign * (diff - null_shift)  # > 0: worse than allowed, in the direction that matters
    if se > 0.0:
        statistic = (diff - null_shift) / se
        df = se2 * se2 / ((v1 / len(a)) ** 2 / (len(a) - 1) + (v2 / len(b)) ** 2 / (len(b) - 1))
        p_value = student_t_sf(sign * statistic, df)
        bound = diff - sign * _student_t_isf(alpha, df) * se
    else:  # every device of both cohorts reported the same value: the shift is known exactly
        statistic = math.copysign(math.inf, diff - null_shift) if excess != 0 else 0.0
        df = float(len(a) + len(b) - 2)
        p_value = 0.0 if excess > 0 else 1.0
        bound = diff
    inputs.update(
        treated_mean=m1,
        treated_sd=math.sqrt(v1),
        control_mean=m2,
        control_sd=math.sqrt(v2),
        standard_error=se,
        degrees_of_freedom=df,
        shift_bound=bound,
    )
    trip = p_value <= alpha
    word = "≥" if sign > 0 else "≤"
    verdict = (
        f"at {_percent(level)} confidence the shift is {word} {bound:+.4g}, "
        f"beyond the allowed {null_shift:+.4g}"
        if trip
        else f"not shown beyond the allowed {null_shift:+.4g} at {_percent(level)} confidence "
        f"(bound {bound:+.4g})"
    )
    reason = (
        f"{'trip' if trip else 'pass'}: mean {m1:.4g} on {len(a)} updated devices vs {m2:.4g} on {len(b)} "
        f"not updated, shift {diff:+.4g}; {verdict}; Welch t={statistic:.3g}, df={df:.3g}, p={_p(p_value)}"
    )
    return GateEvaluation("trip" if trip else "pass", statistic, p_value, diff, reason, inputs)
