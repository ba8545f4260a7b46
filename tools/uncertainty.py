"""Predictive spread of sampled probabilities: MC-Dropout on the head (Gal & Ghahramani 2016) and
test-time augmentation. Per (image, label) pair the mean and standard deviation of the
probability over the samples, and how well the spread flags wrong decisions.
"""
from __future__ import annotations

import numpy as np

from tools.calibration import calibration_report, error_detection_auroc


def spread_stats(samples_probs: np.ndarray, y: np.ndarray | None, labels) -> dict:
    """Mean/std per pair and the summary: mean predictive std, calibration of the mean
    prediction, and how well the std flags wrong decisions at 0.5 (AUROC; 0.5 = chance)."""
    mean, std = samples_probs.mean(0), samples_probs.std(0)
    stats = {"samples": int(len(samples_probs)), "mean_std": float(std.mean()),
             "max_std": float(std.max()), "mean": mean, "std": std}
    if y is not None:
        report = calibration_report(mean, y, labels)
        stats.update(ece=report["ece"], nll=report["nll"], brier=report["brier"], auroc=report["auroc"],
                     error_detection_auroc=error_detection_auroc(std, mean, y),
                     per_class={lbl: {"mean_std": float(std[:, j].mean()),
                                      "error_detection_auroc": error_detection_auroc(std[:, j], mean[:, j], y[:, j])}
                                for j, lbl in enumerate(labels)})
    return stats


def public(stats: dict | None) -> dict | None:
    """The JSON part of spread_stats (without the per-pair arrays)."""
    return None if stats is None else {k: v for k, v in stats.items() if k not in ("mean", "std")}
