"""The eval stage: metrics with intervals, the predictions CSV, ROC/PR curves, and metrics per
group of each ``--group-col``. Shared by eval and valtool, so both write the same files from the
same logits."""
from __future__ import annotations

import logging

import numpy as np
from tabulate import tabulate

from tools import distributed, figures
from tools.files import write_csv, write_json
from tools.metrics import METRICS, metrics_with_ci, sigmoid
from tools.predictions import predictions_frame
from tools.runtime import Run
from tools.slicing import group_metrics, group_table, significant_failures
from tools.splits import SplitData

log = logging.getLogger("cxr")


def metrics_table(metrics: dict) -> str:
    rows = [["macro", *[metrics["macro"][m] for m in METRICS]], ["micro", *[metrics["micro"][m] for m in METRICS]]]
    rows += [[lbl, *[v[m] for m in METRICS]] for lbl, v in metrics["per_class"].items()]
    return tabulate(rows, headers=["", *METRICS], floatfmt=".3f", missingval="n/a")


def write_evaluation(run: Run, data: SplitData, logits, labels, group_cols=(), min_group_size: int = 30,
                     bootstrap: int = 1000) -> dict:
    """metrics_<split>.json, predictions_<split>.csv, roc/pr plots, group_metrics_<C>.* per group
    column, intervals from ``bootstrap`` patient resamples. Returns {"metrics", "groups": {col:
    result}, "failures": [...]}."""
    out = {"metrics": None, "groups": {}, "failures": []}
    if not distributed.is_main():
        return out
    split = data.name or "all"
    probs = sigmoid(logits)
    metrics = metrics_with_ci(data.y, probs, labels, data.clusters, bootstrap, run.seed, split)
    write_json(run.outdir / f"metrics_{split}.json", metrics)
    write_csv(run.outdir / f"predictions_{split}.csv", predictions_frame(data.df, labels, logits, probs))
    figures.roc_pr_curves(data.y, probs, labels, run.outdir / f"roc_{split}.png", run.outdir / f"pr_{split}.png",
                        title=f"({split}, n={len(data.df)})")
    _warn_single_class(metrics)
    print(metrics_table(metrics))
    out["metrics"] = metrics
    for col in group_cols:
        result = group_metrics(data.df, data.y, probs, labels, col, data.clusters,
                               min_group_size, bootstrap, run.seed)
        write_json(run.outdir / f"group_metrics_{col}.json", result)
        write_csv(run.outdir / f"group_metrics_{col}.csv", group_table(result, labels))
        figures.group_bars(result, labels, run.outdir / f"group_metrics_{col}.png")
        out["groups"][col] = result
        out["failures"] += significant_failures(result, labels)
    for f in sorted(out["failures"], key=lambda f: f["gap"])[:10]:
        log.info("failure: %s=%s %s %s gap %.3f [%.3f, %.3f] (n=%d)", f["group_col"], f["group"], f["label"],
                 f["metric"], f["gap"], f["ci95"][0], f["ci95"][1], f["n"])
    return out


def _warn_single_class(metrics: dict) -> None:
    for label, block in metrics["per_class"].items():
        if block["auroc"] is None or np.isnan(block["auroc"]):
            log.warning("warning: label %s has one class only in split %s (n=%d, positives=%d): "
                        "AUROC/AUPRC/sensitivity are null", label, metrics["split"], block["n"], block["n_pos"])
