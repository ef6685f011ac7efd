"""The statistics of the report: a metric over seeds, and the paired t test against no dropout.

Pure Python (math and statistics only): exact for small samples, no SciPy needed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass

from dropcluster.validation import check_int

__all__ = ["PairedTest", "SeedStats", "paired_t_test", "student_t_two_sided_p"]


@dataclass(frozen=True)
class SeedStats:
    """One metric over the seeds of a group of runs, in percent.

    Attributes:
        values: one value per seed (run).
    """

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        """Number of seeds."""
        return len(self.values)

    @property
    def mean(self) -> float:
        """Mean over seeds (NaN with no seed)."""
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds (ddof=1); None with fewer than 2 seeds."""
        return statistics.stdev(self.values) if self.n > 1 else None

    def mean_std(self) -> tuple[float, float | None]:
        """``(mean, std)``, the form the figure functions take."""
        return self.mean, self.std


def student_t_two_sided_p(t: float, df: int) -> float:
    """The two-sided tail of Student's t distribution, ``P(|T| >= |t|)`` with ``df`` degrees of
    freedom, exact for integer ``df`` (Abramowitz & Stegun 26.7.3 and 26.7.4).

    With ``theta = atan(|t| / sqrt(df))`` and ``c = cos(theta)``, A&S give the central
    probability ``A = P(|T| < |t|)`` as a finite series: for odd ``df``,
    ``A = 2/pi * (theta + sin(theta) * (c + 2/3 c^3 + ... + (2*4*...*(df-3)) / (1*3*...*(df-2))
    c^(df-2)))`` (only ``2 theta / pi`` for ``df = 1``); for even ``df``,
    ``A = sin(theta) * (1 + 1/2 c^2 + ... + (1*3*...*(df-3)) / (2*4*...*(df-2)) c^(df-2))``.

    Returns:
        ``1 - A``, in [0, 1]: 1 for ``t = 0``, 0 for an infinite ``t``.

    Raises:
        ValueError: ``df`` is not an integer >= 1, or ``t`` is NaN.
    """
    check_int("df", df, minimum=1)
    if math.isnan(t):
        raise ValueError("t is NaN")
    theta = math.atan2(abs(t), math.sqrt(df))
    sine, cosine_squared = math.sin(theta), math.cos(theta) ** 2
    if df % 2:
        term, series = math.cos(theta), 0.0
        for k in range(1, (df - 1) // 2 + 1):
            series += term
            term *= cosine_squared * (2 * k) / (2 * k + 1)
        # 1 - 2/pi * theta written as 2/pi * (pi/2 - theta): no cancellation for small p.
        tail = 2 / math.pi * (math.atan2(math.sqrt(df), abs(t)) - sine * series)
    else:
        term, series = 1.0, 0.0
        for k in range(1, df // 2 + 1):
            series += term
            term *= cosine_squared * (2 * k - 1) / (2 * k)
        tail = 1.0 - sine * series
    return min(1.0, max(0.0, tail))


@dataclass(frozen=True)
class PairedTest:
    """A paired t test: one difference (arm - no dropout) per seed.

    Attributes:
        differences: one per seed, in percentage points.
        t: mean / (sd / sqrt(n)); ``±inf`` when every difference is the same non-zero value
            (sd 0), None when every difference is 0 (nothing to test).
        p_value: two-sided, with n - 1 degrees of freedom; 0 when ``t`` is infinite, None when
            ``t`` is None.
    """

    differences: tuple[float, ...]
    t: float | None
    p_value: float | None

    @property
    def n(self) -> int:
        """Number of pairs (seeds)."""
        return len(self.differences)

    @property
    def stats(self) -> SeedStats:
        """The differences as :class:`SeedStats` (mean and sd with ddof 1)."""
        return SeedStats(self.differences)

    @property
    def better(self) -> int:
        """Number of seeds where the arm is ahead (a positive difference)."""
        return sum(1 for difference in self.differences if difference > 0)


def paired_t_test(differences: Iterable[float]) -> PairedTest:
    """The paired t test of ``differences`` (one per seed) against a mean of 0.

    Returns:
        A :class:`PairedTest`.

    Raises:
        ValueError: fewer than 2 differences, or a NaN among them.
    """
    differences = tuple(float(d) for d in differences)
    if len(differences) < 2 or any(math.isnan(d) for d in differences):
        raise ValueError(f"a paired t test needs 2 or more numbers, but got {differences}")
    stats = SeedStats(differences)
    # statistics.stdev is exact (fractions): it is 0 only when every difference is the same.
    # The t test is undefined then (no spread to compare the mean with): no t, no p value; the
    # table still says in how many seeds the arm was ahead.
    if stats.std == 0:
        return PairedTest(differences, None, None)
    t = stats.mean / (stats.std / math.sqrt(stats.n))
    return PairedTest(differences, t, student_t_two_sided_p(t, stats.n - 1))
