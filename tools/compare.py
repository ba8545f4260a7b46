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

One model on two data sets (:func:`internal_vs_external`, valtool ``--internal``): its metrics on
its own test split (internal) and on new data (external) come from independent samples, so the
interval of the difference external - internal combines the two sides' 95% intervals by MOVER
(``tools.stats.mover``; Newcombe 1998, Zou and Donner 2008). A side without an interval (eval run
with ``--bootstrap 0``) gets the score interval for AUROC and sensitivity, none for the others.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from tools.metrics import METRICS, bootstrap_resamples, percentile_ci, scores
from tools.slicing import group_values
from tools.stats import bootstrap_p, mover, score_interval
from tools.table import find_name

COLUMNS = ["scope", "group_col", "group", "label", "metric", "a", "b", "diff",
           "ci_low", "ci_high", "p_value", "p_holm"]
KEEP_MARGIN = 0.05  # external - internal: a drop of the verdict metric within this is "kept"
VERDICT_METRIC = "auroc"


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
    weights = bootstrap_resamples(clusters, n_boot, seed) if n_boot > 0 else None

    def pair(mask):  # both models' scores on the same rows and the same resamples
        w = None if weights is None else weights.rows(mask)
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


# ====== one model, two data sets ======

def _side(block: dict, metric: str) -> tuple[float, float, float]:
    """(value, low, high) of one label's ``metric`` in a metrics-schema block; NaN where absent."""
    value = block.get(metric)
    value = np.nan if value is None else float(value)
    ci = (block.get("ci95") or {}).get(metric)
    if ci is not None and None not in ci:
        return value, float(ci[0]), float(ci[1])
    n, n_pos = block.get("n"), block.get("n_pos")
    if n is None or n_pos is None:
        return value, np.nan, np.nan
    low, high = score_interval(metric, value, n_pos, n - n_pos)
    return value, float(low), float(high)


def _verdict(low: float, high: float, margin: float) -> str | None:
    """kept: the interval of external - internal excludes a drop larger than ``margin``; dropped:
    it lies below 0 and does not; unclear: it holds 0 and a drop larger than ``margin``."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return None
    if low >= -margin:
        return "kept"
    return "dropped" if high < 0 else "unclear"


def _none(value: float):
    return float(value) if np.isfinite(value) else None


def _pair(low: float, high: float) -> list | None:
    return [float(low), float(high)] if np.isfinite(low) and np.isfinite(high) else None


def internal_vs_external(external: dict, internal: dict, labels, margin: float = KEEP_MARGIN) -> dict:
    """Per label of ``labels``: each metric on the external data (``external``, metrics schema)
    and on the model's own test split (``internal``, metrics schema; a label is found there under
    any collection's name), the difference external - internal with its MOVER interval, and a
    verdict on the AUROC difference (:func:`_verdict`). Labels the internal metrics lack are
    listed in ``not_compared``. JSON-ready: undefined numbers are None."""
    per_class, not_compared = {}, {}
    inside = internal.get("per_class") or {}
    for label in labels:
        name = find_name(label, inside)
        if name is None:
            not_compared[label] = f"not among the internal metrics' labels ({' '.join(inside) or 'none'})"
            continue
        ext, ins = external["per_class"][label], inside[name]
        row = {"internal_label": name, "n_external": ext.get("n"), "n_pos_external": ext.get("n_pos"),
               "n_internal": ins.get("n"), "n_pos_internal": ins.get("n_pos")}
        for metric in METRICS:
            e, e_lo, e_hi = _side(ext, metric)
            i, i_lo, i_hi = _side(ins, metric)
            d = e - i
            lo, hi = mover(d, e_lo, e_hi, e, i_lo, i_hi, i)
            row[metric] = {"external": _none(e), "external_ci95": _pair(e_lo, e_hi), "internal": _none(i),
                           "internal_ci95": _pair(i_lo, i_hi), "difference": _none(d),
                           "difference_ci95": _pair(lo, hi)}
        verdict_ci = row[VERDICT_METRIC]["difference_ci95"] or [np.nan, np.nan]
        row["verdict"] = _verdict(verdict_ci[0], verdict_ci[1], margin)
        per_class[label] = row
    kinds = {kind: [lbl for lbl, r in per_class.items() if r["verdict"] == kind] for kind in ("kept", "dropped", "unclear")}
    return {"metric": VERDICT_METRIC, "margin": margin,
            "internal_split": internal.get("split"), "internal_n": internal.get("n"),
            "external_split": external.get("split"), "external_n": external.get("n"),
            "per_class": per_class, **kinds, "not_compared": not_compared}


def internal_external_rows(result: dict) -> pd.DataFrame:
    """:func:`internal_vs_external`'s result as one row per (label, metric)."""
    rows = []
    for label, row in result["per_class"].items():
        for metric in METRICS:
            m = row[metric]
            lo, hi = m["difference_ci95"] or (None, None)
            rows.append({"label": label, "internal_label": row["internal_label"], "metric": metric,
                         "external": m["external"], "internal": m["internal"], "difference": m["difference"],
                         "ci_low": lo, "ci_high": hi,
                         "verdict": row["verdict"] if metric == result["metric"] else None,
                         "n_external": row["n_external"], "n_internal": row["n_internal"]})
    return pd.DataFrame(rows, columns=["label", "internal_label", "metric", "external", "internal", "difference",
                                       "ci_low", "ci_high", "verdict", "n_external", "n_internal"])
