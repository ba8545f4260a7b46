"""The calibrate stage: temperature scaling fitted on a held-out split, calibration before and
after, MC-Dropout and TTA spread, reliability diagrams and the calibrated predictions CSV."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from tabulate import tabulate

from tools import distributed, figures
from tools.audit import Subject
from tools.calibration import (apply_temperature, calibration_report, calibration_resamples, fit_temperature,
                               temperature_resamples)
from tools.findings import ECE_TOLERANCE
from tools.metrics import bootstrap_resamples, percentile_ci
from tools.stats import bootstrap_p, exceed_p
from tools.files import NOTICE, write_csv, write_json
from tools.inference import mc_dropout_logits, tta_logits
from tools.metrics import sigmoid
from tools.predictions import predictions_frame, spread_columns
from tools.runtime import Run
from tools.splits import SplitData
from tools.uncertainty import public, spread_stats

log = logging.getLogger("cxr")


SELECTION_SPLIT = "val"  # the split train chooses the checkpoint on
CALIB_SPLIT = "calib"    # a split set aside for the temperature


@dataclass
class TemperatureFit:
    """A temperature and the split it was fitted on (its logits, labels and patients, for the
    bootstrap interval of the temperature)."""
    temperature: object  # a number, or one per label
    split: str
    logits: np.ndarray
    y: np.ndarray
    clusters: np.ndarray


def calibration_split(table, calib_split: str | None, val_split: str) -> str:
    """The split the temperature is fitted on: ``--calib-split``; else ``calib`` when the table
    has such rows; else ``--val-split``. Fitting on the split that chose the checkpoint is
    allowed but warned about: the checkpoint was picked for doing well there."""
    split = calib_split
    if split is None:
        has_calib = "split" in table.columns and (table["split"].astype(str) == CALIB_SPLIT).any()
        split = CALIB_SPLIT if has_calib else val_split
    if split == SELECTION_SPLIT:
        log.warning("the temperature is fitted on split %r, the split train chose the checkpoint on: its fit can be "
                    "optimistic. Set a split aside for it (train --auto-split TRAIN VAL CALIB TEST, or rows with "
                    "split=%s) or pass --calib-split", split, CALIB_SPLIT)
    return split


def temperature_fit(run: Run, subject: Subject, split: str, per_label: bool = False) -> TemperatureFit:
    """Temperature fitted on the clean logits of ``split`` (from the subject's predictions when
    they hold its rows): a number, or one per label with ``per_label``."""
    val = subject.split(run, split)
    logits = subject.logits(run, val, desc=split)["logits"]
    return TemperatureFit(fit_temperature(logits, val.y, per_label=per_label), split, logits, val.y, val.clusters)


def fitted_temperature(run: Run, subject: Subject, split: str, per_label: bool = False):
    """The temperature of :func:`temperature_fit` alone."""
    return temperature_fit(run, subject, split, per_label).temperature


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


def calibration_intervals(data: SplitData, uncal, cal, labels, fit: TemperatureFit | None, ece_change,
                          bootstrap: int, seed: int) -> dict:
    """95% patient-bootstrap intervals: ``<m>_before_ci95`` / ``<m>_after_ci95`` for ECE, NLL and
    Brier on the reported split (T held at its fitted value), ``ece_change_ci95`` and
    ``ece_change_p`` for after minus before (``ece_change``) on the same resamples,
    ``temperature_ci95`` from refits on resamples of the fit split, and
    ``ece_above_tolerance_p``: the one-sided p-value of "ECE before <= 0.05"."""
    if bootstrap <= 0:
        return {}
    weights = bootstrap_resamples(data.clusters, bootstrap, seed)
    before, after = calibration_resamples(uncal, data.y, weights), calibration_resamples(cal, data.y, weights)
    out = {}
    for key in ("ece", "nll", "brier"):
        out[f"{key}_before_ci95"], out[f"{key}_after_ci95"] = percentile_ci(before[key]), percentile_ci(after[key])
    change = after["ece"] - before["ece"]
    out["ece_change_ci95"] = percentile_ci(change)
    out["ece_change_p"] = None if ece_change is None else bootstrap_p(ece_change, change)
    out["ece_above_tolerance_p"] = exceed_p(before["ece"], ECE_TOLERANCE)
    out["temperature_ci95"] = None
    if fit is not None:
        refits = temperature_resamples(fit.logits, fit.y, bootstrap_resamples(fit.clusters, bootstrap, seed + 1),
                                       fit.temperature, per_label=np.ndim(fit.temperature) > 0)
        out["temperature_ci95"] = (percentile_ci(refits) if refits.ndim == 1 else
                                   {lbl: percentile_ci(refits[:, j]) for j, lbl in enumerate(labels)})
    return out


def write_calibration(run: Run, data: SplitData, logits, labels, fit: TemperatureFit | None, mc: dict | None,
                      tta: dict | None, not_run: dict | None = None, bootstrap: int = 1000) -> dict:
    """calibration_summary.json, reliability_*.png, predictions_calibrated_<split>.csv.

    ``fit``: the temperature (a number or one per label) and the split it was fitted on (None:
    not fitted, reported at T = 1); ``not_run``: {sampler: why} for samplers that could not
    run; ``bootstrap``: patient resamples for the intervals (0: none)."""
    if not distributed.is_main():
        return {}

    temperature, fitted_on = (1.0, None) if fit is None else (fit.temperature, fit.split)
    y = data.y
    split = data.name or "all"
    uncal, cal = sigmoid(logits), sigmoid(apply_temperature(logits, temperature))
    before, after = calibration_report(uncal, y, labels), calibration_report(cal, y, labels)
    per_label_t = np.ndim(temperature) > 0
    summary = {"split": split, "fitted_on": fitted_on, "fit_split": fitted_on,
               "temperature": dict(zip(labels, map(float, temperature))) if per_label_t else float(temperature)}
    for key in ("ece", "nll", "brier", "auroc", "ece_toplabel"):
        summary[f"{key}_before"], summary[f"{key}_after"] = before[key], after[key]
    summary["ece_change"] = (None if before["ece"] is None or after["ece"] is None
                             else after["ece"] - before["ece"])
    summary |= calibration_intervals(data, uncal, cal, labels, fit, summary["ece_change"], bootstrap, run.seed)
    summary["ece_change_verdict"] = ece_change_sentence(summary)
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
    rows = [[k, summary[f"{k}_before"], _ci_text(summary.get(f"{k}_before_ci95")), summary[f"{k}_after"],
             _ci_text(summary.get(f"{k}_after_ci95"))] for k in ("ece", "ece_toplabel", "nll", "brier", "auroc")]
    t_ci = summary.get("temperature_ci95")
    print(f"temperature {t_text}{'' if per_label_t else ' ' + _ci_text(t_ci)} "
          f"(fitted on {fitted_on or 'nothing: reported at T = 1'})")
    print(tabulate(rows, headers=["", "before", "95% CI", "after", "95% CI"], floatfmt=".4f", missingval="n/a"))
    print(summary["ece_change_verdict"])
    for name, stats in (("MC-Dropout", mc), ("TTA", tta)):
        if stats is not None:
            print(f"{name}: {stats['samples']} samples, mean std {stats['mean_std']:.4f}, "
                  f"error-detection AUROC {stats.get('error_detection_auroc')}")
    return summary


def _ci_text(ci) -> str:
    return "" if not ci else f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def ece_change_sentence(summary: dict) -> str:
    """What temperature scaling did to the ECE, said only as far as the paired interval allows."""
    ci, change = summary.get("ece_change_ci95"), summary.get("ece_change")
    if summary.get("fit_split") is None or change is None:
        return "temperature not fitted: ECE reported at T = 1"
    shown = f"ECE {summary['ece_before']:.4f} -> {summary['ece_after']:.4f} (change {change:+.4f} {_ci_text(ci)})"
    if not ci:
        return f"{shown}: no interval (--bootstrap 0), so no claim either way"
    if ci[1] < 0:
        return f"{shown}: temperature scaling lowered the ECE (the paired 95% interval excludes 0)"
    if ci[0] > 0:
        return f"{shown}: temperature scaling raised the ECE on this split (the paired 95% interval excludes 0)"
    return f"{shown}: no change beyond noise (the paired 95% interval holds 0)"
