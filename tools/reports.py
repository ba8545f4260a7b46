"""What eval writes: metrics JSON, predictions CSV, curves, and group metrics per column.
Shared by eval and valtool so both write the same files from the same logits."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from tabulate import tabulate

from tools import distributed, plots
from tools.io import NOTICE, write_csv, write_json
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


# ====== calibrate ======

def write_calibration(run, data, logits, temperature, mc: dict | None, tta: dict | None,
                      fitted_on: str | None) -> dict:
    """calibration_summary.json, reliability_*.png, predictions_calibrated_<split>.csv.

    ``temperature`` is a number or one per label; ``fitted_on`` names the split it was fitted on
    (None: not fitted, reported at T = 1)."""
    from tools.calibration import apply_temperature, calibration_report, plot_reliability
    from tools.uncertainty import public, spread_columns

    if not distributed.is_main():
        return {}

    labels, y = run.args.labels, data.y
    split = data.name or "all"
    uncal, cal = sigmoid(logits), sigmoid(apply_temperature(logits, temperature))
    before, after = calibration_report(uncal, y, labels), calibration_report(cal, y, labels)
    per_label_t = np.ndim(temperature) > 0
    summary = {"split": split, "fitted_on": fitted_on,
               "temperature": dict(zip(labels, map(float, temperature))) if per_label_t else float(temperature)}
    for key in ("ece", "nll", "brier", "auroc", "ece_toplabel"):
        summary[f"{key}_before"], summary[f"{key}_after"] = before[key], after[key]
    summary["per_class"] = {
        lbl: {f"{k}_{when}": rep["per_class"][lbl][k] for k in ("ece", "nll", "brier", "auroc")
              for when, rep in (("before", before), ("after", after))}
        for lbl in labels}
    summary["mc_dropout"] = public(mc) or {"samples": 0}
    summary["tta"] = public(tta) or {"samples": 0}
    summary["note"] = NOTICE
    write_json(run.outdir / "calibration_summary.json", summary)
    t_text = ", ".join(f"{v:.2f}" for v in np.atleast_1d(temperature))
    plot_reliability(uncal, y, run.outdir / "reliability_uncal.png", f"uncalibrated ({split})")
    plot_reliability(cal, y, run.outdir / "reliability_temp_scaled.png", f"temperature scaled, T = {t_text} ({split})")
    extra = {}
    if mc is not None:
        plot_reliability(mc["mean"], y, run.outdir / "reliability_mc_dropout.png",
                         f"MC-Dropout mean, {mc['samples']} samples ({split})")
    for j, lbl in enumerate(labels):
        extra[f"{lbl}_prob_uncal"] = uncal[:, j]
        extra.update(spread_columns(lbl, j, mc, tta))
    write_csv(run.outdir / f"predictions_calibrated_{split}.csv",
              predictions_frame(data.df, labels, logits, cal, extra))
    rows = [[k, summary[f"{k}_before"], summary[f"{k}_after"]] for k in ("ece", "ece_toplabel", "nll", "brier", "auroc")]
    print(f"temperature {t_text} (fitted on {fitted_on or 'nothing: reported at T = 1'})")
    print(tabulate(rows, headers=["", "before", "after"], floatfmt=".4f", missingval="n/a"))
    for name, stats in (("MC-Dropout", mc), ("TTA", tta)):
        if stats is not None:
            print(f"{name}: {stats['samples']} samples, mean std {stats['mean_std']:.4f}, "
                  f"error-detection AUROC {stats.get('error_detection_auroc')}")
    return summary


# ====== selective ======

def write_selective(run, data, probs, signals: dict, primary: str) -> dict:
    """risk_coverage_<split>.csv (the primary signal), one CSV per further signal, per-label
    curves, risk_coverage_<split>.png and selective_summary.json.

    Every signal ranks the same decisions (clean probability at 0.5), so curves compare rankings.
    ``signals`` maps a name to a confidence array (N, L): higher = more confident."""
    from tools.selective import (known_decisions, oracle_curve, plot_risk_coverage, risk_coverage,
                                 summary_of_curve)

    if not distributed.is_main():
        return {}
    labels, y = run.args.labels, data.y
    split = data.name or "all"
    curves, summaries, per_label = {}, {}, []
    for name, confidence in signals.items():
        conf, correct = known_decisions(confidence, probs, y)  # the same decisions for every signal
        curves[name] = risk_coverage(conf, correct)
        summaries[name] = summary_of_curve(curves[name], correct)
        summaries[name]["per_label"] = {}
        for j, lbl in enumerate(labels):
            c_j, ok_j = known_decisions(confidence[:, j], probs[:, j], y[:, j])
            curve_j = risk_coverage(c_j, ok_j)
            summaries[name]["per_label"][lbl] = summary_of_curve(curve_j, ok_j)
            if name == primary:
                per_label.append(curve_j.assign(label=lbl))
    summary = {"split": split, "confidence": primary, **summaries[primary],
               "signals": {k: v for k, v in summaries.items()},
               "decisions": "known (image, label) pairs at threshold 0.5; risk = error rate of kept pairs"}
    write_csv(run.outdir / f"risk_coverage_{split}.csv", curves[primary])
    for name, curve in curves.items():
        if name != primary:
            write_csv(run.outdir / f"risk_coverage_{split}_{name}.csv", curve)
    write_csv(run.outdir / f"risk_coverage_{split}_per_label.csv", pd.concat(per_label, ignore_index=True))
    full_risk = summary["risk_at_full_coverage"]
    plot_risk_coverage(curves, run.outdir / f"risk_coverage_{split}.png", f"risk-coverage ({split}, n pairs = {summary['n']})",
                       oracle=oracle_curve(correct), random_risk=full_risk)
    rows = [[name, s["aurc"], s["e_aurc"], (s["coverage_at_risk"]["0.05"] or {}).get("coverage")]
            for name, s in summaries.items()]
    print(tabulate(rows, headers=["confidence", "AURC", "E-AURC", "coverage @5% risk"], floatfmt=".4f",
                   missingval="n/a"))
    write_json(run.outdir / "selective_summary.json", summary)
    return summary
