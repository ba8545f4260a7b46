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
is one row per distinct confidence value and no subsampling.

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

CURVE_COLUMNS = ["coverage", "risk", "threshold", "n_kept"]
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
    order = np.argsort(-confidence, kind="stable")
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


def selective_resamples(confidence, correct, rows, weights, targets=RISK_TARGETS, chunk_pairs=4_000_000) -> dict:
    """AURC, E-AURC and coverage at each target risk on every bootstrap resample.

    ``confidence`` / ``correct``: the known decisions (1-D, as :func:`known_decisions` gives);
    ``rows``: the row (image) of each decision; ``weights`` (B, N rows): resample multiplicities,
    so a drawn image brings all its decisions. One sort serves every resample: with the mass
    K0 kept before a tie group, E0 errors in it, and a group of mass m holding e errors, the
    group adds ``E0 (H(K0 + m) - H(K0)) + (e / m) (m - K0 (H(K0 + m) - H(K0)))`` to ``N * AURC``
    (H the harmonic number): the module's tie rule summed in closed form, equal to
    :func:`aurc` on every resample. Returns {"aurc", "e_aurc": (B,), "coverage_at_risk":
    {key: (B,) with NaN where no coverage qualifies}}."""
    confidence, correct = _check(confidence, correct)
    order = np.argsort(-confidence, kind="stable")
    conf_sorted, err_sorted = confidence[order], (~correct[order]).astype(float)
    ends = tie_ends(conf_sorted)
    rows_sorted = np.asarray(rows)[order]
    w_all = np.asarray(weights, dtype=float)
    out = {"aurc": [], "e_aurc": [], "coverage_at_risk": {_target_key(t): [] for t in targets}}
    step = max(1, chunk_pairs // max(1, len(order)))
    for start in range(0, len(w_all), step):
        w = w_all[start:start + step][:, rows_sorted]
        kept = np.cumsum(w, axis=1)[:, ends]
        errors = np.cumsum(w * err_sorted, axis=1)[:, ends]
        kept0 = np.concatenate([np.zeros((len(w), 1)), kept[:, :-1]], axis=1)
        errors0 = np.concatenate([np.zeros((len(w), 1)), errors[:, :-1]], axis=1)
        mass, err = kept - kept0, errors - errors0
        dh = _harmonic(kept) - _harmonic(kept0)
        with np.errstate(invalid="ignore", divide="ignore"):
            inside = np.where(mass > 0, err / np.where(mass > 0, mass, 1) * (mass - kept0 * dh), 0.0)
            total, wrong = kept[:, -1], errors[:, -1]
            area = (errors0 * dh + inside).sum(1) / total
            right = total - wrong
            oracle = ((total - right) - right * (_harmonic(total) - _harmonic(right))) / total
            risk = errors / np.where(kept > 0, kept, 1)
        out["aurc"].append(area)
        out["e_aurc"].append(area - oracle)
        for t in targets:
            ok = (risk <= t) & (kept > 0)
            cover = np.where(ok, kept, -np.inf).max(1) / total
            out["coverage_at_risk"][_target_key(t)].append(np.where(ok.any(1), cover, np.nan))
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0)  # noqa: E731
    return {"aurc": cat(out["aurc"]), "e_aurc": cat(out["e_aurc"]),
            "coverage_at_risk": {k: cat(v) for k, v in out["coverage_at_risk"].items()}}
