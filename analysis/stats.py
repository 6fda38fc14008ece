"""Small statistics for results over seeds: Student-t quantiles and t confidence intervals.

scipy is not a dependency of the package, so the t quantile is computed here:
the t distribution function through the regularized incomplete beta function
(continued fraction, as in Numerical Recipes ``betacf``), inverted by bisection.
It agrees with scipy.stats.t.ppf to 1e-9 (relative) at the quantiles intervals use
(tests/test_analysis_study.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

CONFIDENCE = 0.95


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    # The continued fraction converges fast for x < (a + 1) / (a + b + 2); use symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(x: float, df: float) -> float:
    """P(T <= x) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * regularized_beta(df / 2.0, 0.5, df / (df + x * x))
    return 1.0 - tail if x >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` > 0 degrees of freedom.

    Example: ``t_quantile(0.975, 2)`` is 4.302653 (the 95% two-sided multiplier for 3 values).

    Raises:
        ValueError: If p is not in (0, 1) or df <= 0.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if not df > 0:
        raise ValueError(f"df must be > 0, got {df}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    high = 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    low = 0.0
    for _ in range(200):  # bisection to machine precision
        middle = 0.5 * (low + high)
        if t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
        if high - low <= 1e-13 * high:
            break
    return 0.5 * (low + high)


@dataclass(frozen=True)
class Interval:
    """Mean and two-sided Student-t confidence interval of a sample.

    Attributes:
        n: Number of finite values used.
        mean: Their mean (NaN when n = 0).
        half_width: t_{(1+confidence)/2, n-1} * sd / sqrt(n), with sd the sample
            standard deviation (ddof=1); NaN when n < 2 (no interval from one value).
        confidence: The interval's coverage, e.g. 0.95.
    """

    n: int
    mean: float
    half_width: float
    confidence: float = CONFIDENCE

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width


def t_interval(values: Iterable[float], confidence: float = CONFIDENCE) -> Interval:
    """Student-t interval for the mean of ``values`` (NaNs are dropped), n - 1 degrees of freedom.

    The values are treated as independent draws (one per seed), so the interval
    says how much the mean would move over seeds; it says nothing about the
    spread over clients within one run.
    """
    sample = [float(value) for value in values if not math.isnan(float(value))]
    n = len(sample)
    if n == 0:
        return Interval(0, math.nan, math.nan, confidence)
    mean = math.fsum(sample) / n
    if n == 1:
        return Interval(1, mean, math.nan, confidence)
    variance = math.fsum((value - mean) ** 2 for value in sample) / (n - 1)
    multiplier = t_quantile(0.5 + confidence / 2.0, n - 1)
    return Interval(n, mean, multiplier * math.sqrt(variance / n), confidence)
