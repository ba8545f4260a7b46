"""Selective prediction: risk-coverage curves and AURC for the decisions of a multi-label model.

Decisions are the known (image, label) pairs (label not NaN) at threshold 0.5; a decision is
correct when ``(p >= 0.5) == y``. A confidence signal ranks the decisions; abstaining on the
least confident ones trades coverage for risk.

Definitions
-----------
Confidence: ``max(p, 1 - p)`` for the probability itself (``confidence_from_probs``); for a
spread signal such as the predictive std of MC dropout or TTA, ``-std`` (lower spread = more
confident, ``confidence_from_spread``).

Risk-coverage curve (``risk_coverage``): for each distinct confidence value t, from high to low,
keep the pairs with confidence >= t. ``n_kept`` is their number, ``coverage = n_kept / n`` and
``risk`` their error rate. Pairs with equal confidence are kept or dropped together, so there
is one row per distinct confidence value and no subsampling. What is written and drawn keeps at
most ``CURVE_ROWS`` + 1 of those rows (``thin_curve``: the rows nearest to evenly spaced coverage
levels, the first and the last always kept); every number is computed from the full curve.

AURC (Geifman et al. 2019, "Bias-Reduced Uncertainty Estimation for Deep Neural Classifiers",
https://arxiv.org/abs/1805.08206): the mean selective risk over the coverage levels k / n,
k = 1..n, the pairs ranked by confidence from high to low,
``AURC = (1/n) * sum_k errors(k) / k``, where errors(k) counts the errors among the k most
confident pairs.

Ties: when the k-th pair falls inside a group of m pairs with equal confidence, the order inside
the group is arbitrary. errors(k) is taken as its expectation over a uniformly random order inside
the group, i.e. the errors before the group plus ``(k - k0) * e / m`` for the k - k0 pairs taken
from a group holding e errors. At the end of each group this equals the ``risk_coverage`` row
(errors are interpolated linearly in k between rows), so the AURC is computed from the curve
itself and does not depend on the order of the input. A constant confidence gives
AURC = risk at full coverage, the expected AURC of a random ranking.

Oracle AURC: the AURC of the ideal ranking, all correct pairs first. With c correct pairs out of
n, ``risk(k) = max(k - c, 0) / k`` and ``oracle_AURC = (1/n) * sum_{k=c+1..n} (k - c) / k``
(computed exactly; for large n it tends to ``r + (1 - r) * ln(1 - r)`` with r the error rate).
``e_aurc = aurc - oracle_aurc`` >= 0, the excess AURC.

Coverage at risk: for a target risk, the largest coverage of a ``risk_coverage`` row whose risk
is <= the target, with that row's threshold and risk; None when no row qualifies.

Undefined values (no known pair) are NaN from the float functions and None in the summary dict.
"""

import numpy as np
import pandas as pd
from scipy.special import digamma

from tools.calibration import decision_correct, none_if_nan
from tools.metrics import accumulate_rows, as_resamples, count_at_most, cumsum_rows, map_run_sums, run_numbers

CURVE_COLUMNS = ["coverage", "risk", "threshold", "n_kept"]
# Rows of a written curve: ChestX-ray14's test split has 1.5 million distinct confidences over its
# 14 labels, a 100 MB CSV per signal that no plot or script needs at that resolution.
CURVE_ROWS = 10_000
RISK_TARGETS = (0.01, 0.02, 0.05, 0.10)


# ====== confidence signals ======

def confidence_from_probs(probs):
    """Confidence of the decision at 0.5: ``max(p, 1 - p)``, in [0.5, 1]; NaN stays NaN."""
    probs = np.asarray(probs, dtype=float)
    return np.maximum(probs, 1.0 - probs)


def confidence_from_spread(std):
    """Confidence from a spread such as the predictive std: ``-std`` (lower spread ranks first)."""
    return -np.asarray(std, dtype=float)


def known_decisions(confidence, probs, y):
    """Flatten to the known pairs: ``(confidence, correct)`` 1-D arrays where ``y`` is not NaN.

    ``correct`` is ``(p >= 0.5) == y`` as bool; ``confidence``, ``probs`` and ``y`` share a shape.
    """
    confidence = np.asarray(confidence, dtype=float)
    probs = np.asarray(probs, dtype=float)
    y = np.asarray(y, dtype=float)
    if not confidence.shape == probs.shape == y.shape:
        raise ValueError(f"confidence {confidence.shape}, probs {probs.shape} and y {y.shape} "
                         "must have the same shape")
    known = ~np.isnan(y)
    if not np.all(np.isfinite(probs[known])):
        raise ValueError("probs holds a non-finite value on a known (image, label) pair")
    return confidence[known], decision_correct(probs[known], y[known]) == 1.0


def _check(confidence, correct):
    """1-D float confidence and bool correctness of equal length; NaN confidence is an error."""
    confidence = np.asarray(confidence, dtype=float).ravel()
    correct = np.asarray(correct).ravel()
    if confidence.shape != correct.shape:
        raise ValueError(f"{confidence.size} confidences for {correct.size} decisions")
    if np.any(np.isnan(confidence)):
        raise ValueError("confidence holds NaN: mask unknown pairs first (known_decisions)")
    if correct.dtype != bool:
        if not np.all(np.isin(correct, (0, 1))):
            raise ValueError("correct must hold booleans or 0/1")
        correct = correct.astype(bool)
    return confidence, correct


# ====== curves and areas ======

def tie_ends(sorted_confidence):
    """The last index of each run of equal values in a sorted confidence array (a tie group)."""
    return np.flatnonzero(np.append(sorted_confidence[1:] != sorted_confidence[:-1], True))


def risk_coverage(confidence, correct):
    """Full risk-coverage curve, one row per distinct confidence value, high to low.

    Columns ``coverage, risk, threshold, n_kept``: the row for threshold t keeps the ``n_kept``
    decisions with confidence >= t; ``coverage = n_kept / n`` and ``risk`` is the error rate of the
    kept decisions. Rows are in increasing coverage; the last row has coverage 1. Empty input gives
    an empty frame.
    """
    confidence, correct = _check(confidence, correct)
    n = confidence.size
    if n == 0:
        return pd.DataFrame({c: pd.Series(dtype=int if c == "n_kept" else float)
                             for c in CURVE_COLUMNS})
    order = np.argsort(-confidence)  # a tie group is one row, so the order inside it does not matter
    conf_sorted = confidence[order]
    cum_errors = np.cumsum(~correct[order])
    ends = tie_ends(conf_sorted)
    n_kept = ends + 1
    return pd.DataFrame({
        "coverage": n_kept / n,
        "risk": cum_errors[ends] / n_kept,
        "threshold": conf_sorted[ends],
        "n_kept": n_kept,
    })[CURVE_COLUMNS]


def thin_curve(curve, rows: int = CURVE_ROWS):
    """The rows of a ``risk_coverage`` frame nearest to ``rows + 1`` evenly spaced coverage levels
    (duplicates dropped; the first and last rows always kept), or the frame itself when it is no
    longer than that. Each kept row is exact: nothing is interpolated."""
    if len(curve) <= rows + 1:
        return curve
    coverage = curve["coverage"].to_numpy(dtype=float)
    levels = np.linspace(coverage[0], coverage[-1], rows + 1)
    right = np.clip(np.searchsorted(coverage, levels), 1, len(coverage) - 1)
    nearer_left = (levels - coverage[right - 1]) <= (coverage[right] - levels)
    keep = np.unique(np.concatenate(([0], np.where(nearer_left, right - 1, right), [len(coverage) - 1])))
    return curve.iloc[keep].reset_index(drop=True)


def aurc_from_curve(curve):
    """AURC from a ``risk_coverage`` frame: ``(1/n) * sum_{k=1..n} errors(k) / k``.

    errors(k) is exact at each row and linear in k between rows (the expectation over random
    orders inside a tie group, see the module docstring). NaN for an empty curve.
    """
    if len(curve) == 0:
        return float("nan")
    n_kept = curve["n_kept"].to_numpy(dtype=float)
    errors = np.rint(curve["risk"].to_numpy(dtype=float) * n_kept)
    n = int(n_kept[-1])
    k = np.arange(1, n + 1, dtype=float)
    errors_k = np.interp(k, np.concatenate(([0.0], n_kept)), np.concatenate(([0.0], errors)))
    return float(np.mean(errors_k / k))


def aurc(confidence, correct):
    """Area under the risk-coverage curve: the mean selective risk over coverages k/n, k = 1..n.

    Decisions ranked by confidence high to low, ties handled as the expectation over random
    orders inside a tie group (Geifman et al. 2019, https://arxiv.org/abs/1805.08206). NaN if
    there is no decision.
    """
    return aurc_from_curve(risk_coverage(confidence, correct))


def same_ranking(a, b) -> bool:
    """True when confidences ``a`` and ``b`` (1-D, for the same decisions) rank the decisions
    alike: one order sorts both, with the same ties. Their risk-coverage curves are then the same
    on the data and on every resample (a temperature keeps the order of the probabilities, unless
    rounding makes or breaks a tie)."""
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if a.shape != b.shape:
        return False
    order = np.argsort(-a)
    sa, sb = a[order], b[order]
    return bool(np.all(sb[1:] <= sb[:-1]) and np.array_equal(sa[1:] == sa[:-1], sb[1:] == sb[:-1]))


def oracle_curve(correct):
    """Risk-coverage curve of the ideal ranking (all correct decisions first), one row per k.

    ``risk = max(k - c, 0) / k`` with c the number of correct decisions; ``threshold`` is NaN, as
    no confidence value produces this ranking.
    """
    _, correct = _check(np.zeros(np.size(correct)), correct)
    n, c = correct.size, int(correct.sum())
    k = np.arange(1, n + 1)
    return pd.DataFrame({
        "coverage": k / n if n else k.astype(float),
        "risk": np.maximum(k - c, 0) / k,
        "threshold": np.full(n, np.nan),
        "n_kept": k,
    })[CURVE_COLUMNS]


def oracle_aurc(correct):
    """AURC of the ideal ranking: ``(1/n) * sum_{k=c+1..n} (k - c) / k``, c correct out of n.

    The lowest AURC any confidence signal can reach with these decisions; NaN if n = 0.
    """
    _, correct = _check(np.zeros(np.size(correct)), correct)
    n, c = correct.size, int(correct.sum())
    if n == 0:
        return float("nan")
    k = np.arange(c + 1, n + 1, dtype=float)
    return float(np.sum((k - c) / k) / n)


def coverage_at_risk(curve, target):
    """The row of ``curve`` with the largest coverage whose risk <= ``target``.

    Returns ``{"coverage", "threshold", "risk"}`` as floats, all None when no row qualifies.
    """
    ok = curve[curve["risk"] <= target]
    if len(ok) == 0:
        return {"coverage": None, "threshold": None, "risk": None}
    row = ok.loc[ok["coverage"].idxmax()]
    return {"coverage": float(row["coverage"]), "threshold": float(row["threshold"]),
            "risk": float(row["risk"])}


def _target_key(target):
    """JSON key of a risk target: two decimals ("0.10"), more when two would lose digits."""
    key = f"{target:.2f}"
    return key if float(key) == target else repr(float(target))


def selective_summary(confidence, correct, targets=RISK_TARGETS):
    """AURC, excess AURC, oracle AURC, full-coverage risk, n and coverage at each target risk.

    ``{"aurc", "e_aurc", "oracle_aurc", "risk_at_full_coverage", "n",
    "coverage_at_risk": {"0.01": {"coverage", "threshold", "risk"}, ...}}``; undefined
    values (no decision) are None.
    """
    confidence, correct = _check(confidence, correct)
    return summary_of_curve(risk_coverage(confidence, correct), correct, targets)


def summary_of_curve(curve, correct, targets=RISK_TARGETS):
    """:func:`selective_summary` from the curve :func:`risk_coverage` already drew for ``correct``."""
    _, correct = _check(np.zeros(np.size(correct)), correct)
    area, oracle = aurc_from_curve(curve), oracle_aurc(correct)
    full_risk = float(curve["risk"].iloc[-1]) if len(curve) else float("nan")
    return {
        "aurc": none_if_nan(area),
        "e_aurc": none_if_nan(area - oracle),
        "oracle_aurc": none_if_nan(oracle),
        "risk_at_full_coverage": none_if_nan(full_risk),
        "n": int(correct.size),
        "coverage_at_risk": {_target_key(t): coverage_at_risk(curve, t) for t in targets},
    }


# ====== intervals ======

def _harmonic(x):
    """H(x) = sum_{i=1..x} 1/i, extended to real x >= 0 through the digamma function."""
    return digamma(np.asarray(x, dtype=float) + 1.0) + np.euler_gamma


def selective_resamples(confidence, correct, rows, weights, targets=RISK_TARGETS, chunk_pairs=1 << 23) -> dict:
    """AURC, E-AURC and coverage at each target risk on every bootstrap resample.

    ``confidence`` / ``correct``: the known decisions (1-D, as :func:`known_decisions` gives);
    ``rows``: the row (image) of each decision; ``weights``: the resamples of the N rows
    (:class:`tools.metrics.Resamples`, or multiplicities (B, N)), so a drawn image brings all its
    decisions; ``chunk_pairs`` bounds the work arrays (tie groups x resamples).

    One sort serves every resample. With the mass K0 kept before a tie group, E0 errors before it,
    and a group of mass m holding e errors, the group adds ``E0 (H(K0 + m) - H(K0)) + (e / m) (m -
    K0 (H(K0 + m) - H(K0)))`` to ``N * AURC`` (H the harmonic number): the module's tie rule summed
    in closed form, equal to :func:`aurc` on every resample. Summed over groups, the first terms
    telescope, so only the groups holding an error count: ``e (H(N) - H(K) + 1 - K0 (H(K) -
    H(K0)) / m)`` with K = K0 + m. The largest coverage within a target risk is reached just before
    a group holding an error, or at full coverage. The masses come from one sparse product of the
    runs between those groups with the resamples' counts. Returns {"aurc", "e_aurc": (B,),
    "coverage_at_risk": {key: (B,) with NaN where no coverage qualifies}}."""
    confidence, correct = _check(confidence, correct)
    rows = np.asarray(rows)
    res = as_resamples(weights)  # resamples of the N rows the decisions come from
    keys = [_target_key(t) for t in targets]
    if confidence.size == 0:
        nan = np.full(res.n_boot, np.nan)
        return {"aurc": nan, "e_aurc": nan.copy(), "coverage_at_risk": {k: nan.copy() for k in keys}}
    order = np.argsort(-confidence)  # ties form one group, so their order does not matter
    conf_sorted, wrong = confidence[order], ~correct[order]
    group = run_numbers(conf_sorted)[0] - 1  # tie group of each decision, from 0
    has_error = np.zeros(group[-1] + 1, bool)
    has_error[group[wrong]] = True
    before = np.cumsum(has_error) - has_error  # groups holding an error strictly before each group
    n_err = int(has_error.sum())
    # runs of mass: the decisions between two groups holding an error, and each such group
    mass_run, run_keys = run_numbers(2 * before[group] + has_error[group])
    n_mass = len(run_keys) + 1  # run 0 stays empty: cumulative sums start at 0
    through = np.searchsorted(run_keys, 2 * np.arange(n_err) + 1, side="right")
    start = np.searchsorted(run_keys, 2 * np.arange(n_err), side="right")
    runs = np.concatenate([mass_run, n_mass + 1 + before[group[wrong]]])
    item_rows = np.concatenate([rows[order], rows[order][wrong]])
    per_row = int(np.bincount(rows).max())
    harmonic = _harmonic
    if res.exact_dtype(per_row) == np.float32:  # integer masses: H read from a table
        table = _harmonic(np.arange(int(res.max_row_mass() * per_row) + 2))

        def harmonic(x):
            return table[np.asarray(x).astype(np.int32)]
    parts = map_run_sums(lambda sums: _selective_chunk(sums, n_mass, start, through, targets, harmonic),
                         res, runs, n_mass + n_err + 1, item_rows, per_row, chunk_pairs)
    out = {"aurc": np.concatenate([p[0] for p in parts]), "e_aurc": np.concatenate([p[1] for p in parts])}
    out["coverage_at_risk"] = {k: np.concatenate([p[2][i] for p in parts]) for i, k in enumerate(keys)}
    return out


def _selective_chunk(sums, n_mass, start, through, targets, harmonic):
    """(AURC, E-AURC, [coverage per target]) from the runs' sums (runs, B) of one chunk;
    ``harmonic``: H of an array."""
    mass, errors = sums[:n_mass], sums[n_mass:]
    err = errors[1:].astype(np.float64)  # the errors of each group holding one
    cumsum_rows(mass)
    cumsum_rows(errors)
    total, wrong = mass[-1].astype(np.float64), errors[-1].astype(np.float64)
    kept0, kept, errors0 = mass[start], mass[through], errors[:-1]
    size = kept - kept0
    h_total = harmonic(total)
    with np.errstate(invalid="ignore", divide="ignore"):
        # K0 (H(K) - H(K0)) / m, 0 for a group of no mass
        h_kept = harmonic(kept)
        inside = h_kept - harmonic(kept0)
        inside *= kept0
        np.divide(inside, size, out=inside, where=size > 0)
        terms = h_total - h_kept + 1 - inside
        area = np.einsum("kb,kb->b", err, terms) / total
        right = total - wrong
        oracle = ((total - right) - right * (h_total - harmonic(right))) / total
        # the largest coverage within a target risk: just before a group holding an error (the
        # kept mass rises with the group), or all decisions. The last such point within a risk is
        # where the smallest risk from there on is within it: a count, as that minimum rises.
        risk = np.divide(errors0, kept0, out=np.full(kept0.shape, np.inf), where=kept0 > 0, dtype=np.float64)
        lowest_after = accumulate_rows(np.ascontiguousarray(risk[::-1]), np.minimum)[::-1]
        columns = np.arange(sums.shape[1])
        cover = []
        for t in targets:
            last = count_at_most(lowest_after, np.full(len(columns), t)) - 1
            best = np.where(last >= 0, kept0[np.maximum(last, 0), columns] / total, np.nan)
            cover.append(np.where(wrong / total <= t, total / total, best))
    return area, area - oracle, cover
