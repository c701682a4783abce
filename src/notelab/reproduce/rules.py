"""Decision rules: from repeated measurements to a verdict that machine noise cannot flip.

A claim is decided by checks. A check reads a sample of values (one per seed, per timing round or
per held-out pair) and states what the claim predicts about their mean: below or above a limit.
The verdict comes from the two-sided Student-t confidence interval of that mean::

    mean +- t_{(1 + c) / 2, n - 1} * s / sqrt(n)        (s: sample standard deviation, c = 0.95)

    holds          the whole interval is on the claimed side of the limit
    does not hold  the whole interval is on the other side
    inconclusive   the interval contains the limit (or n < 2: one value has no spread to judge by)

A noise-free measure (bytes of a cache, sequential depth counted from a model's structure) is
judged on its value alone. A check's ``role`` says how it counts: "decides"; "cannot refute" (it
can make a claim inconclusive, never refute it: used where a run leaves out part of the paper's
method); "reported" (shown with its interval, not counted: e.g. CPU throughput, which measures
how many cores were free as much as the models).

A claim's verdict: every group must hold; a group holds when one of its options does (an option
is the set of checks sharing ``option``, all of which must hold), e.g. the group "DDIM close to
DDPM at >= 10x speed" with the options S=20, S=50, S=100: :func:`claim_verdict`. Checks of several runs (seeds) are
pooled by concatenating their values and judging again: :func:`pool`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from notelab.core.config import config_from_dict
from notelab.core.errors import DataError

CONFIDENCE = 0.95
ROLES = ("decides", "cannot refute", "reported")


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (0.5 < p < 1) of Student's t distribution with ``df`` degrees of freedom.

    Bisection on the CDF, F(x) = 1/2 + integral_0^x f(u) du with the density
    f(u) = Gamma((df + 1) / 2) / (sqrt(df pi) Gamma(df / 2)) (1 + u^2 / df)^(-(df + 1) / 2),
    integrated by Simpson's rule after the substitution u = tan(theta) (finite range, smooth).
    """
    if not 0.5 < p < 1.0 or df < 1:
        raise ValueError(f"t_quantile: expected 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float) -> float:
        # u = tan(theta): du = (1 + u^2) dtheta, so the integrand stays bounded for every df.
        top, n = math.atan(x), 400
        h = top / n
        total = 0.0
        for i in range(n + 1):
            u = math.tan(i * h)
            g = math.exp(log_c - (df + 1) / 2 * math.log1p(u * u / df)) * (1 + u * u)
            total += g * (1 if i in (0, n) else 4 if i % 2 else 2)
        return 0.5 + total * h / 3

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, 2 * hi
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The t confidence interval of the mean of ``values`` (infinite for fewer than two values)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_interval: expected at least one value, got none")
    mean = statistics.fmean(values)
    if len(values) < 2 or not all(math.isfinite(v) for v in values):
        return Interval(mean, -math.inf, math.inf, len(values))
    half = t_quantile((1 + confidence) / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half, len(values))


def judge_interval(interval: Interval, limit: float, below: bool) -> str:
    """The verdict on "the mean is below ``limit``" (``below``) or "above ``limit``" from ``interval``."""
    if not (math.isfinite(interval.low) and math.isfinite(interval.high)):
        return "inconclusive"
    side_low, side_high = (interval.high < limit, interval.low > limit)
    if below:
        return "holds" if side_low else "does not hold" if side_high else "inconclusive"
    return "holds" if side_high else "does not hold" if side_low else "inconclusive"


def judge_exact(values: Sequence[float], limit: float, below: bool) -> str:
    """The verdict on a noise-free measure: every value on the claimed side of ``limit``."""
    if not values or not all(math.isfinite(v) for v in values):
        return "inconclusive"
    ok = all((v < limit) if below else (v > limit) for v in values)
    return "holds" if ok else "does not hold"


@dataclass
class Check:
    """One verdict-bearing measurement of a claim; build it with :func:`check`."""

    group: str  # every group must hold
    name: str  # what is measured, e.g. "GQA 2 kv heads: relative val-loss change"
    rule: str  # the decision rule in words
    values: list[float]  # the sample: one value per seed / round / pair
    limit: float
    below: bool  # the claim says the mean is below the limit (else above)
    exact: bool = False  # a noise-free measure, judged on its values without an interval
    role: str = "decides"  # one of ROLES
    option: str = ""  # alternatives within a group; checks sharing an option must all hold
    scale: float = 1.0  # display only: values are shown multiplied by this (100 for percent)
    unit: str = ""  # display only
    verdict: str = ""
    mean: float = math.nan
    low: float = -math.inf
    high: float = math.inf

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"Check.role: expected one of {ROLES}, got {self.role!r}")

    @classmethod
    def from_dict(cls, data: Any, where: str = "check") -> Check:
        """A check from its JSON form (``dataclasses.asdict``), every field validated; one-line
        :class:`DataError` otherwise. The verdict and interval are recomputed from the values (a
        stored verdict is never trusted), so the values may be non-finite (a diverged run's NaN)."""
        if not isinstance(data, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(data).__name__}")
        fields = {k: v for k, v in data.items() if k not in _DERIVED}
        values = fields.pop("values", None)
        if not isinstance(values, list) or not all(_is_number(v) for v in values):
            raise DataError(f"{where}.values: expected a list of numbers, got {_short(values)}")
        try:
            c = config_from_dict(cls, {**fields, "values": []}, where)
        except ValueError as e:  # ConfigError (a field) or __post_init__ (the role)
            raise DataError(str(e)) from None
        return judged(replace(c, values=[float(v) for v in values]))

    @property
    def effective(self) -> str:
        """The verdict as the claim counts it ("cannot refute": "does not hold" -> "inconclusive")."""
        if self.role == "cannot refute" and self.verdict == "does not hold":
            return "inconclusive"
        return self.verdict

    def interval_text(self) -> str:
        def f(x: float) -> str:
            if not math.isfinite(x):
                return "-inf" if x < 0 else "+inf"
            # a sign where the value is a change (percent, log ratio, slope difference); none for a factor
            return f"{x * self.scale:{'' if self.unit == 'x' else '+'}.3g}{self.unit}"

        side = "<" if self.below else ">"
        n = len(self.values)
        if self.exact:
            return f"{f(self.mean)} (noise-free; claim: {side} {f(self.limit)})"
        return (
            f"mean {f(self.mean)}, {round(100 * CONFIDENCE)}% CI [{f(self.low)}, {f(self.high)}] over n={n}; "
            f"claim: {side} {f(self.limit)}"
        )


_DERIVED = ("verdict", "mean", "low", "high")  # recomputed from the values by judged()


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _short(v: object) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def check(
    group: str,
    name: str,
    rule: str,
    values: Iterable[float],
    limit: float,
    below: bool,
    *,
    exact: bool = False,
    role: str = "decides",
    option: str = "",
    scale: float = 1.0,
    unit: str = "",
) -> Check:
    """A :class:`Check` with its interval and verdict computed from ``values``."""
    values = [float(v) for v in values]
    return judged(Check(group, name, rule, values, float(limit), below, exact, role, option, scale, unit))


def judged(c: Check) -> Check:
    """``c`` with ``verdict``, ``mean``, ``low``, ``high`` recomputed from its values."""
    if not c.values:
        return replace(c, verdict="inconclusive")
    if c.exact:
        mean = statistics.fmean(c.values)
        return replace(c, verdict=judge_exact(c.values, c.limit, c.below), mean=mean, low=mean, high=mean)
    iv = mean_interval(c.values)
    return replace(c, verdict=judge_interval(iv, c.limit, c.below), mean=iv.mean, low=iv.low, high=iv.high)


def any_of(verdicts: Sequence[str]) -> str:
    if "holds" in verdicts:
        return "holds"
    return "does not hold" if verdicts and all(v == "does not hold" for v in verdicts) else "inconclusive"


def all_of(verdicts: Sequence[str]) -> str:
    if verdicts and all(v == "holds" for v in verdicts):
        return "holds"
    return "does not hold" if "does not hold" in verdicts else "inconclusive"


def group_verdicts(checks: Sequence[Check]) -> dict[str, str]:
    """Each group's verdict: any of its options, each option all of its checks ("reported" ones left out)."""
    groups: dict[str, dict[str, list[str]]] = {}
    for c in checks:
        if c.role != "reported":
            groups.setdefault(c.group, {}).setdefault(c.option, []).append(c.effective)
    return {g: any_of([all_of(vs) for vs in options.values()]) for g, options in groups.items()}


def claim_verdict(checks: Sequence[Check]) -> str:
    """All groups must hold; "does not hold" when one does not; else "inconclusive"."""
    return all_of(list(group_verdicts(checks).values())) if checks else "inconclusive"


def pool(runs: Sequence[Sequence[Check]]) -> list[Check]:
    """The checks of several runs (seeds) of one claim, each judged on all runs' values together.

    Checks are matched by (group, option, name); a check missing from some run is pooled over
    the runs that have it.
    """
    pooled: dict[tuple[str, str, str], Check] = {}
    for checks in runs:
        for c in checks:
            key = (c.group, c.option, c.name)
            pooled[key] = replace(c, values=pooled[key].values + c.values) if key in pooled else replace(c)
    return [judged(c) for c in pooled.values()]


def paired_ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """``a_i / b_i`` for measurements taken back to back (a load burst hits both of a pair alike)."""
    if len(a) != len(b):
        raise ValueError(f"paired_ratios: expected equal lengths, got {len(a)} and {len(b)}")
    return [x / y for x, y in zip(a, b)]


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


__all__ = [
    "CONFIDENCE",
    "ROLES",
    "Check",
    "Interval",
    "all_of",
    "any_of",
    "check",
    "claim_verdict",
    "group_verdicts",
    "judge_exact",
    "judge_interval",
    "judged",
    "mean_interval",
    "median",
    "paired_ratios",
    "pool",
    "t_quantile",
]
