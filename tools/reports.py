"""What eval writes: metrics JSON, predictions CSV, curves, and group metrics per column.
Shared by eval and valtool so both write the same files from the same logits."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from tabulate import tabulate

from tools import distributed, plots
from tools.io import write_csv, write_json
from tools.metrics import METRICS, metrics_with_ci, sigmoid
from tools.slicing import group_metrics, group_table, significant_failures

log = logging.getLogger("cxr")


def predictions_frame(df: pd.DataFrame, labels, logits, probs, extra: dict | None = None) -> pd.DataFrame:
    """All input columns of the rows, then ``<L>_logit`` and ``<L>_prob`` per label (and extras)."""
    out = df.copy()
    for j, label in enumerate(labels):
        out[f"{label}_logit"] = logits[:, j]
        out[f"{label}_prob"] = probs[:, j]
    for name, values in (extra or {}).items():
        out[name] = values
    return out


def metrics_table(metrics: dict) -> str:
    rows = [["macro", *[metrics["macro"][m] for m in METRICS]], ["micro", *[metrics["micro"][m] for m in METRICS]]]
    rows += [[lbl, *[v[m] for m in METRICS]] for lbl, v in metrics["per_class"].items()]
    return tabulate(rows, headers=["", *METRICS], floatfmt=".3f", missingval="n/a")


def write_evaluation(run, data, logits) -> dict:
    """metrics_<split>.json, predictions_<split>.csv, roc/pr plots, group_metrics_<C>.* per
    --group-col. Returns {"metrics", "groups": {col: result}, "failures": [...]}."""
    args = run.args
    out = {"metrics": None, "groups": {}, "failures": []}
    if not distributed.is_main():
        return out
    split = data.name or "all"
    probs = sigmoid(logits)
    metrics = metrics_with_ci(data.y, probs, args.labels, data.clusters, args.bootstrap, args.seed, split)
    write_json(run.outdir / f"metrics_{split}.json", metrics)
    write_csv(run.outdir / f"predictions_{split}.csv", predictions_frame(data.df, args.labels, logits, probs))
    plots.roc_pr_curves(data.y, probs, args.labels, run.outdir / f"roc_{split}.png", run.outdir / f"pr_{split}.png",
                        title=f"({split}, n={len(data.df)})")
    _warn_single_class(metrics)
    print(metrics_table(metrics))
    out["metrics"] = metrics
    for col in args.group_col:
        result = group_metrics(data.df, data.y, probs, args.labels, col, data.clusters,
                               args.min_group_size, args.bootstrap, args.seed)
        write_json(run.outdir / f"group_metrics_{col}.json", result)
        write_csv(run.outdir / f"group_metrics_{col}.csv", group_table(result, args.labels))
        plots.group_bars(result, args.labels, run.outdir / f"group_metrics_{col}.png")
        out["groups"][col] = result
        out["failures"] += significant_failures(result, args.labels)
    for f in sorted(out["failures"], key=lambda f: f["gap"])[:10]:
        log.info("failure: %s=%s %s %s gap %.3f [%.3f, %.3f] (n=%d)", f["group_col"], f["group"], f["label"],
                 f["metric"], f["gap"], f["ci95"][0], f["ci95"][1], f["n"])
    return out


def _warn_single_class(metrics: dict) -> None:
    for label, block in metrics["per_class"].items():
        if block["auroc"] is None or np.isnan(block["auroc"]):
            log.warning("warning: label %s has one class only in split %s (n=%d, positives=%d): "
                        "AUROC/AUPRC/sensitivity are null", label, metrics["split"], block["n"], block["n_pos"])
