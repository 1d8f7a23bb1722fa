"""The report's statistics, as pure functions of numbers (no files, no formatting).

- mean and sample standard deviation (ddof=1) of one cell's seeds: the unpaired summary;
- paired differences: runs of the same seed share initialisation and batches (the data-stream
  contract, at.data.stream), so a method's error minus the baseline's error *of the same seed* cancels most of the
  seed-to-seed noise. Their mean gets a 95% confidence interval from Student's t with n - 1
  degrees of freedom; with one pair there is no interval.

The t quantile is computed here (bisection on the t distribution's CDF, written with the
regularised incomplete beta function) rather than taken from scipy, which is not one of the
project's declared dependencies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

CONFIDENCE = 0.95


def mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def sample_std(values: Sequence[float]) -> float | None:
    """Sample standard deviation (ddof=1): the spread expected between two independent seeds."""
    if len(values) < 2:
        return None
    m = math.fsum(values) / len(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (len(values) - 1))


# ----------------------------------------------------------------------------------------------
# Student's t quantile


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function, evaluated by the modified Lentz method."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 10_000):
        # two steps of the fraction per m: the even term d_{2m}, then the odd term d_{2m+1}
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-16:
            return result
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"regularized_incomplete_beta needs a, b > 0 and 0 <= x <= 1, got {a}, {b}, {x}")
    if x in (0.0, 1.0):
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    # the fraction converges fast for x < (a + 1) / (a + b + 2); otherwise use I_x(a,b) = 1 - I_{1-x}(b,a)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (Student's t, df degrees of freedom), by bisection."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile needs 0 < p < 1, got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):  # the CDF is increasing: halve [lo, hi] until it is one float wide
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# ----------------------------------------------------------------------------------------------
# Paired differences to a baseline


@dataclass(frozen=True)
class PairedDifference:
    """A method minus its baseline, seed by seed (percentage points of error)."""

    seeds: tuple[int, ...]            # the seeds present in both, sorted
    differences: tuple[float, ...]    # method - baseline, one per seed
    mean: float | None                # None: no seed in common
    ci_low: float | None              # None: fewer than 2 pairs
    ci_high: float | None
    reference: float | None           # reference method - reference baseline; None: one is missing

    @property
    def n(self) -> int:
        return len(self.differences)

    @property
    def sign_agrees(self) -> bool | None:
        """Whether our mean difference has the reference's sign; None when either is missing."""
        if self.mean is None or self.reference is None:
            return None
        return _sign(self.mean) == _sign(self.reference)


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def confidence_interval(differences: Sequence[float], confidence: float = CONFIDENCE
                        ) -> tuple[float, float] | None:
    """mean ± t_{(1+c)/2, n-1} * s / sqrt(n); None for n < 2."""
    n = len(differences)
    if n < 2:
        return None
    m, s = mean(differences), sample_std(differences)
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * s / math.sqrt(n)
    return m - half, m + half


def paired_difference(method: Mapping[int, float], baseline: Mapping[int, float],
                      reference_method: float | None = None,
                      reference_baseline: float | None = None) -> PairedDifference:
    """Pair a method's and its baseline's errors by seed ({seed: error}); unpaired seeds drop out."""
    seeds = tuple(sorted(set(method) & set(baseline)))
    differences = tuple(method[s] - baseline[s] for s in seeds)
    interval = confidence_interval(differences)
    reference = (None if reference_method is None or reference_baseline is None
                 else reference_method - reference_baseline)
    return PairedDifference(
        seeds=seeds, differences=differences, mean=mean(differences),
        ci_low=interval[0] if interval else None, ci_high=interval[1] if interval else None,
        reference=reference,
    )
