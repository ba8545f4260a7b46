"""The stress stage: metrics of every corruption x severity pass against the clean pass, with
paired patient-bootstrap intervals for each drop, per label and per group.

Corruptions run on the cached uint8 image at model resolution (after the resize), so a 9x9 blur
means the same thing whatever the source resolution (``tools.inference.corrupted_logits``).
"""
from __future__ import annotations

import logging

import pandas as pd
from tabulate import tabulate

from tools import distributed, figures
from tools.corruptions import PARAM_NAMES, SEVERITIES
from tools.files import write_csv, write_json
from tools.metrics import METRICS, SPEC_METRICS, bootstrap_resamples, compute_metrics, difference, scores, sigmoid
from tools.runtime import Run
from tools.slicing import group_values
from tools.splits import SplitData

log = logging.getLogger("cxr")


def _row(name, severity, param, metrics, delta, labels) -> dict:
    """One stress_summary.csv row; ``delta`` is the difference to the clean pass (None for clean).
    SPEC's columns come first, in SPEC's order; the further macro metrics follow them."""
    row = {"corruption": name, "severity": severity, "param": param}
    row.update({f"macro_{m}": metrics["macro"][m] for m in SPEC_METRICS})
    row["delta_auroc"] = delta["macro"]["auroc"] if delta else 0.0
    row["delta_auprc"] = delta["macro"]["auprc"] if delta else 0.0
    row.update({f"auroc_{lbl}": metrics["per_class"][lbl]["auroc"] for lbl in labels})
    row.update({f"macro_{m}": metrics["macro"][m] for m in METRICS if m not in SPEC_METRICS})
    for lbl in labels:
        block = delta["per_class"][lbl] if delta else {"auroc": 0.0}
        ci = (block.get("ci95") or {}).get("auroc") or [None, None]
        row.update({f"delta_auroc_{lbl}": block["auroc"], f"delta_auroc_{lbl}_lo": ci[0],
                    f"delta_auroc_{lbl}_hi": ci[1], f"delta_auroc_{lbl}_p": (block.get("p_value") or {}).get("auroc")})
    macro = (delta or {}).get("macro", {})
    ci = (macro.get("ci95") or {}).get("auroc") or [None, None]
    row.update({"delta_auroc_lo": ci[0], "delta_auroc_hi": ci[1], "delta_auroc_p": (macro.get("p_value") or {}).get("auroc")})
    return row


def write_stress(run: Run, data: SplitData, clean_logits, results: dict, labels, group_cols=(),
                 bootstrap: int = 1000) -> pd.DataFrame:
    """clean_metrics.json, <corruption>_sev<k>.json, stress_summary.csv, stress_<metric>.png,
    stress_examples.png and, per group column, stress_by_<C>.csv; ``results`` maps (corruption,
    severity) to logits. Returns the summary table."""
    if not distributed.is_main():
        return pd.DataFrame()
    split = data.name or "all"
    clean_probs = sigmoid(clean_logits)
    clean = compute_metrics(data.y, clean_probs, labels, split)
    write_json(run.outdir / "clean_metrics.json", clean)
    # Paired patient bootstrap: the same resamples for the clean and corrupted pass, so each drop
    # gets an interval and a drop within noise is not reported as a failure.
    weights = bootstrap_resamples(data.clusters, bootstrap, run.seed) if bootstrap > 0 else None
    clean_scores = scores(data.y, clean_probs, weights)  # once, for all the passes compared with it
    rows = [_row("clean", 0, None, clean, None, labels)]
    for (name, severity), logits in results.items():
        probs = sigmoid(logits)
        metrics = compute_metrics(data.y, probs, labels, split)
        delta = difference(scores(data.y, probs, weights), clean_scores, labels)
        metrics.update(corruption=name, severity=severity, param=SEVERITIES[name][severity - 1],
                       param_name=PARAM_NAMES[name], delta_to_clean=delta)
        write_json(run.outdir / f"{name}_sev{severity}.json", metrics)
        rows.append(_row(name, severity, SEVERITIES[name][severity - 1], metrics, delta, labels))
    summary = pd.DataFrame(rows)
    write_csv(run.outdir / "stress_summary.csv", summary)
    for metric in ("auroc", "auprc"):
        figures.stress_curves(summary, labels, metric, run.outdir / f"stress_{metric}.png")
    names = list(dict.fromkeys(name for name, _ in results))
    figures.plot_corruption_examples(data.store[0], run.outdir / "stress_examples.png", seed=run.seed,
                                     title=f"{data.paths[0]} at model resolution", names=names)
    for col in group_cols:
        write_csv(run.outdir / f"stress_by_{col}.csv", stress_by_group(data, clean_logits, results, col, labels))
    shown = summary[["corruption", "severity", "param", "macro_auroc", "delta_auroc"]]
    print(tabulate(shown, headers="keys", showindex=False, floatfmt=".3f", missingval="n/a"))
    return summary


def stress_by_group(data, clean_logits, results, col, labels) -> pd.DataFrame:
    """Corruption x subgroup table: macro and per-label AUROC per group, with the drop from the
    same group's clean value (a model may break under JPEG only on AP films)."""
    values, _ = group_values(data.df[col])
    rows = []
    for value in sorted(pd.unique(values), key=str):
        mask = values == value
        clean = compute_metrics(data.y[mask], sigmoid(clean_logits[mask]), labels)
        for (name, severity), logits in [(("clean", 0), clean_logits), *results.items()]:
            m = compute_metrics(data.y[mask], sigmoid(logits[mask]), labels)
            row = {"group_col": col, "group": value, "n": int(mask.sum()), "corruption": name, "severity": severity,
                   "macro_auroc": m["macro"]["auroc"], "delta_auroc": m["macro"]["auroc"] - clean["macro"]["auroc"]}
            for lbl in labels:
                row[f"auroc_{lbl}"] = m["per_class"][lbl]["auroc"]
                row[f"delta_auroc_{lbl}"] = m["per_class"][lbl]["auroc"] - clean["per_class"][lbl]["auroc"]
            rows.append(row)
    return pd.DataFrame(rows)


def worst_corruption(summary: pd.DataFrame, labels) -> dict | None:
    """The (corruption, severity, label) with the largest AUROC drop, for the summary."""
    rows = summary[summary["corruption"] != "clean"]
    best = None
    for _, r in rows.iterrows():
        for lbl in labels:
            d = r[f"delta_auroc_{lbl}"]
            if pd.notna(d) and (best is None or d < best["delta_auroc"]):
                best = {"corruption": r["corruption"], "severity": int(r["severity"]), "label": lbl,
                        "delta_auroc": float(d)}
    return best
