"""The calibrate stage: temperature scaling fitted on a held-out split, calibration before and
after, MC-Dropout and TTA spread, reliability diagrams and the calibrated predictions CSV."""
from __future__ import annotations

import logging

import numpy as np
from tabulate import tabulate

from tools import distributed, figures
from tools.audit import Subject
from tools.calibration import apply_temperature, calibration_report, fit_temperature
from tools.files import NOTICE, write_csv, write_json
from tools.inference import mc_dropout_logits, tta_logits
from tools.metrics import sigmoid
from tools.predictions import predictions_frame, spread_columns
from tools.runtime import Run
from tools.splits import SplitData
from tools.uncertainty import public, spread_stats

log = logging.getLogger("cxr")


def fitted_temperature(run: Run, subject: Subject, split: str, per_label: bool = False):
    """Temperature fitted on the clean logits of ``split`` (from the subject's predictions when
    they hold its rows): a number, or one per label with ``per_label``."""
    val = subject.split(run, split)
    logits = subject.logits(run, val, desc=split)["logits"]
    return fit_temperature(logits, val.y, per_label=per_label)


def samplers(subject: Subject, mc_samples: int, tta_samples: int) -> tuple[int, int, dict]:
    """(MC samples, TTA draws) the subject can run, and {sampler: why not} for those asked for
    that it cannot (MC head sampling needs the backbone features, TTA the model)."""
    not_run = {}
    if mc_samples > 0 and subject.missing("features"):
        not_run["mc_dropout"], mc_samples = subject.missing("features"), 0
    if tta_samples > 0 and subject.missing("model"):
        not_run["tta"], tta_samples = subject.missing("model"), 0
    for name, why in not_run.items():
        log.warning("%s: %s", name, why)
    return mc_samples, tta_samples, not_run


def spread(run: Run, model, data: SplitData, features, labels, mc_samples: int, tta_samples: int,
           labelled: bool = True) -> tuple[dict | None, dict | None]:
    """(MC-Dropout, TTA) :func:`tools.uncertainty.spread_stats` of ``data`` with these sample
    counts (None where 0). ``features``: the clean pass's backbone features (MC-Dropout samples
    the head on them); ``labelled``: summarise against ``data.y`` too."""
    y = data.y if labelled else None
    mc = tta = None
    if mc_samples > 0:
        mc = spread_stats(sigmoid(mc_dropout_logits(model, features, mc_samples, run.seed, run.device)), y, labels)
    if tta_samples > 0:
        tta = spread_stats(sigmoid(tta_logits(run, model, data, tta_samples)), y, labels)
    return mc, tta


def write_calibration(run: Run, data: SplitData, logits, labels, temperature, mc: dict | None,
                      tta: dict | None, fitted_on: str | None, not_run: dict | None = None) -> dict:
    """calibration_summary.json, reliability_*.png, predictions_calibrated_<split>.csv.

    ``temperature`` is a number or one per label; ``fitted_on`` names the split it was fitted on
    (None: not fitted, reported at T = 1); ``not_run``: {sampler: why} for samplers that could
    not run."""
    if not distributed.is_main():
        return {}

    y = data.y
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
    not_run = not_run or {}
    for key, stats in (("mc_dropout", mc), ("tta", tta)):
        summary[key] = public(stats) or {"samples": 0, **({"not_run": not_run[key]} if key in not_run else {})}
    summary["note"] = NOTICE
    write_json(run.outdir / "calibration_summary.json", summary)
    t_text = ", ".join(f"{v:.2f}" for v in np.atleast_1d(temperature))
    figures.plot_reliability(uncal, y, run.outdir / "reliability_uncal.png", f"uncalibrated ({split})")
    figures.plot_reliability(cal, y, run.outdir / "reliability_temp_scaled.png", f"temperature scaled, T = {t_text} ({split})")
    extra = {}
    if mc is not None:
        figures.plot_reliability(mc["mean"], y, run.outdir / "reliability_mc_dropout.png",
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
