"""Figures of train and eval (training curves, ROC/PR, per-group bars, stress curves).
Each function takes data and a path, draws with the Agg backend and writes atomically."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tools.io import save_figure  # noqa: E402


def training_curves(log, labels, path) -> None:
    """Loss (train, val) and validation AUROC (macro and per label) against epoch."""
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(log["epoch"], log["train_loss"], "o-", label="train")
    ax_loss.plot(log["epoch"], log["val_loss"], "o-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="masked BCE loss", title="loss")
    ax_loss.legend()
    ax_auc.plot(log["epoch"], log["val_macro_auroc"], "o-", lw=2.5, color="k", label="macro")
    for label in labels:
        ax_auc.plot(log["epoch"], log[f"val_auroc_{label}"], ".--", label=label)
    ax_auc.set(xlabel="epoch", ylabel="AUROC", title="validation AUROC")
    ax_auc.legend(fontsize=8)
    save_figure(fig, path)


def roc_pr_curves(y, p, labels, roc_path, pr_path, title="") -> None:
    """One ROC and one precision-recall figure, a line per label (known rows only)."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    fig_roc, ax_roc = plt.subplots(figsize=(5, 5))
    fig_pr, ax_pr = plt.subplots(figsize=(5, 5))
    for j, label in enumerate(labels):
        known = ~np.isnan(y[:, j])
        yk, pk = y[known, j], p[known, j]
        if len(np.unique(yk)) < 2:
            continue
        fpr, tpr, _ = roc_curve(yk, pk)
        ax_roc.plot(fpr, tpr, label=label)
        precision, recall, _ = precision_recall_curve(yk, pk)
        ax_pr.step(recall, precision, where="post", label=f"{label} (prev {yk.mean():.2f})")
    ax_roc.plot([0, 1], [0, 1], ":", color="grey")
    ax_roc.axvline(0.05, color="grey", lw=0.7, ls="--")
    ax_roc.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC {title}".strip())
    ax_pr.set(xlabel="recall", ylabel="precision", title=f"precision-recall {title}".strip(), ylim=(0, 1.02))
    for ax in (ax_roc, ax_pr):
        ax.legend(fontsize=8)
    save_figure(fig_roc, roc_path)
    save_figure(fig_pr, pr_path)


def group_bars(result, labels, path, metric="auroc") -> None:
    """Per-group macro and per-label ``metric`` with 95% interval error bars; small groups hatched."""
    groups = list(result["groups"])
    series = ["macro"] + list(labels)
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(groups) * len(series) / 3), 4))
    for k, name in enumerate(series):
        values, lows, highs = [], [], []
        for g in groups:
            block = result["groups"][g]["macro"] if name == "macro" else result["groups"][g]["per_class"][name]
            v = block[metric]
            ci = (block.get("ci95") or {}).get(metric)
            values.append(np.nan if v is None else v)
            lows.append(0 if ci is None or v is None else v - ci[0])
            highs.append(0 if ci is None or v is None else ci[1] - v)
        x = np.arange(len(groups)) + (k - (len(series) - 1) / 2) * width
        bars = ax.bar(x, values, width, yerr=[lows, highs], capsize=3, label=name)
        for bar, g in zip(bars, groups):
            if result["groups"][g].get("small"):
                bar.set_hatch("//")
    names = [f"{g}\n(n={result['groups'][g]['n']})" for g in groups]
    ax.set_xticks(np.arange(len(groups)), names)
    ax.set(ylabel=metric, title=f"{metric} by {result['group_col']} (95% CI; hatched = small group)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, ncol=len(series))
    save_figure(fig, path)


def stress_curves(summary, labels, metric, path) -> None:
    """``metric`` against severity (0 = clean), a line per corruption: macro and one panel per label."""
    panels = [("macro", f"macro_{metric}")]
    if metric == "auroc":
        panels += [(lbl, f"auroc_{lbl}") for lbl in labels]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    clean = summary[summary["corruption"] == "clean"].iloc[0]
    for ax, (title, column) in zip(axes[0], panels):
        for name in [c for c in summary["corruption"].unique() if c != "clean"]:
            rows = summary[summary["corruption"] == name].sort_values("severity")
            ax.plot([0, *rows["severity"]], [clean[column], *rows[column]], "o-", label=name)
        ax.set(xlabel="severity (0 = clean)", ylabel=metric, title=title, xticks=[0, 1, 2, 3])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    save_figure(fig, path)
