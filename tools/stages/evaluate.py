"""The eval stage: metrics with intervals, the predictions CSV, ROC/PR curves, and metrics per
group of each ``--group-col``. Shared by eval and valtool, so both write the same files from the
same logits."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from tabulate import tabulate

from tools import distributed, figures
from tools.files import write_csv, write_json
from tools.metrics import METRICS, Ranked, metrics_with_ci, sigmoid
from tools.predictions import predictions_frame
from tools.runtime import Run
from tools.findings import describe, failure_list, slice_tests
from tools.slicing import group_metrics, group_table
from tools.splits import SplitData

log = logging.getLogger("cxr")


def metrics_table(metrics: dict) -> str:
    rows = [["macro", *[metrics["macro"][m] for m in METRICS]], ["micro", *[metrics["micro"][m] for m in METRICS]]]
    rows += [[lbl, *[v[m] for m in METRICS]] for lbl, v in metrics["per_class"].items()]
    return tabulate(rows, headers=["", *METRICS], floatfmt=".3f", missingval="n/a")


def write_evaluation(run: Run, data: SplitData, logits, labels, group_cols=(), min_group_size: int = 30,
                     bootstrap: int = 1000) -> dict:
    """metrics_<split>.json, predictions_<split>.csv, roc/pr plots, group_metrics_<C>.* per group
    column, intervals from ``bootstrap`` patient resamples, and ``slice_tests.csv``: every
    comparison of a group with the rest that can enter the failure list, with p and q-values
    (Benjamini-Hochberg over this file's rows). Returns {"metrics", "groups": {col: result},
    "tests": [...]} (the tests without q-values: valtool corrects them within its whole list)."""
    out = {"metrics": None, "groups": {}, "tests": []}
    if not distributed.is_main():
        return out
    split = data.name or "all"
    probs = sigmoid(logits)
    ranked = Ranked(data.y, probs)  # sorted once for the metrics and every group
    metrics = metrics_with_ci(data.y, probs, labels, data.clusters, bootstrap, run.seed, split, ranked)
    write_json(run.outdir / f"metrics_{split}.json", metrics)
    write_csv(run.outdir / f"predictions_{split}.csv", predictions_frame(data.df, labels, logits, probs))
    figures.roc_pr_curves(data.y, probs, labels, run.outdir / f"roc_{split}.png", run.outdir / f"pr_{split}.png",
                        title=f"({split}, n={len(data.df)})")
    _warn_single_class(metrics)
    print(metrics_table(metrics))
    out["metrics"] = metrics
    for col in group_cols:
        result = group_metrics(data.df, data.y, probs, labels, col, data.clusters,
                               min_group_size, bootstrap, run.seed, ranked)
        write_json(run.outdir / f"group_metrics_{col}.json", result)
        write_csv(run.outdir / f"group_metrics_{col}.csv", group_table(result, labels))
        figures.group_bars(result, labels, run.outdir / f"group_metrics_{col}.png")
        out["groups"][col] = result
        out["tests"] += slice_tests(result, labels)
        if result["derived_from_labels"]:
            log.info("%s is a function of the labels: its gaps describe how its groups are defined, not the model, "
                     "and are not tested", col)
    if group_cols:
        write_slice_tests(run, out["tests"])
    return out


def write_slice_tests(run: Run, tests: list[dict]) -> None:
    """slice_tests.csv, and the findings and candidates among them on the console."""
    listed = failure_list(tests)
    columns = ["group_col", "group", "label", "metric", "gap", "ci_low", "ci_high", "p_value", "q_value", "finding",
               "n", "small"]
    rows = [{**t, "ci_low": (t["ci95"] or [None, None])[0], "ci_high": (t["ci95"] or [None, None])[1]}
            for t in listed["tests"]]
    write_csv(run.outdir / "slice_tests.csv", pd.DataFrame(rows, columns=columns))
    family = listed["family"]
    log.info("slices: %d comparisons tested, %d finding(s) (q < %.2f, Benjamini-Hochberg), %d candidate(s) (p < %.2f only)",
             family["tests"], family["findings"], family["alpha"], family["candidates"], family["alpha"])
    for t in listed["entries"][:10]:
        log.info("%s: %s", "finding" if t["finding"] else "candidate", describe(t))


def _warn_single_class(metrics: dict) -> None:
    for label, block in metrics["per_class"].items():
        if block["auroc"] is None or np.isnan(block["auroc"]):
            log.warning("warning: label %s has one class only in split %s (n=%d, positives=%d): "
                        "AUROC/AUPRC/sensitivity are null", label, metrics["split"], block["n"], block["n_pos"])
