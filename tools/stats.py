"""Tests and intervals behind every finding the suite reports.

Definitions
-----------
Bootstrap p-value of "no difference" (``bootstrap_p``): two-sided, from the observed difference
d and the standard error of the B finite resampled differences, ``p = 2 * (1 - Phi(|d| / se))``
(every resample the same non-zero difference: 0). Unlike counting resamples on either side of
0, it can fall below 1 / B, which a correction over hundreds of comparisons needs.

One-sided bootstrap p-value of "value <= threshold" (``exceed_p``): ``(1 + #{v* <= threshold}) /
(B + 1)``; for a quantity flagged when it exceeds a tolerance (ECE above 0.05).

Benjamini-Hochberg q-values (``bh_qvalues``): with the m p-values sorted, ``q_(i) = min over j >= i
of p_(j) * m / j``, capped at 1; rejecting q < alpha controls the false discovery rate at alpha
over the family of m tests (Benjamini and Hochberg 1995).

Score intervals, which stay intervals where a percentile bootstrap collapses to a point (an
AUROC of exactly 1.0 resamples to 1.0 every time):

- a proportion k / n (a sensitivity among n positives, a specificity among n negatives): Wilson's
  score interval;
- an AUROC from n_pos positives and n_neg negatives: the score-type interval that solves
  ``(theta_hat - theta)^2 = z^2 V(theta)`` with the Hanley-McNeil variance
  ``V = theta (1 - theta) / (n_pos n_neg) * (1 + (N - 1) ((1 - theta) / (2 - theta) + theta /
  (1 + theta)))``, both class sizes replaced by their mean N = (n_pos + n_neg) / 2, after
  Newcombe (2006); both ends found by bisection;
- a difference of two independent estimates (a group against the rest of the patients): MOVER,
  ``d - sqrt((t1 - l1)^2 + (u2 - t2)^2)`` and ``d + sqrt((u1 - t1)^2 + (t2 - l2)^2)`` from each
  side's interval (Newcombe 1998; Zou and Donner 2008). Its p-value (``mover_p``) inverts it: the
  level at which the interval's end reaches 0.

Score intervals ignore that films of one patient are correlated; the patient bootstrap does not.
The suite reports the hull of the two (``hull``), so an interval is as wide as either method
says, and the p-value is the larger of the two, so p < 0.05 exactly when the reported interval
excludes 0.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import norm

Z95 = float(norm.ppf(0.975))
MIN_BOOT = 10  # fewer finite resamples than this give no interval and no p-value
SCORE_METRICS = ("auroc", "sens@95spec", "sens@0.5", "spec@0.5")  # the metrics with a score interval
_BISECT = 42  # halvings of a bracket of width <= 1: below 1e-12


def bootstrap_p(point: float, boot) -> float | None:
    """Two-sided p-value of "no difference" from the difference ``point`` and its bootstrap
    resamples (NaN ignored); None with fewer than MIN_BOOT finite resamples."""
    d = np.asarray(boot, float)
    d = d[np.isfinite(d)]
    if len(d) < MIN_BOOT or not np.isfinite(point):
        return None
    se = float(np.std(d, ddof=1))
    if se == 0:
        return 1.0 if point == 0 else 0.0
    return float(2 * norm.sf(abs(point) / se))


def exceed_p(boot, threshold: float) -> float | None:
    """One-sided bootstrap p-value of "value <= threshold" (NaN ignored)."""
    v = np.asarray(boot, float)
    v = v[np.isfinite(v)]
    if len(v) < MIN_BOOT:
        return None
    return float((np.sum(v <= threshold) + 1) / (len(v) + 1))


def bh_qvalues(p) -> np.ndarray:
    """Benjamini-Hochberg q-values of ``p`` (same order); NaN stays NaN and is not counted in m."""
    p = np.asarray(p, float)
    q = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    if len(ok) == 0:
        return q
    order = ok[np.argsort(p[ok], kind="mergesort")]
    m = len(order)
    scaled = p[order] * m / np.arange(1, m + 1)
    q[order] = np.minimum(1.0, np.minimum.accumulate(scaled[::-1])[::-1])
    return q


# ====== score intervals ======

def wilson(k, n, z=Z95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of the proportion k / n (arrays broadcast); NaN where n = 0."""
    k, n, z = np.asarray(k, float), np.asarray(n, float), np.asarray(z, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        denom = 1 + z ** 2 / n
        centre = (p + z ** 2 / (2 * n)) / denom
        half = z / denom * np.sqrt(np.maximum(p * (1 - p) / n + z ** 2 / (4 * n ** 2), 0))
    return np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)


def auroc_variance(theta, n_pos, n_neg) -> np.ndarray:
    """Hanley-McNeil variance of an AUROC with both class sizes replaced by their mean."""
    theta = np.asarray(theta, float)
    big_n = (np.asarray(n_pos, float) + np.asarray(n_neg, float)) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return theta * (1 - theta) / (n_pos * n_neg) * (
            1 + (big_n - 1) * ((1 - theta) / (2 - theta) + theta / (1 + theta)))


def auroc_score_interval(theta, n_pos, n_neg, z=Z95) -> tuple[np.ndarray, np.ndarray]:
    """Score-type interval of an AUROC (arrays broadcast): the roots of ``(theta_hat - t)^2 =
    z^2 V(t)`` below and above ``theta_hat``; NaN where a class is empty or theta is NaN."""
    theta_hat, n_pos, n_neg, z = np.broadcast_arrays(*(np.asarray(a, float) for a in (theta, n_pos, n_neg, z)))
    bad = ~np.isfinite(theta_hat) | (n_pos < 1) | (n_neg < 1)
    th = np.where(bad, 0.5, theta_hat)
    m, n = np.where(bad, 1, n_pos), np.where(bad, 1, n_neg)

    def excess(t):  # > 0 outside the interval, <= 0 inside
        return (th - t) ** 2 - z ** 2 * auroc_variance(t, m, n)

    ends = []
    for a, b in ((np.zeros_like(th), th.copy()), (th.copy(), np.ones_like(th))):
        outside_at_a = excess(a) > 0  # bisection keeps one end outside, one inside
        for _ in range(_BISECT):
            mid = (a + b) / 2
            move_a = (excess(mid) > 0) == outside_at_a
            a, b = np.where(move_a, mid, a), np.where(move_a, b, mid)
        ends.append((a + b) / 2)
    lo = np.where(th <= 0, 0.0, ends[0])
    hi = np.where(th >= 1, 1.0, ends[1])
    return np.where(bad, np.nan, lo), np.where(bad, np.nan, hi)


def score_interval(metric: str, value, n_pos, n_neg, z=Z95) -> tuple[np.ndarray, np.ndarray]:
    """The score interval of ``metric`` (AUROC, a sensitivity or a specificity; NaN for other
    metrics)."""
    if metric == "auroc":
        return auroc_score_interval(value, n_pos, n_neg, z)
    if metric in ("sens@95spec", "sens@0.5", "spec@0.5"):
        n = np.asarray(n_neg if metric == "spec@0.5" else n_pos, float)
        return wilson(np.round(np.asarray(value, float) * n), n, z)
    nan = np.full(np.broadcast(np.asarray(value), np.asarray(z)).shape, np.nan)
    return nan, nan.copy()


def mover(d, lo1, hi1, t1, lo2, hi2, t2) -> tuple[np.ndarray, np.ndarray]:
    """MOVER interval of ``d = t1 - t2`` from independent intervals (lo1, hi1) and (lo2, hi2)."""
    lower = d - np.sqrt((t1 - lo1) ** 2 + (hi2 - t2) ** 2)
    upper = d + np.sqrt((hi1 - t1) ** 2 + (t2 - lo2) ** 2)
    return lower, upper


def mover_p(metric: str, t1, pos1, neg1, t2, pos2, neg2) -> np.ndarray:
    """Two-sided p-value of ``t1 - t2 = 0`` by inverting the MOVER interval of two score
    intervals: the level at which the end nearer 0 reaches it (arrays; NaN where undefined).

    The interval's end is evaluated on a grid of z (with z = 1.96 on it, so p < 0.05 exactly when
    the 95% interval excludes 0) and the crossing is interpolated linearly between grid points."""
    t1, t2 = np.asarray(t1, float), np.asarray(t2, float)
    d = t1 - t2
    z = np.unique(np.r_[np.linspace(0.0, 8.0, 161), Z95])
    zz = np.broadcast_to(z, d.shape + z.shape)
    col = lambda a: np.asarray(a, float)[..., None]  # noqa: E731
    lo1, hi1 = score_interval(metric, col(t1), col(pos1), col(neg1), zz)
    lo2, hi2 = score_interval(metric, col(t2), col(pos2), col(neg2), zz)
    lower, upper = mover(col(d), lo1, hi1, col(t1), lo2, hi2, col(t2))
    gap = np.where(col(d) < 0, -upper, lower)  # > 0 while the interval excludes 0; falls with z
    excluded = np.sum(gap > 0, axis=-1)  # grid points before the crossing
    i = np.clip(excluded - 1, 0, len(z) - 2)
    g0, g1 = np.take_along_axis(gap, i[..., None], -1)[..., 0], np.take_along_axis(gap, i[..., None] + 1, -1)[..., 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        z_cross = z[i] + (z[i + 1] - z[i]) * np.clip(g0 / (g0 - g1), 0.0, 1.0)
    z_cross = np.where(excluded == 0, 0.0, np.where(excluded == len(z), z[-1], z_cross))
    p = 2 * norm.sf(z_cross)
    return np.where(~np.isfinite(d), np.nan, np.where(d == 0, 1.0, p))


def hull(a, b) -> list | None:
    """The smallest interval holding intervals ``a`` and ``b`` ([lo, hi] or None; NaN ends ignored)."""
    ends = [e for e in (a, b) if e is not None and np.all(np.isfinite(e))]
    if not ends:
        return None
    return [float(min(e[0] for e in ends)), float(max(e[1] for e in ends))]
