"""Model A against model B on the same rows: every metric's difference B - A with a paired
patient bootstrap interval and p-value, overall, per label and per subgroup.

Both models are scored on ONE set of patient-level resamples, so each resample gives a paired
difference and the interval is for the difference itself (much narrower than two separate
intervals would suggest when the models agree on most films). The p-value is two-sided, from the
bootstrap standard error of the difference (a Wald test on the bootstrap SE):

    p = 2 (1 - Phi(|diff| / SE_boot))

It is continuous, unlike a count of resamples beyond the null, whose floor 1 / (B + 1) would keep
every row of a large table above the corrected level. Many rows are tested at once, so
``p_holm`` holds Holm's step-down adjustment over the whole table (Holm 1979), which controls
the family-wise error.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from tools.metrics import METRICS, bootstrap_weights, percentile_ci, scores
from tools.slicing import group_values
from tools.stats import bootstrap_p

COLUMNS = ["scope", "group_col", "group", "label", "metric", "a", "b", "diff",
           "ci_low", "ci_high", "p_value", "p_holm"]


# ====== multiple testing ======

def holm(p_values) -> np.ndarray:
    """Holm step-down adjusted p-values: with the m non-NaN p sorted ascending, the k-th
    (1-based) becomes max over i <= k of min(1, (m - i + 1) p_(i)). NaN stays NaN."""
    p = np.asarray(p_values, float)
    out = np.full(p.shape, np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    order = tested[np.argsort(p[tested], kind="mergesort")]
    m = len(order)
    out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return out


# ====== one paired difference ======

def _paired_test(diff: float, diff_boot: np.ndarray | None) -> dict:
    """Interval and two-sided p-value of a point difference ``diff`` from its paired bootstrap
    differences ``diff_boot`` (NaN entries are resamples where a side is undefined). Without
    resamples, or with fewer than 10 finite ones, no interval and no p-value; ``diff == 0``
    exactly (identical predictions) gives p = 1."""
    if diff_boot is None or np.isnan(diff):
        return {"ci_low": np.nan, "ci_high": np.nan, "p_value": np.nan}
    ci = percentile_ci(diff_boot)
    low, high = ci if ci is not None else (np.nan, np.nan)
    if diff == 0:
        return {"ci_low": low, "ci_high": high, "p_value": 1.0}
    if ci is None:
        return {"ci_low": np.nan, "ci_high": np.nan, "p_value": np.nan}
    return {"ci_low": low, "ci_high": high, "p_value": bootstrap_p(diff, diff_boot)}


# ====== the comparison table ======

def _rows(sa: dict, sb: dict, labels, group_col: str = "", group: str = "") -> list[dict]:
    """Label rows then macro rows of :func:`scores` ``sa`` (model A) and ``sb`` (model B), of all
    rows (no ``group_col``) or of one group."""
    parts = [(lbl, lambda r, j=j: r["per_class"][j]) for j, lbl in enumerate(labels)]
    parts.append(("macro", lambda r: r["macro"]))
    rows = []
    for name, get in parts:
        for m in METRICS:
            a, b = float(get(sa["point"])[m][0]), float(get(sb["point"])[m][0])
            diff_boot = None if sa["boot"] is None else get(sb["boot"])[m] - get(sa["boot"])[m]
            scope = "group" if group_col else ("macro" if name == "macro" else "label")
            rows.append({"scope": scope, "group_col": group_col, "group": group, "label": name, "metric": m,
                         "a": a, "b": b, "diff": b - a, **_paired_test(b - a, diff_boot)})
    return rows


def _check_inputs(y: np.ndarray, prob_a: np.ndarray, prob_b: np.ndarray, labels, clusters, df, group_cols):
    if prob_a.shape != y.shape or prob_b.shape != y.shape:
        raise ValueError(f"prob_a {prob_a.shape}, prob_b {prob_b.shape} and y {y.shape} must have one shape")
    if y.ndim != 2 or y.shape[1] != len(labels):
        raise ValueError(f"y has shape {y.shape} for {len(labels)} labels")
    if len(clusters) != len(y):
        raise ValueError(f"{len(clusters)} cluster ids for {len(y)} rows")
    if group_cols and (df is None or len(df) != len(y)):
        raise ValueError("group_cols need a table df with one row per row of y")
    missing = [c for c in group_cols if c not in df] if group_cols else []
    if missing:
        raise ValueError(f"group columns not in the table: {missing}")


def compare_table(y, prob_a, prob_b, labels, clusters, df=None, group_cols=(), n_boot=1000,
                  seed=0) -> pd.DataFrame:
    """The comparison table (columns :data:`COLUMNS`) of model A (``prob_a``) and model B
    (``prob_b``), both (N, L), on labels ``y`` (N, L; NaN unknown); ``diff`` = B - A.

    Rows: per label and metric (scope "label"), the macro average per metric (scope "macro"),
    then the same for every group of each column of ``group_cols`` in ``df`` (scope "group";
    groups as :func:`tools.slicing.group_values` forms them). Intervals and p-values resample
    ``clusters`` (patient ids), ``n_boot`` times; ``n_boot=0`` gives point values only."""
    y, prob_a, prob_b = (np.asarray(v, float) for v in (y, prob_a, prob_b))
    _check_inputs(y, prob_a, prob_b, labels, clusters, df, group_cols)
    weights = bootstrap_weights(clusters, n_boot, seed) if n_boot > 0 else None

    def pair(mask):  # both models' scores on the same rows and the same resamples
        w = None if weights is None else weights[:, mask]
        return scores(y[mask], prob_a[mask], w), scores(y[mask], prob_b[mask], w)

    rows = _rows(*pair(np.ones(len(y), bool)), labels)
    for col in group_cols:
        values, _ = group_values(df[col])
        for value in sorted(pd.unique(values), key=str):
            rows += _rows(*pair(values == value), labels, col, str(value))
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["p_holm"] = holm(table["p_value"].to_numpy())
    return table


# ====== decisions ======

def decision_changes(y, prob_a, prob_b, labels, threshold: float = 0.5) -> dict:
    """How many known (image, label) decisions ``p >= threshold`` differ between A and B:
    ``fixed`` = changed and B right, ``broken`` = changed and A right (a changed binary decision
    is right on exactly one side), overall and per label."""
    y, prob_a, prob_b = (np.asarray(v, float) for v in (y, prob_a, prob_b))
    known = ~np.isnan(y)
    truth = y == 1
    dec_a, dec_b = prob_a >= threshold, prob_b >= threshold
    changed = known & (dec_a != dec_b)
    fixed = changed & (dec_b == truth)
    broken = changed & (dec_a == truth)
    pairs = int(known.sum())
    per_label = {lbl: {"pairs": int(known[:, j].sum()), "changed": int(changed[:, j].sum()),
                       "fixed": int(fixed[:, j].sum()), "broken": int(broken[:, j].sum())}
                 for j, lbl in enumerate(labels)}
    return {"pairs": pairs, "changed": int(changed.sum()), "fixed": int(fixed.sum()),
            "broken": int(broken.sum()), "changed_share": float(changed.sum() / pairs) if pairs else float("nan"),
            "per_label": per_label}
