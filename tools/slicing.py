"""Metrics per subgroup of a metadata column, with bootstrap intervals and the gap to the rest.

A group's gap is (metric in the group) - (metric in all other rows), with a 95% interval from the
same patient-level resamples and a p-value of "no gap" (for AUROC, the sensitivities and the
specificity widened by the score intervals of ``tools.stats``, so a gap at a boundary is not a
point). A gap is a candidate failure only when it is ``flaggable``: the column is not a function of
the labels, the label has both classes on both sides, and both sides hold MIN_POSITIVES positives
and MIN_NEGATIVES negatives. The failure list and its correction for many comparisons are
``tools.findings``'.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from tools.metrics import METRICS, Ranked, bootstrap_resamples, difference, metrics_from_scores, scores
from tools.stats import SCORE_METRICS, hull, mover, mover_p, score_interval

MAX_CATEGORIES = 12
NUMERIC_BINS = 4
# A gap enters the failure list only when both sides hold this many positives and negatives of
# the label: with fewer than 20 negatives, 95% specificity means no false positive at all, and a
# handful of films decides the AUROC.
MIN_POSITIVES, MIN_NEGATIVES = 10, 20
MIN_REPEATS = 10


def group_values(column: pd.Series) -> tuple[np.ndarray, list | None]:
    """String group value per row; numeric columns with many values become quantile bins
    ("[a, b)" strings, edges returned). Missing values form their own group, "missing"."""
    numeric = pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)
    if numeric and column.nunique(dropna=True) > MAX_CATEGORIES:
        binned, edges = pd.qcut(column, NUMERIC_BINS, retbins=True, duplicates="drop")
        edges = [float(e) for e in edges]
        names = [f"[{edges[i]:g}, {edges[i + 1]:g}{']' if i == len(edges) - 2 else ')'}"
                 for i in range(len(edges) - 1)]
        codes = binned.cat.codes.to_numpy()
        values = np.array([names[c] if c >= 0 else "missing" for c in codes], dtype=object)
        return values, edges
    values = column.astype(object).where(column.notna(), "missing").astype(str).to_numpy()
    return values, None


def defined_by_labels(values: np.ndarray, y: np.ndarray) -> bool:
    """True when the group value is a function of the label columns: on the rows whose labels
    are all known, every combination of labels carries one value, the column takes two values
    or more, and at least MIN_REPEATS rows repeat a combination (so it is not a coincidence of
    tiny data). A "number of findings" column is; a site or a view column is not."""
    known = ~np.isnan(y).any(axis=1)
    if not known.any() or len(np.unique(values[known])) < 2:
        return False
    combos, inverse = _label_combinations(y[known])
    pairs = {(int(c), v) for c, v in zip(inverse.ravel(), values[known])}
    return len(pairs) == len(combos) and int(known.sum()) - len(combos) >= MIN_REPEATS


def _label_combinations(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct rows, each row's index among them) of a 0/1 label matrix with no unknowns; rows
    are read as binary numbers where they fit in 62 bits (np.unique(axis=0) sorts rows slowly)."""
    if y.shape[1] > 62 or not np.isin(y, (0, 1)).all():
        combos, inverse = np.unique(y, axis=0, return_inverse=True)
        return combos, inverse.ravel()
    return np.unique(y.astype(np.int64) @ (np.int64(1) << np.arange(y.shape[1], dtype=np.int64)), return_inverse=True)


def _class_counts(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positives, negatives) per label among the known labels of ``y``."""
    return np.nansum(y == 1, axis=0), np.nansum(y == 0, axis=0)


def group_metrics(df: pd.DataFrame, y, p, labels, col: str, clusters, min_group_size=30,
                  n_boot=1000, seed=0, ranked: Ranked | None = None) -> dict:
    """``{"group_col", "bin_edges", "derived_from_labels", "groups": {value: metrics schema +
    ci95 + small + gap_to_rest}}``; each gap block (macro, per label) carries ``p_value``,
    ``derived_from_labels`` and ``flaggable`` (see :func:`mark_gaps`). ``ranked``: the rows'
    :class:`tools.metrics.Ranked`, when already sorted (every group and rest is taken from it)."""
    values, edges = group_values(df[col])
    resamples = bootstrap_resamples(clusters, n_boot, seed) if n_boot > 0 else None
    y, p = np.asarray(y, float), np.asarray(p, float)
    masks = {value: values == value for value in sorted(pd.unique(values), key=str)}
    ranked = Ranked(y, p) if ranked is None else ranked

    def part(mask, micro=True):  # the group's or the rest's scores on the same resamples
        return scores(y[mask], p[mask], None if resamples is None else resamples.rows(mask), micro,
                      ranked.rows(mask, micro))

    # every group's scores, then each rest's; a rest that is itself a group (a column with two
    # values) is not scored twice, and a rest needs no micro average
    scored = {mask.tobytes(): part(mask) for mask in masks.values()}

    def rest(mask):
        key = (~mask).tobytes()
        if key not in scored:
            scored[key] = part(~mask, micro=False)
        return scored[key]

    derived = defined_by_labels(values, y)
    groups = {}
    for value, mask in masks.items():
        group = scored[mask.tobytes()]
        block = metrics_from_scores(y[mask], group, labels)
        block.pop("split")
        block["small"] = bool(mask.sum() < min_group_size)
        block["gap_to_rest"] = None
        if (~mask).any():
            block["gap_to_rest"] = difference(group, rest(mask), labels)
            mark_gaps(block, _class_counts(y[mask]), _class_counts(y[~mask]), labels, derived)
        groups[str(value)] = block
    if resamples is not None:
        _score_gap_intervals(groups, labels)
    return {"group_col": col, "bin_edges": edges, "min_group_size": min_group_size,
            "derived_from_labels": derived, "groups": groups}


def mark_gaps(block: dict, group_counts, rest_counts, labels, derived: bool) -> None:
    """Mark each gap block of a group: ``derived_from_labels`` when the column is a function of
    the labels or the label has one class in the group or in the rest (the gap then measures the
    definition of the group, not the model); ``flaggable`` when it is not derived and both sides
    hold at least MIN_POSITIVES positives and MIN_NEGATIVES negatives of the label (macro: every
    label). Rest counts go along for the score intervals."""
    gap = block["gap_to_rest"]
    (pos1, neg1), (pos2, neg2) = group_counts, rest_counts
    all_flaggable, any_derived = True, derived
    for j, lbl in enumerate(labels):
        g = gap["per_class"][lbl]
        one_class = min(pos1[j], neg1[j], pos2[j], neg2[j]) == 0
        g["derived_from_labels"] = bool(derived or one_class)
        g["flaggable"] = bool(not g["derived_from_labels"] and min(pos1[j], pos2[j]) >= MIN_POSITIVES
                              and min(neg1[j], neg2[j]) >= MIN_NEGATIVES)
        g["rest_n_pos"], g["rest_n"] = int(pos2[j]), int(pos2[j] + neg2[j])
        all_flaggable &= g["flaggable"]
        any_derived |= g["derived_from_labels"]
    gap["macro"]["derived_from_labels"] = bool(any_derived)
    gap["macro"]["flaggable"] = bool(all_flaggable and not any_derived)


def _score_gap_intervals(groups: dict, labels) -> None:
    """Per-label AUROC, sensitivity and specificity gaps: interval = hull of the paired bootstrap
    and the MOVER interval of the two sides' score intervals (group and rest are different
    patients), p-value = the larger of the two tests'. One vectorised call per metric for the whole
    column."""
    items = [(block, lbl) for block in groups.values() if block["gap_to_rest"] for lbl in labels]
    for m in SCORE_METRICS:
        rows = []
        for block, lbl in items:
            g, own = block["gap_to_rest"]["per_class"][lbl], block["per_class"][lbl]
            if own[m] is not None and np.isfinite(own[m]) and np.isfinite(g[m]):
                rows.append((g, own[m], own["n_pos"], own["n"] - own["n_pos"], own[m] - g[m], g["rest_n_pos"],
                             g["rest_n"] - g["rest_n_pos"]))
        if not rows:
            continue
        t1, pos1, neg1, t2, pos2, neg2 = (np.array(c, float) for c in list(zip(*rows))[1:])
        lo1, hi1 = score_interval(m, t1, pos1, neg1)
        lo2, hi2 = score_interval(m, t2, pos2, neg2)
        lower, upper = mover(t1 - t2, lo1, hi1, t1, lo2, hi2, t2)
        p_score = mover_p(m, t1, pos1, neg1, t2, pos2, neg2)
        for i, (g, *_) in enumerate(rows):
            g["ci95"][m] = hull(g["ci95"][m], [lower[i], upper[i]])
            p_boot = g["p_value"][m]
            g["p_value"][m] = None if p_boot is None else float(max(p_boot, p_score[i]))


def group_table(result: dict, labels) -> pd.DataFrame:
    """One CSV row per group: n, small flag, macro and per-label metrics with intervals, gaps, their
    p-values and whether each gap is derived from the labels or flaggable."""
    rows = []
    for value, block in result["groups"].items():
        row = {"group_col": result["group_col"], "group": value, "n": block["n"], "small": block["small"]}
        gap = block["gap_to_rest"] or {}
        parts = [("macro", block["macro"], (gap.get("macro") or {}))]
        parts += [(lbl, block["per_class"][lbl], ((gap.get("per_class") or {}).get(lbl) or {})) for lbl in labels]
        for name, vals, gaps in parts:
            for m in METRICS:
                ci = (vals.get("ci95") or {}).get(m) or [None, None]
                gci = (gaps.get("ci95") or {}).get(m) or [None, None]
                row.update({f"{name}_{m}": vals[m], f"{name}_{m}_lo": ci[0], f"{name}_{m}_hi": ci[1],
                            f"{name}_{m}_gap": gaps.get(m), f"{name}_{m}_gap_lo": gci[0],
                            f"{name}_{m}_gap_hi": gci[1], f"{name}_{m}_gap_p": (gaps.get("p_value") or {}).get(m)})
            row[f"{name}_derived_from_labels"] = gaps.get("derived_from_labels")
            row[f"{name}_flaggable"] = gaps.get("flaggable")
            if name != "macro":
                row[f"{name}_n_pos"] = vals["n_pos"]
        rows.append(row)
    return pd.DataFrame(rows)
