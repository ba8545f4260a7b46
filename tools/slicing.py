"""Metrics per subgroup of a metadata column, with bootstrap intervals and the gap to the rest.

A group's gap is (metric in the group) - (metric in all other rows), with a 95% interval from the
same patient-level resamples; an interval that excludes 0 is a difference the data supports.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from tools.metrics import METRICS, bootstrap_weights, difference, metrics_from_scores, scores

MAX_CATEGORIES = 12
NUMERIC_BINS = 4


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


def group_metrics(df: pd.DataFrame, y, p, labels, col: str, clusters, min_group_size=30,
                  n_boot=1000, seed=0) -> dict:
    """``{"group_col", "bin_edges", "groups": {value: metrics schema + ci95 + small + gap_to_rest}}``."""
    values, edges = group_values(df[col])
    weights = bootstrap_weights(clusters, n_boot, seed) if n_boot > 0 else None

    def part(mask):  # the group's or the rest's scores on the same resamples
        return scores(y[mask], p[mask], None if weights is None else weights[:, mask])

    groups = {}
    for value in sorted(pd.unique(values), key=str):
        mask = values == value
        group = part(mask)
        block = metrics_from_scores(y[mask], group, labels)
        block.pop("split")
        block["small"] = bool(mask.sum() < min_group_size)
        block["gap_to_rest"] = difference(group, part(~mask), labels) if (~mask).any() else None
        groups[str(value)] = block
    return {"group_col": col, "bin_edges": edges, "min_group_size": min_group_size, "groups": groups}


def group_table(result: dict, labels) -> pd.DataFrame:
    """One CSV row per group: n, small flag, macro and per-label metrics with intervals and gaps."""
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
                            f"{name}_{m}_gap_hi": gci[1]})
            if name != "macro":
                row[f"{name}_n_pos"] = vals["n_pos"]
        rows.append(row)
    return pd.DataFrame(rows)


def significant_failures(result: dict, labels, metrics=("auroc", "sens@95spec", "f1@0.5")) -> list[dict]:
    """Groups doing worse than the rest with a 95% interval of the gap entirely below 0,
    largest gap first: the slices a failure analysis must report. Labels with one class only in
    the group (and then the macro average) are not compared."""
    found = []
    for value, block in result["groups"].items():
        gap = block.get("gap_to_rest")
        if not gap:
            continue
        # A group where a label has one class only (e.g. num_findings = 0 has no positives) scores
        # F1 = 0 by construction: that is the definition of the group, not a failure of the model.
        one_class = {lbl for lbl in labels
                     if block["per_class"][lbl]["n_pos"] in (0, block["per_class"][lbl]["n"])}
        names = [lbl for lbl in labels if lbl not in one_class] + ([] if one_class else ["macro"])
        for name in names:
            g = gap["macro"] if name == "macro" else gap["per_class"][name]
            for m in metrics:
                ci = (g.get("ci95") or {}).get(m)
                if g.get(m) is not None and ci is not None and ci[1] < 0:
                    found.append({"group_col": result["group_col"], "group": value, "label": name,
                                  "metric": m, "gap": g[m], "ci95": ci, "n": block["n"],
                                  "small": block["small"]})
    return sorted(found, key=lambda f: f["gap"])
