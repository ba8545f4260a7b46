#!/usr/bin/env python
"""Dataset and taxonomy evidence: what the data looks like, and (with --weights) how the model's
decisions move with the threshold, in files that other write-ups can link to.

Data evidence (every row of --csv, all splits):
  prevalence.csv          split, label, n (rows with the label known), n_pos, prevalence; an "all" split
  brightness_by_<C>.png   histograms of per-image mean and std intensity per group of column C
  brightness_stats.csv    group_col, group, n, mean_of_means, std_of_means, mean_of_stds
  train_montage.png       up to 16 train films with their labels and metadata
  data_summary.md         the two tables above, the figures inline

Model evidence (with --weights, on --split):
  threshold_sweep.csv     label, threshold (0.01 .. 0.99), tp, fp, tn, fn, sensitivity,
                          specificity, precision, f1
  f1_threshold_sweep.png  F1, sensitivity and specificity against the threshold, per label
  model_summary.md        per label: the F1-optimal threshold and its F1/sensitivity/specificity,
                          against the same at 0.5

INDEX.md links every file written and, for each --results DIR, lists its JSON/CSV/PNG files with
the macro AUROC of any metrics_*.json or summary.json found there.
Intensities are those of the decoded-image store (letterboxed to --image-size, 0-255), the
pixels the model sees. Research and education only; not for clinical use.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import urllib.parse
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from tools.cli import guarded
from tools.data import content_stats
from tools.errors import UserError

PROG = "run_evidence.py"
DEFAULT_GROUP_COLS = ("view", "site")
DEFAULT_IMAGE_SIZE = 224  # train's default, used when no checkpoint says otherwise
MONTAGE_MAX = 16
MAX_PLOTTED_GROUPS = 10  # the largest groups are drawn; brightness_stats.csv keeps every group
STAT_PIXELS = 1 << 22  # pixels per vectorised block of intensity statistics (~32 MB of float64)
# 0.01, 0.02, ..., 0.99: integer / 100 is the correctly rounded double, so 0.5 is exactly 0.5.
THRESHOLDS = np.arange(1, 100) / 100.0
REFERENCE_THRESHOLD = 0.5


# ====== parser ======

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in every flag's help; the description's file table kept as written."""


def build_parser() -> argparse.ArgumentParser:
    from main import common_parser

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     parents=[common_parser("outputs/taxonomy_evidence")],
                                     formatter_class=HelpFormatter)
    ev = parser.add_argument_group("evidence")
    ev.add_argument("--group-col", nargs="+", default=None,
                    help="metadata column(s) to compare brightness across (default: view and site when present)")
    ev.add_argument("--results", nargs="+", default=[], metavar="DIR",
                    help="other results folders (eval, valtool, ...) to list in INDEX.md")
    ev.add_argument("--predictions", nargs="+", default=None,
                    help="predictions_<split>.csv from eval: their logits are reused instead of a model pass")
    return parser


# ====== data evidence: prevalence ======

def prevalence_table(df: pd.DataFrame, labels) -> pd.DataFrame:
    """One row per (split, label): ``n`` = rows whose label is known (not NaN), ``n_pos`` = rows
    with label 1, ``prevalence`` = n_pos / n (NaN when n = 0); the last block is split "all"."""
    from tools.check_data import split_order

    rows = []
    names = split_order(df["split"].dropna().astype(str)) if "split" in df.columns else []
    blocks = [(s, df[df["split"].astype(str) == s]) for s in names] + [("all", df)]
    for split, part in blocks:
        for label in labels:
            values = part[label].to_numpy(dtype=float)
            n, n_pos = int(np.sum(~np.isnan(values))), int(np.nansum(values))
            rows.append({"split": split, "label": label, "n": n, "n_pos": n_pos,
                         "prevalence": n_pos / n if n else np.nan})
    return pd.DataFrame(rows, columns=["split", "label", "n", "n_pos", "prevalence"])


# ====== data evidence: intensity ======

def image_intensity(store, n: int, image_size: int) -> pd.DataFrame:
    """``mean_intensity`` and ``std_intensity`` (``tools.data.content_stats``) of rows 0..n-1 of a store,
    in blocks of about STAT_PIXELS pixels so memory stays bounded at any image size."""
    step = max(1, STAT_PIXELS // (image_size * image_size))
    means, stds = [np.zeros(0)], [np.zeros(0)]
    for start in range(0, n, step):
        m, s = content_stats(np.stack([store[i] for i in range(start, min(n, start + step))]))
        means.append(m)
        stds.append(s)
    return pd.DataFrame({"mean_intensity": np.concatenate(means), "std_intensity": np.concatenate(stds)})


def brightness_stats(df: pd.DataFrame, intensity: pd.DataFrame, group_cols) -> pd.DataFrame:
    """One row per group of each column (numeric columns with many values binned, missing values
    their own group, as in the group metrics), after an "all" row: ``n`` images, the mean and the
    sample standard deviation (ddof=1) of their mean intensities, the mean of their standard
    deviations. Images without content (all black) are left out of the averages, not of ``n``."""
    from tools.slicing import group_values

    def row(col, group, mask):
        m = intensity["mean_intensity"].to_numpy()[mask]
        s = intensity["std_intensity"].to_numpy()[mask]
        return {"group_col": col, "group": group, "n": int(mask.sum()),
                "mean_of_means": _nanmean(m), "std_of_means": _nanstd1(m), "mean_of_stds": _nanmean(s)}

    rows = [row("all", "all", np.ones(len(df), bool))]
    for col in group_cols:
        values, _ = group_values(df[col])
        for group in sorted(pd.unique(values), key=str):
            rows.append(row(col, str(group), values == group))
    return pd.DataFrame(rows, columns=["group_col", "group", "n", "mean_of_means", "std_of_means", "mean_of_stds"])


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if len(x) else np.nan


def _nanstd1(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.std(ddof=1)) if len(x) > 1 else np.nan


# ====== data evidence: figures ======

def file_part(name: str) -> str:
    """``name`` safe inside a file name: characters other than letters, digits, ``.-_`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(name)) or "_"


def brightness_figure(df: pd.DataFrame, intensity: pd.DataFrame, col: str, path) -> Path:
    """Two panels (mean and std intensity), one step histogram per group (density, common bins),
    the MAX_PLOTTED_GROUPS largest groups."""
    from matplotlib.figure import Figure

    from tools.io import save_figure
    from tools.slicing import group_values

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


def montage_rows(df: pd.DataFrame, k: int, seed: int) -> tuple[np.ndarray, str]:
    """Up to ``k`` row positions of the train split (all rows when there is none), drawn with
    ``seed`` and kept in table order, and a word on where they came from."""
    if "split" in df.columns and (df["split"].astype(str) == "train").any():
        pool, source = np.flatnonzero((df["split"].astype(str) == "train").to_numpy()), "train split"
    else:
        pool, source = np.arange(len(df)), "all rows (no train split)"
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(pool, size=min(k, len(pool)), replace=False)), source


def film_title(row: pd.Series, labels, meta_cols) -> str:
    """Three short lines: file name; positive labels (``L?`` when unknown, "no finding" when none);
    metadata ``col=value``."""
    findings = []
    for label in labels:
        v = row[label]
        if pd.isna(v):
            findings.append(f"{label}?")
        elif float(v) == 1.0:
            findings.append(label)
    meta = " ".join(f"{c}={row[c]}" for c in meta_cols if c in row.index and pd.notna(row[c]))
    return "\n".join([Path(str(row["image_path"])).name[:28], ", ".join(findings) or "no finding", meta[:40]])


def montage_figure(images, titles, source: str, path) -> Path:
    """A grid (4 wide) of letterboxed films with small titles."""
    from matplotlib.figure import Figure

    from tools.io import save_figure

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


def metadata_columns(df: pd.DataFrame, labels, group_cols, k: int = 4) -> list[str]:
    """Columns for the montage titles: the group columns first, then other metadata (not the path,
    split, labels or patient id), ``k`` at most."""
    skip = {"image_path", "split", "patient_id", *labels}
    rest = [c for c in df.columns if c not in skip and c not in group_cols]
    return (list(group_cols) + rest)[:k]


# ====== model evidence ======

def threshold_sweep(y: np.ndarray, p: np.ndarray, labels, thresholds=THRESHOLDS) -> pd.DataFrame:
    """Confusion counts and rates of the decision ``p >= t`` for every threshold t, per label, on
    the rows whose label is known. Sensitivity = tp/(tp+fn), specificity = tn/(tn+fp), precision
    = tp/(tp+fp), F1 = 2tp/(2tp+fp+fn); each NaN when its denominator is 0.

    Vectorised over thresholds: with the scores of each class sorted, the count of scores >= t is
    the class size minus ``searchsorted(sorted, t, side="left")``."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    t = np.asarray(thresholds, float)
    frames = []
    for j, label in enumerate(labels):
        known = ~np.isnan(y[:, j])
        pos, neg = np.sort(p[known & (y[:, j] == 1), j]), np.sort(p[known & (y[:, j] == 0), j])
        tp = len(pos) - np.searchsorted(pos, t, side="left")
        fp = len(neg) - np.searchsorted(neg, t, side="left")
        fn, tn = len(pos) - tp, len(neg) - fp
        frames.append(pd.DataFrame({"label": label, "threshold": t, "tp": tp, "fp": fp, "tn": tn, "fn": fn,
                                    "sensitivity": _ratio(tp, tp + fn), "specificity": _ratio(tn, tn + fp),
                                    "precision": _ratio(tp, tp + fp), "f1": _ratio(2 * tp, 2 * tp + fp + fn)}))
    return pd.concat(frames, ignore_index=True)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, float), np.asarray(den, float)
    return np.divide(num, den, out=np.full(num.shape, np.nan), where=den > 0)


def best_thresholds(sweep: pd.DataFrame, reference: float = REFERENCE_THRESHOLD) -> list[dict]:
    """Per label: the threshold of the highest F1 (the lowest such threshold on ties; None when F1
    is undefined everywhere) with its F1, sensitivity and specificity, and the same at ``reference``."""
    out = []
    for label, block in sweep.groupby("label", sort=False):
        f1 = block["f1"].to_numpy()
        best = block.iloc[int(np.nanargmax(f1))] if np.isfinite(f1).any() else None
        ref = block[np.isclose(block["threshold"], reference)]
        ref = ref.iloc[0] if len(ref) else None
        pick = lambda r, k: None if r is None else float(r[k])  # noqa: E731
        first = block.iloc[0]  # every row holds the same known rows, split differently
        out.append({"label": label, "n": int(first[["tp", "fp", "tn", "fn"]].sum()),
                    "n_pos": int(first["tp"] + first["fn"]),
                    "best_threshold": pick(best, "threshold"), "best_f1": pick(best, "f1"),
                    "best_sensitivity": pick(best, "sensitivity"), "best_specificity": pick(best, "specificity"),
                    "ref_f1": pick(ref, "f1"), "ref_sensitivity": pick(ref, "sensitivity"),
                    "ref_specificity": pick(ref, "specificity")})
    return out


def sweep_figure(sweep: pd.DataFrame, best: list[dict], title: str, path) -> Path:
    """One panel per label: F1, sensitivity, specificity against the threshold; the F1-optimal
    threshold marked (dashed), 0.5 dotted."""
    from matplotlib.figure import Figure

    from tools.io import save_figure

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


# ====== markdown ======

def _fmt(value, spec=".3f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and not np.isfinite(value)) else format(value, spec)


def markdown_table(df: pd.DataFrame, floatfmt=".3f", numparse: bool = True) -> str:
    """A GitHub-style table; NaN shown as n/a; ``numparse=False`` keeps preformatted strings as given."""
    from tabulate import tabulate

    return tabulate(df.astype(object).where(df.notna(), None).values.tolist(), headers=list(df.columns),
                    tablefmt="github", floatfmt=floatfmt, missingval="n/a", disable_numparse=not numparse)


def data_summary_md(args, n_rows: int, prevalence: pd.DataFrame, stats: pd.DataFrame, figures: list[str]) -> str:
    from tools.io import NOTICE

    lines = ["# Data evidence", "", f"_{NOTICE}_", "",
             f"Input: `{args.csv}` ({n_rows} rows), labels: {', '.join(args.labels)}.", "",
             "## Prevalence", "", "`n` counts rows whose label is known; prevalence = n_pos / n.", "",
             markdown_table(prevalence), "",
             "## Brightness", "",
             f"Per-image mean and standard deviation of intensity (0-255) of the {args.image_size} px letterboxed "
             "film, black padding excluded; then, per group, the mean and spread of those values.", "",
             markdown_table(stats, floatfmt=".2f"), ""]
    lines += [f"![{name}]({_link(name)})" for name in figures]
    return "\n".join(lines) + "\n"


def model_summary_md(args, split: str, n: int, best: list[dict], figure: str) -> str:
    from tools.io import NOTICE

    rows = [{"label": b["label"], "n": b["n"], "n_pos": b["n_pos"],
             "best-F1 threshold": _fmt(b["best_threshold"], ".2f"), "F1": _fmt(b["best_f1"]),
             "sensitivity": _fmt(b["best_sensitivity"]), "specificity": _fmt(b["best_specificity"]),
             "F1 @0.5": _fmt(b["ref_f1"]), "sensitivity @0.5": _fmt(b["ref_sensitivity"]),
             "specificity @0.5": _fmt(b["ref_specificity"])} for b in best]
    return "\n".join([
        "# Model evidence", "", f"_{NOTICE}_", "",
        f"Checkpoint `{args.weights}` on split `{split}` ({n} rows). The decision is p >= threshold on the "
        "sigmoid probability; thresholds 0.01 to 0.99 in steps of 0.01 (threshold_sweep.csv). The best-F1 "
        "threshold is chosen on this same split, so its F1 is optimistic for new data.", "",
        markdown_table(pd.DataFrame(rows), numparse=False), "", f"![{figure}]({_link(figure)})", ""])


def _link(target: str) -> str:
    """A Markdown link target: percent-encoded so spaces and brackets do not break the link."""
    return urllib.parse.quote(target)


def relative_link(path: Path, start: Path) -> str:
    """``path`` relative to ``start`` (POSIX separators), or absolute when no relative path exists."""
    try:
        return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()
    except ValueError:  # another drive on Windows
        return Path(path).resolve().as_posix()


def headline_auroc(obj) -> float | None:
    """Macro AUROC of a metrics-schema JSON (``macro.auroc``) or of a valtool summary
    (``headline.macro.auroc``); None when absent or null."""
    for block in (obj, (obj or {}).get("headline") if isinstance(obj, dict) else None):
        if isinstance(block, dict) and isinstance(block.get("macro"), dict) and "auroc" in block["macro"]:
            value = block["macro"]["auroc"]
            return float(value) if isinstance(value, (int, float)) else None
    return None


def results_section(folder: Path, outdir: Path) -> list[str]:
    """Markdown lines for one --results folder: headline macro AUROC of each metrics_*.json /
    summary.json in it (searched recursively), then a link to each JSON/CSV/PNG file."""
    import json

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in (".json", ".csv", ".png")
                   and not p.name.startswith("."))
    lines = [f"## Results: `{folder}`", ""]
    for p in files:
        if p.name == "summary.json" or (p.name.startswith("metrics_") and p.suffix == ".json"):
            name = p.relative_to(folder).as_posix()
            try:
                value = _fmt(headline_auroc(json.loads(p.read_text())))
            except (OSError, ValueError):
                value = "unreadable JSON"
            lines.append(f"- headline macro AUROC ({name}): {value}")
    if len(lines) > 2:
        lines.append("")
    if not files:
        lines.append("No JSON, CSV or PNG files found.")
    for p in files:
        lines.append(f"- [{p.relative_to(folder).as_posix()}]({_link(relative_link(p, outdir))})")
    return lines + [""]


def index_md(outdir: Path, written: list[tuple[Path, str]], results) -> str:
    """INDEX.md: the notice, a link and a line per file written, then a section per --results folder."""
    from tools.io import NOTICE

    lines = ["# Evidence index", "", f"_{NOTICE}_", "", "## Files written", ""]
    lines += [f"- [{relative_link(p, outdir)}]({_link(relative_link(p, outdir))}): {what}" for p, what in written]
    lines.append("")
    for folder in results:
        lines += results_section(Path(folder), outdir)
    return "\n".join(lines)


# ====== main ======

def subset_split(data, split: str | None, csv):
    """The rows of ``split`` from already-loaded data (pixels reused, not decoded again); all rows
    when there is no split column, as ``tools.data.select_split`` does (which also gives the error
    for a split without rows)."""
    from tools.data import select_split

    if split is None or "split" not in data.df.columns:
        return replace(data, name=None)  # reported as "all"
    select_split(data.df, split, csv)
    keep = np.flatnonzero((data.df["split"].astype(str) == split).to_numpy())
    return replace(data.subset(keep), name=split)


def check_results_dirs(results) -> None:
    for folder in results:
        if not Path(folder).is_dir():
            raise UserError(f"--results {folder}: not a directory; pass output folders of eval, valtool, ...")


def write_data_evidence(run, table: pd.DataFrame, data) -> tuple[list, dict]:
    """prevalence.csv, brightness_stats.csv, brightness_by_<C>.png, train_montage.png and
    data_summary.md; returns the (path, description) of each and the two tables."""
    from tools.io import write_csv, write_text

    args, outdir = run.args, run.outdir
    prevalence = prevalence_table(table, args.labels)
    written = [(write_csv(outdir / "prevalence.csv", prevalence), "label prevalence per split and overall")]
    intensity = image_intensity(data.store, len(data.df), args.image_size)
    stats = brightness_stats(data.df, intensity, args.group_col)
    written.append((write_csv(outdir / "brightness_stats.csv", stats), "intensity statistics per group"))
    for col in args.group_col:
        path = brightness_figure(data.df, intensity, col, outdir / f"brightness_by_{file_part(col)}.png")
        written.append((path, f"intensity histograms by {col}"))
    rows, source = montage_rows(data.df, MONTAGE_MAX, args.seed)
    meta = metadata_columns(data.df, args.labels, args.group_col)
    titles = [film_title(data.df.iloc[i], args.labels, meta) for i in rows]
    path = montage_figure([data.store[i] for i in rows], titles, source, outdir / "train_montage.png")
    written.append((path, f"{len(rows)} films from the {source}"))
    figures = [p.name for p, _ in written if p.suffix == ".png"]
    summary = data_summary_md(args, len(table), prevalence, stats, figures)
    written.append((write_text(outdir / "data_summary.md", summary), "prevalence and brightness tables"))
    return written, {"prevalence": prevalence, "brightness": stats}


def write_model_evidence(run, model, data) -> tuple[list, dict]:
    """threshold_sweep.csv, f1_threshold_sweep.png and model_summary.md on --split's rows of
    ``data``; returns the (path, description) of each, the sweep and the best thresholds."""
    from tools import pipeline
    from tools.io import write_csv, write_text
    from tools.metrics import sigmoid

    args, outdir = run.args, run.outdir
    test = subset_split(data, args.split, args.csv)
    split, n = test.name or "all", len(test.df)
    probs = sigmoid(pipeline.split_logits(run, model, test, desc=split)["logits"])
    sweep = threshold_sweep(test.y, probs, args.labels)
    best = best_thresholds(sweep)
    written = [(write_csv(outdir / "threshold_sweep.csv", sweep),
                f"confusion counts and rates per threshold ({split})")]
    path = sweep_figure(sweep, best, f"threshold sweep on {split} (n={n})", outdir / "f1_threshold_sweep.png")
    written.append((path, "F1, sensitivity, specificity against the threshold"))
    summary = model_summary_md(args, split, n, best, path.name)
    written.append((write_text(outdir / "model_summary.md", summary), "best-F1 threshold per label against 0.5"))
    for b in best:
        print(f"{b['label']}: best F1 {_fmt(b['best_f1'])} at threshold {_fmt(b['best_threshold'], '.2f')} "
              f"(F1 at 0.5: {_fmt(b['ref_f1'])})")
    return written, {"sweep": sweep, "best": best}


def run_evidence(args) -> dict:
    from tools import pipeline
    from tools.data import DEFAULT_LABELS, select_split
    from tools.io import write_text

    # ====== run set-up: every user mistake found before any decoding ======
    args.command = PROG
    if not args.csv:
        raise UserError("--csv is required: pass the input CSV (image_path, label columns, optional split)")
    check_results_dirs(args.results)
    if not args.weights:
        args.labels = args.labels or list(DEFAULT_LABELS)
        args.image_size = args.image_size or DEFAULT_IMAGE_SIZE
    run = pipeline.start_run(args)
    model = pipeline.load_checkpoint_model(run)[0] if args.weights else None
    table = pipeline.read_input_table(args)
    if args.group_col is None:
        args.group_col = [c for c in DEFAULT_GROUP_COLS if c in table.columns]
    if model is not None:
        select_split(table, args.split, args.csv)
    run.config(group_cols=list(args.group_col))

    # ====== data evidence on every row (pixels decoded once), model evidence on --split ======
    data = pipeline.load_split(run, table, None)
    written = [(run.outdir / "config.json", "arguments, versions, seed, device, checkpoint")]
    files, result = write_data_evidence(run, table, data)
    written += files
    if model is not None:
        files, model_result = write_model_evidence(run, model, data)
        written += files
        result.update(model_result)

    # ====== index ======
    write_text(run.outdir / "INDEX.md", index_md(run.outdir, written, args.results))
    print(f"{PROG}: {len(written) + 1} files -> {run.outdir / 'INDEX.md'}")
    return result


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
    return guarded(PROG, run_evidence, args, args.outdir)


if __name__ == "__main__":
    sys.exit(main())
