"""Every figure the suite draws, in one style: a ``matplotlib.figure.Figure`` per function (no
pyplot, no global backend switch), written atomically by :func:`save_figure`. Each function
takes data and a path; the numbers it shows come from the analysis modules.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from tools.corruptions import FAMILIES, apply_corruption, param_label
from tools.files import atomic_path
from tools.findings import p_text
from tools.calibration import N_BINS, ece, reliability_bins
from tools.gradcam import overlay
from tools.metrics import REFERENCE_THRESHOLD
from tools.selective import aurc_from_curve, thin_curve
from tools.slicing import group_values

MAX_PLOTTED_GROUPS = 10  # the largest groups are drawn; the CSV beside a figure keeps every group
MAX_COMPARE_ROWS = 40  # beyond this a comparison figure keeps only the groups' macro rows
MAX_CATEGORIES = 8  # categories drawn per image property (the most common); the CSV tests them all


def save_figure(fig: Figure, path, dpi: int = 110) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    return Path(path)


# ====== train and eval ======

def training_curves(log, labels, path) -> Path:
    """Loss (train, val) and validation AUROC (macro and per label) against epoch."""
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_auc = fig.subplots(1, 2)
    ax_loss.plot(log["epoch"], log["train_loss"], "o-", label="train")
    ax_loss.plot(log["epoch"], log["val_loss"], "o-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="masked BCE loss", title="loss")
    ax_loss.legend()
    ax_auc.plot(log["epoch"], log["val_macro_auroc"], "o-", lw=2.5, color="k", label="macro")
    for label in labels:
        ax_auc.plot(log["epoch"], log[f"val_auroc_{label}"], ".--", label=label)
    ax_auc.set(xlabel="epoch", ylabel="AUROC", title="validation AUROC")
    ax_auc.legend(fontsize=8)
    return save_figure(fig, path)


def roc_pr_curves(y, p, labels, roc_path, pr_path, title="") -> None:
    """One ROC and one precision-recall figure, a line per label (known rows only)."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    fig_roc, fig_pr = Figure(figsize=(5, 5)), Figure(figsize=(5, 5))
    ax_roc, ax_pr = fig_roc.subplots(), fig_pr.subplots()
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
    # fixed corners where these curves seldom run: matplotlib's "best" placement tests every
    # point of every line, seconds on curves of 100,000 films
    ax_roc.legend(fontsize=8, loc="lower right")
    ax_pr.legend(fontsize=8, loc="lower left")
    save_figure(fig_roc, roc_path)
    save_figure(fig_pr, pr_path)


def group_bars(result, labels, path, metric="auroc") -> Path:
    """Per-group macro and per-label ``metric`` with 95% interval error bars; small groups hatched."""
    groups = list(result["groups"])
    series = ["macro"] + list(labels)
    width = 0.8 / len(series)
    fig = Figure(figsize=(max(5, 1.6 * len(groups) * len(series) / 3), 4))
    ax = fig.subplots()
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
    return save_figure(fig, path)


# ====== stress ======

def stress_curves(summary, labels, metric, path) -> Path:
    """``metric`` against severity (0 = clean), a line per corruption: macro and one panel per label."""
    panels = [("macro", f"macro_{metric}")]
    if metric == "auroc":
        panels += [(lbl, f"auroc_{lbl}") for lbl in labels]
    fig = Figure(figsize=(4 * len(panels), 3.6))
    axes = fig.subplots(1, len(panels), squeeze=False)
    clean = summary[summary["corruption"] == "clean"].iloc[0]
    for ax, (title, column) in zip(axes[0], panels):
        for name in [c for c in summary["corruption"].unique() if c != "clean"]:
            rows = summary[summary["corruption"] == name].sort_values("severity")
            ax.plot([0, *rows["severity"]], [clean[column], *rows[column]], "o-", label=name)
        ax.set(xlabel="severity (0 = clean)", ylabel=metric, title=title, xticks=[0, 1, 2, 3])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return save_figure(fig, path)


def plot_corruption_examples(image: np.ndarray, out_path, seed: int = 0, title: str | None = None,
                             names=FAMILIES["default"]) -> Path:
    """One figure: a row per corruption of ``names``, the clean image first, then severities 1-3.

    Each panel is titled with the corruption and its parameter. Written atomically.
    """
    names = list(names)
    fig = Figure(figsize=(10, 2.6 * len(names)))
    axes = fig.subplots(len(names), 4, squeeze=False)
    for row, name in enumerate(names):
        panels = [(image, "clean")] + [
            (apply_corruption(image, name, sev, seed), f"{name} sev{sev}\n{param_label(name, sev)}")
            for sev in (1, 2, 3)
        ]
        for ax, (panel, label) in zip(axes[row], panels):
            ax.imshow(panel, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            ax.set_title(label, fontsize=9)
            ax.set_axis_off()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, out_path)


# ====== calibration and selective prediction ======

def plot_reliability(probs, y, out_path, title, n_bins=N_BINS):
    """Reliability diagram of ``probs`` against ``y`` (known pairs pooled), written to ``out_path``.

    Top: observed positive rate against mean prediction per bin, the diagonal of perfect
    calibration and the gap between them shaded; the ECE is in the title. Bottom: pairs per bin
    (log scale). Written atomically (:func:`save_figure`).
    """
    bins = reliability_bins(probs, y, n_bins)
    value = ece(probs, y, n_bins)
    edges, count = bins["edges"], bins["count"]
    filled = count > 0

    fig = Figure(figsize=(5.5, 6.5))
    ax, ax_hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    if filled.any():
        x, obs = bins["mean_pred"][filled], bins["frac_pos"][filled]
        ax.fill_between(x, obs, x, color="tab:red", alpha=0.25, label="gap")
        ax.plot(x, obs, marker="o", color="tab:blue", label="observed")
    else:
        ax.text(0.5, 0.5, "no known (image, label) pairs", ha="center", va="center")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="observed positive rate")
    ece_text = "n/a" if np.isnan(value) else f"{value:.4f}"
    ax.set_title(f"{title} (ECE = {ece_text}, {n_bins} bins)")
    ax.legend(loc="upper left")

    ax_hist.bar(edges[:-1], count, width=np.diff(edges), align="edge",
                color="tab:blue", edgecolor="white")
    if filled.any():
        ax_hist.set_yscale("log")
    ax_hist.set(xlabel="mean predicted probability", ylabel="pairs per bin")
    save_figure(fig, out_path)


def plot_risk_coverage(curves, out_path, title, oracle=None, random_risk=None):
    """Risk-coverage figure: one line per confidence signal, AURC in the legend.

    ``curves`` maps a signal name to its full ``risk_coverage`` frame (the AURC is computed from it;
    the line drawn is its ``thin_curve``); ``oracle`` (an ``oracle_curve``
    frame) is drawn dashed, and ``random_risk`` (the full-coverage risk, which a random ranking
    achieves at every coverage in expectation) as a horizontal line. Written atomically
    (:func:`save_figure`).
    """
    fig = Figure(figsize=(6, 4.5))
    ax = fig.subplots()
    for name, curve in curves.items():
        drawn = thin_curve(curve)
        ax.plot(drawn["coverage"], drawn["risk"],
                label=f"{name} (AURC {aurc_from_curve(curve):.4f})")
    if oracle is not None and len(oracle):
        drawn = thin_curve(oracle)
        ax.plot(drawn["coverage"], drawn["risk"], linestyle="--", color="black",
                label=f"oracle (AURC {aurc_from_curve(oracle):.4f})")
    if random_risk is not None and np.isfinite(random_risk):
        ax.axhline(random_risk, linestyle=":", color="grey",
                   label=f"random (AURC {random_risk:.4f})")
    ax.set(xlim=(0, 1), xlabel="coverage", ylabel="risk (error rate of kept decisions)",
           title=title)
    ax.set_ylim(bottom=0)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left")
    save_figure(fig, out_path)


# ====== case studies ======

def panel_text(panel, labels, label, truth: dict, clean_prob: float | None) -> str:
    """One line per label: probability and ground truth; the case label marked, with the drop
    from the clean probability on corrupted panels."""
    lines = [panel.name, ""]
    for j, lbl in enumerate(labels):
        mark = ">" if lbl == label else " "
        t = truth.get(lbl)
        line = f"{mark} {lbl:<13.13s} p={panel.probs[j]:.3f}  label={'?' if t is None else int(t)}"
        if lbl == label and clean_prob is not None:
            line += f"\n  {clean_prob:.3f} -> {panel.probs[j]:.3f} (drop {clean_prob - panel.probs[j]:+.3f})"
        lines.append(line)
    return "\n".join(lines)


def case_figure(panels, labels, label, truth: dict, title: str, path) -> Path:
    """A row per panel: the film, the Grad-CAM overlay of ``label``, the probabilities."""
    fig = Figure(figsize=(11, 3.6 * len(panels)))
    axes = fig.subplots(len(panels), 3, squeeze=False)
    clean = panels[0].probs[labels.index(label)]
    for row, panel in enumerate(panels):
        film, cam, text = axes[row]
        film.imshow(panel.image, cmap="gray", vmin=0, vmax=255)
        film.set_title(panel.name, fontsize=9)
        cam.imshow(overlay(panel.image, panel.heat))
        # An all-zero map (no positive evidence) would otherwise look like a uniformly "cold" film.
        cam.set_title(f"Grad-CAM: {label}" + ("" if panel.heat.any() else " (no positive evidence)"), fontsize=9)
        text.text(0.0, 0.95, panel_text(panel, labels, label, truth, clean if row else None),
                  va="top", ha="left", family="monospace", fontsize=8, transform=text.transAxes)
        for ax in (film, cam, text):
            ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


# ====== evidence ======

def brightness_figure(df: pd.DataFrame, intensity: pd.DataFrame, col: str, path) -> Path:
    """Two panels (mean and std intensity), one step histogram per group (density, common bins),
    the MAX_PLOTTED_GROUPS largest groups."""
    values, _ = group_values(df[col])
    counts = pd.Series(values).value_counts()
    groups = sorted(counts.index[:MAX_PLOTTED_GROUPS], key=str)
    fig = Figure(figsize=(10, 3.8))
    axes = fig.subplots(1, 2)
    for ax, key, name in zip(axes, ("mean_intensity", "std_intensity"), ("mean", "standard deviation")):
        x = intensity[key].to_numpy()
        finite = x[np.isfinite(x)]
        bins = np.histogram_bin_edges(finite, bins=30) if len(finite) else 30
        for group in groups:
            g = x[(values == group) & np.isfinite(x)]
            if len(g):
                ax.hist(g, bins=bins, histtype="step", density=True, lw=1.5, label=f"{group} (n={len(g)})")
        ax.set(xlabel=f"per-image {name} intensity (0-255, padding excluded)", ylabel="density")
        ax.legend(fontsize=7)
    shown = "" if len(counts) <= MAX_PLOTTED_GROUPS else f" ({MAX_PLOTTED_GROUPS} largest of {len(counts)} groups)"
    fig.suptitle(f"intensity by {col}{shown}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def montage_figure(images, titles, source: str, path) -> Path:
    """A grid (4 wide) of letterboxed films with small titles."""
    n = max(1, len(images))
    ncol = min(4, n)
    nrow = -(-n // ncol)
    fig = Figure(figsize=(2.4 * ncol, 2.7 * nrow))
    axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False).ravel())
    for ax in axes:
        ax.set_axis_off()
    for ax, image, title in zip(axes, images, titles):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=6)
    fig.suptitle(f"{len(images)} films from the {source}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def sweep_figure(sweep: pd.DataFrame, best: list[dict], title: str, path) -> Path:
    """One panel per label: F1, sensitivity, specificity against the threshold; the F1-optimal
    threshold marked (dashed), 0.5 dotted."""
    fig = Figure(figsize=(4.2 * len(best), 3.8))
    axes = np.atleast_1d(fig.subplots(1, len(best), squeeze=False).ravel())
    for ax, b in zip(axes, best):
        block = sweep[sweep["label"] == b["label"]]
        for key in ("f1", "sensitivity", "specificity"):
            ax.plot(block["threshold"], block[key], lw=2 if key == "f1" else 1.2, label=key)
        ax.axvline(REFERENCE_THRESHOLD, color="grey", ls=":", lw=1)
        if b["best_threshold"] is not None:
            ax.axvline(b["best_threshold"], color="k", ls="--", lw=1)
            ax.plot([b["best_threshold"]], [b["best_f1"]], "k*", ms=10,
                    label=f"best F1 {b['best_f1']:.3f} @ {b['best_threshold']:.2f}")
        ax.set(xlabel="threshold on p", ylim=(-0.02, 1.02), title=f"{b['label']} (n={b['n']}, pos={b['n_pos']})")
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


# ====== model comparison ======

def _compare_rows(table: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, list[str]]:
    """The rows of ``metric`` to draw, top to bottom (macro first in each block), and their names;
    groups keep only their macro rows when there are more than MAX_COMPARE_ROWS rows."""
    rows = table[table["metric"] == metric]
    blocks = [pd.concat([b[b["label"] == "macro"], b[b["label"] != "macro"]])
              for _, b in rows.groupby(["group_col", "group"], sort=False, dropna=False)]
    rows = pd.concat(blocks) if blocks else rows
    if len(rows) > MAX_COMPARE_ROWS:
        rows = rows[(rows["scope"] != "group") | (rows["label"] == "macro")]
    rows = rows.head(MAX_COMPARE_ROWS)
    names = [r.label if r.scope != "group" else f"{r.group_col}={r.group}: {r.label}" for r in rows.itertuples()]
    return rows, names


def compare_figure(table: pd.DataFrame, metric: str, path) -> Path:
    """B - A of ``metric`` per row of a comparison table (:func:`tools.compare.compare_table`):
    a point at the difference with its 95% interval, filled where the Holm-adjusted p < 0.05.
    At most MAX_COMPARE_ROWS rows; the table itself keeps every row."""
    rows, names = _compare_rows(table, metric)
    n_all = int((table["metric"] == metric).sum())
    pos = np.arange(len(rows))
    diff, low, high = (rows[k].to_numpy(float) for k in ("diff", "ci_low", "ci_high"))
    fig = Figure(figsize=(7, 1.2 + 0.3 * max(1, len(rows))))
    ax = fig.subplots()
    ax.axvline(0, color="grey", lw=1)
    ci = np.isfinite(low) & np.isfinite(high) & np.isfinite(diff)
    # drawn as segments: a percentile interval need not contain the point estimate (bounded metrics)
    ax.hlines(pos[ci], low[ci], high[ci], color="tab:blue", lw=1.5)
    filled = rows["p_holm"].to_numpy(float) < 0.05
    ax.plot(diff[filled], pos[filled], "o", color="tab:blue", label="Holm p < 0.05")
    ax.plot(diff[~filled], pos[~filled], "o", color="tab:blue", mfc="white", label="not significant")
    ax.set_yticks(pos, names, fontsize=8)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    shown = "" if len(rows) == n_all else f" ({len(rows)} of {n_all} rows drawn)"
    ax.set(xlabel=f"{metric} of B - {metric} of A{shown}", title=f"B - A: {metric} (95% paired bootstrap)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path)


# ====== a new site against the reference ======


def property_drift_figure(reference: pd.DataFrame, new: pd.DataFrame, table: pd.DataFrame, path) -> Path:
    """One panel per tested property: the two samples' distributions (density histograms on
    common bins for a number, shares of the most common values for a category), titled with the
    distance and p-value of ``tools.drift.property_drift``'s ``table``."""
    from tools.drift import categories  # the categories the table's test counted
    rows = list(table.itertuples(index=False))
    ncol = min(3, max(1, len(rows)))
    nrow = max(1, -(-len(rows) // ncol))
    fig = Figure(figsize=(4.2 * ncol, 3.2 * nrow))
    axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False).ravel())
    for ax in axes[len(rows):]:
        ax.set_axis_off()
    sides = (("reference", reference, "tab:blue"), ("new site", new, "tab:orange"))
    for ax, row in zip(axes, rows):
        if row.kind == "numeric":
            pooled = pd.concat([reference[row.property], new[row.property]]).dropna().to_numpy(float)
            bins = np.histogram_bin_edges(pooled, bins=20) if len(pooled) else 20
            for name, frame, colour in sides:
                values = frame[row.property].dropna().to_numpy(float)
                ax.hist(values, bins=bins, density=True, histtype="stepfilled", alpha=0.45, color=colour,
                        label=f"{name} (n={len(values)})")
            ax.set(xlabel=row.property, ylabel="density")
        else:
            shares = [categories(frame[row.property]).value_counts(normalize=True) for _, frame, _ in sides]
            shown = (shares[0].add(shares[1], fill_value=0).sort_values(ascending=False).index[:MAX_CATEGORIES])
            x = np.arange(len(shown))
            for k, ((name, frame, colour), share) in enumerate(zip(sides, shares)):
                ax.bar(x + (k - 0.5) * 0.4, share.reindex(shown, fill_value=0).to_numpy(), width=0.4, color=colour,
                       label=f"{name} (n={len(frame)})")
            ax.set_xticks(x, [str(v)[:10] for v in shown], fontsize=7, rotation=30)
            ax.set(ylabel="share of films", xlabel=row.property)
        distance = "n/a" if pd.isna(row.distance) else f"{row.distance:.2f}"
        ax.set_title(f"{row.property}: {row.statistic} distance {distance}, p {p_text(row.p_value)}", fontsize=8)
        ax.legend(fontsize=6)
    fig.suptitle("image properties: reference against new site", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def prediction_drift_figure(table: pd.DataFrame, path) -> Path:
    """Per label: mean predicted probability on the reference and the new site (left), and the
    difference with its 95% interval (right; 0 = no shift)."""
    labels = table["label"].tolist()
    y = np.arange(len(labels))
    fig = Figure(figsize=(9, 0.6 * len(labels) + 1.8))
    left, right = fig.subplots(1, 2)
    left.barh(y + 0.2, table["reference_mean_prob"], height=0.4, color="tab:blue", label="reference")
    left.barh(y - 0.2, table["new_mean_prob"], height=0.4, color="tab:orange", label="new site")
    left.set(yticks=y, yticklabels=labels, xlim=(0, 1), xlabel="mean predicted probability")
    left.legend(fontsize=7)
    diff = table["difference"].to_numpy(float)
    lo, hi = table["ci_low"].to_numpy(float), table["ci_high"].to_numpy(float)
    err = np.where(np.isfinite(lo), [diff - lo, hi - diff], 0.0)
    right.errorbar(diff, y, xerr=err, fmt="o", color="black", capsize=3)
    right.axvline(0, color="grey", lw=1, ls="--")
    right.set(yticks=y, yticklabels=labels, xlabel="new minus reference (95% interval)")
    fig.suptitle("predicted prevalence: reference against new site", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def ood_figure(reference_scores, new_scores, threshold: float, path) -> Path:
    """Distances to the reference: the reference's own (out of sample) and the new films', with
    the threshold new films are flagged at."""
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.subplots()
    pooled = np.r_[reference_scores, new_scores]
    bins = np.histogram_bin_edges(pooled[np.isfinite(pooled)], bins=30)
    ax.hist(reference_scores, bins=bins, density=True, alpha=0.45, color="tab:blue",
            label=f"reference, out of sample (n={len(reference_scores)})")
    ax.hist(new_scores, bins=bins, density=True, alpha=0.45, color="tab:orange", label=f"new site (n={len(new_scores)})")
    ax.axvline(threshold, color="black", ls="--", lw=1, label=f"threshold {threshold:.1f}")
    ax.set(xlabel="Mahalanobis distance to the reference (shrunk covariance)", ylabel="density")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
