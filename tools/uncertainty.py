"""Predictive spread: MC-Dropout on the head and test-time augmentation (TTA).

MC-Dropout (Gal & Ghahramani 2016): the head's dropout stays active and the head is sampled T
times on backbone features computed once; BatchNorm stays in eval mode because the backbone is
not re-run. TTA: T mild, anatomy-preserving draws of each decoded image (small shift, scale,
rotation, brightness; no flip), one model pass each.
Both report, per (image, label) pair, the mean and standard deviation of the probability.
"""
from __future__ import annotations

import numpy as np

from tools import pipeline
from tools.calibration import calibration_report, error_detection_auroc
from tools.data import SeededAugment
from tools.engine import mc_dropout_logits
from tools.metrics import sigmoid


def mc_dropout_probs(run, model, features: np.ndarray, samples: int) -> np.ndarray:
    """(samples, N, L) probabilities from the sampled head."""
    return sigmoid(mc_dropout_logits(model, features, samples, run.args.seed, run.device))


def tta_probs(run, model, data, samples: int) -> np.ndarray:
    """(samples, N, L) probabilities, one model pass per augmentation draw."""
    out = []
    for t in range(samples):
        logits = pipeline.clean_pass(run, model, data, transform=SeededAugment(run.args.seed, stream=1, draw=t),
                                     desc=f"tta {t + 1}/{samples}")["logits"]
        out.append(sigmoid(logits))
    return np.stack(out)


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


def spread(run, model, data, features, y) -> tuple[dict | None, dict | None]:
    """(MC-Dropout, TTA) :func:`spread_stats` of ``data`` with the sample counts of
    ``--mc-samples`` / ``--tta-samples`` (None where 0). ``features``: the clean pass's backbone
    features (MC-Dropout samples the head on them); ``y``: labels, or None for unlabelled images."""
    args = run.args
    mc = tta = None
    if args.mc_samples > 0:
        mc = spread_stats(mc_dropout_probs(run, model, features, args.mc_samples), y, args.labels)
    if args.tta_samples > 0:
        tta = spread_stats(tta_probs(run, model, data, args.tta_samples), y, args.labels)
    return mc, tta


def spread_columns(label: str, j: int, mc: dict | None, tta: dict | None) -> dict:
    """Predictions-CSV columns of label ``label`` (column ``j``): ``<L>_mc_mean``, ``<L>_mc_std``,
    ``<L>_tta_mean``, ``<L>_tta_std`` for the spreads that were computed."""
    columns = {}
    for name, stats in (("mc", mc), ("tta", tta)):
        if stats is not None:
            columns[f"{label}_{name}_mean"], columns[f"{label}_{name}_std"] = stats["mean"][:, j], stats["std"][:, j]
    return columns


def public(stats: dict | None) -> dict | None:
    """The JSON part of spread_stats (without the per-pair arrays)."""
    return None if stats is None else {k: v for k, v in stats.items() if k not in ("mean", "std")}
