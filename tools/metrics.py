"""The metrics module: one implementation of every number the suite reports about discrimination.

Binary metrics per label, computed on the rows whose label is known (NaN = unknown, masked):

- ``auroc``: area under the ROC curve (trapezoids through every operating point); equals
  ``sklearn.metrics.roc_auc_score``.
- ``auprc``: average precision, sum over thresholds of (R_k - R_{k-1}) * P_k, no interpolation;
  equals ``sklearn.metrics.average_precision_score``.
- ``f1@0.5``: F1 of the decision ``p >= 0.5``; undefined when there is no positive and none predicted.
- ``sens@95spec``: the largest sensitivity over ROC operating points with specificity >= 0.95
  (all points, as ``sklearn.metrics.roc_curve(drop_intermediate=False)``).

AUROC, AUPRC and sensitivity are undefined (NaN, written as JSON null) for a label with one class
only. Macro = mean over labels whose metric is defined; micro = all known (image, label) pairs pooled.

Everything accepts row weights. A bootstrap resample is a vector of multiplicities, so each
resample reuses the one sort per label and the bootstrap is vectorised over resamples: 1,000
patient-level resamples of every metric cost about as much as a few sklearn calls.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from tools.stats import MIN_BOOT, SCORE_METRICS, bootstrap_p, hull, score_interval

METRICS = ("auroc", "auprc", "f1@0.5", "sens@95spec")
# 0.01, 0.02, ..., 0.99: integer / 100 is the correctly rounded double, so 0.5 is exactly 0.5.
THRESHOLDS = np.arange(1, 100) / 100.0
REFERENCE_THRESHOLD = 0.5
_SPEC_TOL = 1e-12


def sigmoid(x) -> np.ndarray:
    """Logistic function ``1 / (1 + exp(-x))`` without overflow for large |x|; NaN stays NaN."""
    x = np.asarray(x, dtype=float)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _sorted_curve_inputs(y: np.ndarray, p: np.ndarray):
    """Sort by score descending; return y sorted, the order, and the last index of each tie group."""
    order = np.argsort(-p, kind="mergesort")
    ps = p[order]
    ends = np.r_[np.flatnonzero(np.diff(ps)), len(ps) - 1] if len(ps) else np.array([], int)
    return y[order], order, ends


def binary_metrics_weighted(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """All four metrics of one label for each weight vector in ``w`` (shape (B, n) or (n,)).

    ``y`` in {0, 1} and ``p`` finite, both (n,), rows with unknown labels already removed.
    Returns {metric: array (B,) or scalar}; undefined values are NaN.
    """
    w = np.asarray(w, float)
    squeeze = w.ndim == 1
    w = np.atleast_2d(w)
    y = np.asarray(y, float)
    p = np.asarray(p, float)
    if len(y) == 0:
        out = {m: np.full(len(w), np.nan) for m in METRICS}
        return {m: v[0] for m, v in out.items()} if squeeze else out
    ys, order, ends = _sorted_curve_inputs(y, p)
    ws = w[:, order]
    tp = np.cumsum(ws * ys, axis=1)[:, ends]
    fp = np.cumsum(ws * (1 - ys), axis=1)[:, ends]
    n_pos, n_neg = tp[:, -1:], fp[:, -1:]
    defined = (n_pos[:, 0] > 0) & (n_neg[:, 0] > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.concatenate([np.zeros((len(w), 1)), tp / n_pos], axis=1)
        fpr = np.concatenate([np.zeros((len(w), 1)), fp / n_neg], axis=1)
        auroc = np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2, axis=1)
        precision = np.where(tp + fp > 0, tp / np.where(tp + fp > 0, tp + fp, 1), 0.0)
        auprc = np.sum(np.diff(tpr, axis=1) * precision, axis=1)
        sens = np.max(np.where(fpr <= 0.05 + _SPEC_TOL, tpr, -np.inf), axis=1)
        pred = p >= 0.5
        tp5 = (w * (y * pred)).sum(1)
        fp5 = (w * ((1 - y) * pred)).sum(1)
        fn5 = (w * (y * ~pred)).sum(1)
        denom = 2 * tp5 + fp5 + fn5
        f1 = np.where(denom > 0, 2 * tp5 / np.where(denom > 0, denom, 1), np.nan)
    out = {
        "auroc": np.where(defined, auroc, np.nan),
        "auprc": np.where(defined, auprc, np.nan),
        "f1@0.5": f1,
        "sens@95spec": np.where(defined, sens, np.nan),
    }
    return {m: v[0] for m, v in out.items()} if squeeze else out


def binary_metrics(y, p) -> dict[str, float]:
    """The four metrics of one label, unweighted, unknown (NaN) labels masked."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    known = ~np.isnan(y)
    res = binary_metrics_weighted(y[known], p[known], np.ones(int(known.sum())))
    return {m: float(v) for m, v in res.items()}


def _label_stats(y: np.ndarray) -> dict:
    known = ~np.isnan(y)
    n, n_pos = int(known.sum()), int(np.nansum(y))
    return {"n": n, "n_pos": n_pos, "prevalence": n_pos / n if n else float("nan")}


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    """Mean over the last axis ignoring NaN; NaN where every entry is NaN (no warning)."""
    count = np.sum(~np.isnan(values), axis=-1)
    total = np.nansum(values, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _all_metrics_weighted(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> dict:
    """{"per_class": [ {metric: (B,)} per label ], "macro": {...}, "micro": {...}} for weights (B, n).

    Resamples are processed in chunks so memory stays bounded on large test sets."""
    step = max(1, int(4e6 // max(1, y.size)))
    if len(w) <= step:
        return _all_metrics_chunk(y, p, w)
    parts = [_all_metrics_chunk(y, p, w[i:i + step]) for i in range(0, len(w), step)]
    cat = lambda get: {m: np.concatenate([get(r)[m] for r in parts]) for m in METRICS}  # noqa: E731
    return {"per_class": [cat(lambda r, j=j: r["per_class"][j]) for j in range(y.shape[1])],
            "macro": cat(lambda r: r["macro"]), "micro": cat(lambda r: r["micro"])}


def _all_metrics_chunk(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> dict:
    per_class = []
    for j in range(y.shape[1]):
        known = ~np.isnan(y[:, j])
        per_class.append(binary_metrics_weighted(y[known, j], p[known, j], w[:, known]))
    macro = {m: _nanmean_rows(np.stack([pc[m] for pc in per_class], axis=-1)) for m in METRICS}
    known = ~np.isnan(y)
    rows = np.nonzero(known)[0]
    micro = binary_metrics_weighted(y[known], p[known], w[:, rows])
    return {"per_class": per_class, "macro": macro, "micro": micro}


def scores(y, p, weights=None) -> dict:
    """Every metric of probabilities ``p`` (N, L) for labels ``y`` (N, L; NaN unknown): ``point``
    on the rows as given and, when ``weights`` (B, N) are given, ``boot`` on each resample (else
    None). The expensive part of every report and comparison, so each is computed once and reused
    (one clean pass's scores serve every corrupted pass compared with it)."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    return {"point": _all_metrics_weighted(y, p, np.ones((1, len(y)))),
            "boot": None if weights is None else _all_metrics_weighted(y, p, weights)}


def metrics_from_scores(y, s: dict, labels, split=None) -> dict:
    """SPEC metrics schema from :func:`scores` of labels ``y``; with resamples, 95% intervals
    (``ci95``) too."""
    y = np.asarray(y, float)
    scalar = lambda d: {m: float(d[m][0]) for m in METRICS}  # noqa: E731
    per_class = {}
    for j, label in enumerate(labels):
        per_class[label] = {**scalar(s["point"]["per_class"][j]), **_label_stats(y[:, j])}
    metrics = {"split": split, "n": int(len(y)), "labels": list(labels),
               "macro": scalar(s["point"]["macro"]), "micro": scalar(s["point"]["micro"]), "per_class": per_class}
    return metrics if s["boot"] is None else _attach_ci(metrics, s["boot"], labels)


def compute_metrics(y, p, labels, split=None) -> dict:
    """SPEC metrics schema for labels ``y`` (N, L; NaN unknown) and probabilities ``p`` (N, L)."""
    return metrics_from_scores(y, scores(y, p), labels, split)


# ====== bootstrap ======

def bootstrap_weights(clusters, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) row multiplicities of a cluster bootstrap: clusters (patients) are drawn with
    replacement and every row of a drawn cluster comes along (pass ``np.arange(n)`` for rows)."""
    rng = np.random.default_rng(seed)
    codes = np.unique(np.asarray(clusters).astype(str), return_inverse=True)[1].ravel()
    k = int(codes.max()) + 1 if len(codes) else 0
    if k == 0:
        return np.zeros((n_boot, 0), np.float32)
    draws = rng.multinomial(k, np.full(k, 1.0 / k), size=n_boot)
    return draws[:, codes].astype(np.float32)


def percentile_ci(values: np.ndarray) -> list | None:
    """95% percentile interval of the finite bootstrap ``values`` (None with fewer than 10)."""
    values = values[~np.isnan(values)]
    if len(values) < MIN_BOOT:
        return None
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def honest_ci(metric: str, boot, value, n_pos: int, n: int) -> list | None:
    """The 95% interval the suite reports for one label's metric: the hull of the percentile
    bootstrap and, for AUROC and sensitivity, the score interval (``tools.stats``), which stays
    an interval where the bootstrap collapses to a point (an AUROC of 1.0)."""
    ci = percentile_ci(boot)
    if metric not in SCORE_METRICS or not np.isfinite(value):
        return ci
    lo, hi = score_interval(metric, value, n_pos, n - n_pos)
    return hull(ci, [float(lo), float(hi)])


def _attach_ci(metrics: dict, boot: dict, labels) -> dict:
    metrics["micro"]["ci95"] = {m: percentile_ci(boot["micro"][m]) for m in METRICS}
    for j, label in enumerate(labels):
        block = metrics["per_class"][label]
        block["ci95"] = {m: honest_ci(m, boot["per_class"][j][m], block[m], block["n_pos"], block["n"])
                         for m in METRICS}
    # macro: the hull of its bootstrap interval and the mean of the per-label ends, so a macro
    # average at a boundary is not a point either
    metrics["macro"]["ci95"] = {}
    for m in METRICS:
        ends = [metrics["per_class"][lbl]["ci95"][m] for lbl in labels]
        mean_ends = [float(np.mean([e[0] for e in ends])), float(np.mean([e[1] for e in ends]))] \
            if all(e is not None for e in ends) and m in SCORE_METRICS else None
        metrics["macro"]["ci95"][m] = hull(percentile_ci(boot["macro"][m]), mean_ends)
    return metrics


def metrics_with_ci(y, p, labels, clusters=None, n_boot=1000, seed=0, split=None) -> dict:
    """:func:`compute_metrics` plus 95% percentile bootstrap intervals (``ci95``) resampling
    ``clusters`` (patient ids; rows when None)."""
    weights = None
    if n_boot > 0:
        weights = bootstrap_weights(np.arange(len(y)) if clusters is None else clusters, n_boot, seed)
    return metrics_from_scores(y, scores(y, p, weights), labels, split)


def difference(a: dict, b: dict, labels) -> dict:
    """Metrics of :func:`scores` ``a`` minus those of ``b``, macro and per class, with 95%
    intervals when both hold resamples drawn together (the same patients on both sides, so the
    interval is for the difference itself: a group against the rest, a corrupted pass against
    the clean one on the same rows), and then the bootstrap p-value of "no difference"
    (``p_value``)."""
    boot = a["boot"] is not None and b["boot"] is not None

    def block(get):
        out = {m: float(get(a["point"])[m][0] - get(b["point"])[m][0]) for m in METRICS}
        if boot:
            diffs = {m: get(a["boot"])[m] - get(b["boot"])[m] for m in METRICS}
            out["ci95"] = {m: percentile_ci(diffs[m]) for m in METRICS}
            out["p_value"] = {m: bootstrap_p(out[m], diffs[m]) for m in METRICS}
        return out

    return {"macro": block(lambda r: r["macro"]),
            "per_class": {label: block(lambda r, j=j: r["per_class"][j]) for j, label in enumerate(labels)}}


# ====== decisions across thresholds ======

def threshold_sweep(y: np.ndarray, p: np.ndarray, labels, thresholds=THRESHOLDS) -> pd.DataFrame:
    """Confusion counts and rates of the decision ``p >= t`` for every threshold t, per label, on
    the rows whose label is known. Sensitivity = tp/(tp+fn), specificity = tn/(tn+fp), precision
    = tp/(tp+fp), F1 = 2tp/(2tp+fp+fn); each NaN when its denominator is 0.

    Vectorised over thresholds: with the scores of each class sorted, the count of scores >= t is
    the class size minus ``searchsorted(sorted, t, side="left")``."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    t = np.asarray(thresholds, float)
    frames = []
    for j, label in enumerate(labels):
        known = ~np.isnan(y[:, j])
        pos, neg = np.sort(p[known & (y[:, j] == 1), j]), np.sort(p[known & (y[:, j] == 0), j])
        tp = len(pos) - np.searchsorted(pos, t, side="left")
        fp = len(neg) - np.searchsorted(neg, t, side="left")
        fn, tn = len(pos) - tp, len(neg) - fp
        frames.append(pd.DataFrame({"label": label, "threshold": t, "tp": tp, "fp": fp, "tn": tn, "fn": fn,
                                    "sensitivity": _ratio(tp, tp + fn), "specificity": _ratio(tn, tn + fp),
                                    "precision": _ratio(tp, tp + fp), "f1": _ratio(2 * tp, 2 * tp + fp + fn)}))
    return pd.concat(frames, ignore_index=True)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, float), np.asarray(den, float)
    return np.divide(num, den, out=np.full(num.shape, np.nan), where=den > 0)


def best_thresholds(sweep: pd.DataFrame, reference: float = REFERENCE_THRESHOLD) -> list[dict]:
    """Per label: the threshold of the highest F1 (the lowest such threshold on ties; None when F1
    is undefined everywhere) with its F1, sensitivity and specificity, and the same at ``reference``."""
    out = []
    for label, block in sweep.groupby("label", sort=False):
        f1 = block["f1"].to_numpy()
        best = block.iloc[int(np.nanargmax(f1))] if np.isfinite(f1).any() else None
        ref = block[np.isclose(block["threshold"], reference)]
        ref = ref.iloc[0] if len(ref) else None
        pick = lambda r, k: None if r is None else float(r[k])  # noqa: E731
        first = block.iloc[0]  # every row holds the same known rows, split differently
        out.append({"label": label, "n": int(first[["tp", "fp", "tn", "fn"]].sum()),
                    "n_pos": int(first["tp"] + first["fn"]),
                    "best_threshold": pick(best, "threshold"), "best_f1": pick(best, "f1"),
                    "best_sensitivity": pick(best, "sensitivity"), "best_specificity": pick(best, "specificity"),
                    "ref_f1": pick(ref, "f1"), "ref_sensitivity": pick(ref, "sensitivity"),
                    "ref_specificity": pick(ref, "specificity")})
    return out
