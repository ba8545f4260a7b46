"""The stress pass: the model on every corruption x severity of a split, from pixels decoded once.

Corruptions run on the cached uint8 image at model resolution (after the resize), so a 9x9 blur
means the same thing whatever the source resolution, and only the model runs again per pass.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from tabulate import tabulate

from tools import distributed, pipeline, plots
from tools.corruptions import PARAM_NAMES, SEVERITIES, apply_corruption, plot_corruption_examples
from tools.io import write_csv, write_json
from tools.metrics import METRICS, bootstrap_weights, compute_metrics, difference, scores, sigmoid
from tools.slicing import group_values

log = logging.getLogger("cxr")


class Corrupt:
    """Dataset transform: corruption ``name`` at ``severity``, seeded by (seed, row index)."""

    def __init__(self, name: str, severity: int, seed: int):
        self.name, self.severity, self.seed = name, int(severity), int(seed)

    def __call__(self, image: np.ndarray, index: int) -> np.ndarray:
        return apply_corruption(image, self.name, self.severity, self.seed, index)


def corrupted_logits(run, model, data, corruptions) -> dict:
    """{(name, severity): logits (N, L)} for every chosen corruption and severity 1..3."""
    out = {}
    for name in corruptions:
        for severity in (1, 2, 3):
            out[(name, severity)] = pipeline.clean_pass(
                run, model, data, transform=Corrupt(name, severity, run.args.seed),
                desc=f"{name} sev{severity}")["logits"]
    return out


def _row(name, severity, param, metrics, delta, labels) -> dict:
    """One stress_summary.csv row; ``delta`` is the difference to the clean pass (None for clean)."""
    row = {"corruption": name, "severity": severity, "param": param}
    row.update({f"macro_{m}": metrics["macro"][m] for m in METRICS})
    row["delta_auroc"] = delta["macro"]["auroc"] if delta else 0.0
    row["delta_auprc"] = delta["macro"]["auprc"] if delta else 0.0
    row.update({f"auroc_{lbl}": metrics["per_class"][lbl]["auroc"] for lbl in labels})
    for lbl in labels:
        block = delta["per_class"][lbl] if delta else {"auroc": 0.0}
        ci = (block.get("ci95") or {}).get("auroc") or [None, None]
        row.update({f"delta_auroc_{lbl}": block["auroc"], f"delta_auroc_{lbl}_lo": ci[0],
                    f"delta_auroc_{lbl}_hi": ci[1]})
    ci = ((delta or {}).get("macro", {}).get("ci95") or {}).get("auroc") or [None, None]
    row.update({"delta_auroc_lo": ci[0], "delta_auroc_hi": ci[1]})
    return row


def write_stress(run, data, clean_logits, results: dict) -> pd.DataFrame:
    """clean_metrics.json, <corruption>_sev<k>.json, stress_summary.csv, stress_<metric>.png,
    stress_examples.png and, per --group-col, stress_by_<C>.csv. Returns the summary table."""
    args, labels = run.args, run.args.labels
    if not distributed.is_main():
        return pd.DataFrame()
    split = data.name or "all"
    clean_probs = sigmoid(clean_logits)
    clean = compute_metrics(data.y, clean_probs, labels, split)
    write_json(run.outdir / "clean_metrics.json", clean)
    # Paired patient bootstrap: the same resamples for the clean and corrupted pass, so each drop
    # gets an interval and a drop within noise is not reported as a failure.
    n_boot = getattr(args, "bootstrap", 1000)
    weights = bootstrap_weights(data.clusters, n_boot, args.seed) if n_boot > 0 else None
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
        plots.stress_curves(summary, labels, metric, run.outdir / f"stress_{metric}.png")
    plot_corruption_examples(data.store[0], run.outdir / "stress_examples.png", seed=args.seed,
                             title=f"{data.paths[0]} at model resolution")
    for col in getattr(args, "group_col", None) or []:
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
