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
from tools.metrics import METRICS, compute_metrics, sigmoid
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


def _row(name, severity, param, metrics, clean, labels) -> dict:
    row = {"corruption": name, "severity": severity, "param": param}
    row.update({f"macro_{m}": metrics["macro"][m] for m in METRICS})
    row["delta_auroc"] = metrics["macro"]["auroc"] - clean["macro"]["auroc"]
    row["delta_auprc"] = metrics["macro"]["auprc"] - clean["macro"]["auprc"]
    row.update({f"auroc_{lbl}": metrics["per_class"][lbl]["auroc"] for lbl in labels})
    row.update({f"delta_auroc_{lbl}": metrics["per_class"][lbl]["auroc"] - clean["per_class"][lbl]["auroc"]
                for lbl in labels})
    return row


def write_stress(run, data, clean_logits, results: dict) -> pd.DataFrame:
    """clean_metrics.json, <corruption>_sev<k>.json, stress_summary.csv, stress_<metric>.png,
    stress_examples.png and, per --group-col, stress_by_<C>.csv. Returns the summary table."""
    args, labels = run.args, run.args.labels
    if not distributed.is_main():
        return pd.DataFrame()
    split = data.name or "all"
    clean = compute_metrics(data.y, sigmoid(clean_logits), labels, split)
    write_json(run.outdir / "clean_metrics.json", clean)
    rows = [_row("clean", 0, None, clean, clean, labels)]
    for (name, severity), logits in results.items():
        metrics = compute_metrics(data.y, sigmoid(logits), labels, split)
        metrics.update(corruption=name, severity=severity, param=SEVERITIES[name][severity - 1],
                       param_name=PARAM_NAMES[name])
        write_json(run.outdir / f"{name}_sev{severity}.json", metrics)
        rows.append(_row(name, severity, SEVERITIES[name][severity - 1], metrics, clean, labels))
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
