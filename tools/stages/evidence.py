"""The evidence stage: what the data looks like, and how the model's decisions move with the
threshold, in files that other write-ups can link to (the tables, figures and Markdown of
run_evidence.py; its docstring lists them)."""
from __future__ import annotations

import json
import os
import re
import urllib.parse
from pathlib import Path

import numpy as np
import pandas as pd

from tools import figures
from tools.errors import UserError
from tools.files import NOTICE, write_csv, write_text
from tools.image_stats import brightness_stats, image_intensity
from tools.metrics import best_thresholds, sigmoid, threshold_sweep
from tools.predictions import read_logits, split_logits
from tools.runtime import Run
from tools.splits import SplitData
from tools.table import NO_SPLIT, prevalence, split_column

MONTAGE_MAX = 16


def prevalence_table(table: pd.DataFrame, labels) -> pd.DataFrame:
    """One row per (split, label): ``n`` = rows whose label is known (not NaN), ``n_pos`` = rows
    with label 1, ``prevalence`` = n_pos / n (NaN when n = 0); the last block is split "all"."""
    records = prevalence({label: table[label] for label in labels}, split_column(table))
    rows = [r for r in records if r["split"] not in ("all", NO_SPLIT)] + [r for r in records if r["split"] == "all"]
    return pd.DataFrame(rows, columns=["split", "label", "n", "n_pos", "prevalence"])


def file_part(name: str) -> str:
    """``name`` safe inside a file name: characters other than letters, digits, ``.-_`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(name)) or "_"


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


def metadata_columns(df: pd.DataFrame, labels, group_cols, k: int = 4) -> list[str]:
    """Columns for the montage titles: the group columns first, then other metadata (not the path,
    split, labels or patient id), ``k`` at most."""
    skip = {"image_path", "split", "patient_id", *labels}
    rest = [c for c in df.columns if c not in skip and c not in group_cols]
    return (list(group_cols) + rest)[:k]


# ====== markdown ======

def _fmt(value, spec=".3f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and not np.isfinite(value)) else format(value, spec)


def markdown_table(df: pd.DataFrame, floatfmt=".3f", numparse: bool = True) -> str:
    """A GitHub-style table; NaN shown as n/a; ``numparse=False`` keeps preformatted strings as given."""
    from tabulate import tabulate

    return tabulate(df.astype(object).where(df.notna(), None).values.tolist(), headers=list(df.columns),
                    tablefmt="github", floatfmt=floatfmt, missingval="n/a", disable_numparse=not numparse)


def data_summary_md(csv, labels, image_size: int, n_rows: int, prevalence: pd.DataFrame, stats: pd.DataFrame,
                    names: list[str]) -> str:
    lines = ["# Data evidence", "", f"_{NOTICE}_", "",
             f"Input: `{csv}` ({n_rows} rows), labels: {', '.join(labels)}.", "",
             "## Prevalence", "", "`n` counts rows whose label is known; prevalence = n_pos / n.", "",
             markdown_table(prevalence), "",
             "## Brightness", "",
             f"Per-image mean and standard deviation of intensity (0-255) of the {image_size} px letterboxed "
             "film, black padding excluded; then, per group, the mean and spread of those values.", "",
             markdown_table(stats, floatfmt=".2f"), ""]
    lines += [f"![{name}]({_link(name)})" for name in names]
    return "\n".join(lines) + "\n"


def model_summary_md(weights, split: str, n: int, best: list[dict], figure: str) -> str:
    rows = [{"label": b["label"], "n": b["n"], "n_pos": b["n_pos"],
             "best-F1 threshold": _fmt(b["best_threshold"], ".2f"), "F1": _fmt(b["best_f1"]),
             "sensitivity": _fmt(b["best_sensitivity"]), "specificity": _fmt(b["best_specificity"]),
             "F1 @0.5": _fmt(b["ref_f1"]), "sensitivity @0.5": _fmt(b["ref_sensitivity"]),
             "specificity @0.5": _fmt(b["ref_specificity"])} for b in best]
    return "\n".join([
        "# Model evidence", "", f"_{NOTICE}_", "",
        f"Checkpoint `{weights}` on split `{split}` ({n} rows). The decision is p >= threshold on the "
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
    lines = ["# Evidence index", "", f"_{NOTICE}_", "", "## Files written", ""]
    lines += [f"- [{relative_link(p, outdir)}]({_link(relative_link(p, outdir))}): {what}" for p, what in written]
    lines.append("")
    for folder in results:
        lines += results_section(Path(folder), outdir)
    return "\n".join(lines)


# ====== writing ======

def check_results_dirs(results) -> None:
    for folder in results:
        if not Path(folder).is_dir():
            raise UserError(f"--results {folder}: not a directory; pass output folders of eval, valtool, ...")


def write_data_evidence(run: Run, table: pd.DataFrame, data: SplitData, csv, labels, group_cols) -> tuple[list, dict]:
    """prevalence.csv, brightness_stats.csv, brightness_by_<C>.png, train_montage.png and
    data_summary.md; returns the (path, description) of each and the two tables."""
    outdir = run.outdir
    prevalence = prevalence_table(table, labels)
    written = [(write_csv(outdir / "prevalence.csv", prevalence), "label prevalence per split and overall")]
    intensity = image_intensity(data.store, len(data.df), data.image_size)
    stats = brightness_stats(data.df, intensity, group_cols)
    written.append((write_csv(outdir / "brightness_stats.csv", stats), "intensity statistics per group"))
    for col in group_cols:
        path = figures.brightness_figure(data.df, intensity, col, outdir / f"brightness_by_{file_part(col)}.png")
        written.append((path, f"intensity histograms by {col}"))
    rows, source = montage_rows(data.df, MONTAGE_MAX, run.seed)
    meta = metadata_columns(data.df, labels, group_cols)
    titles = [film_title(data.df.iloc[i], labels, meta) for i in rows]
    path = figures.montage_figure([data.store[i] for i in rows], titles, source, outdir / "train_montage.png")
    written.append((path, f"{len(rows)} films from the {source}"))
    names = [p.name for p, _ in written if p.suffix == ".png"]
    summary = data_summary_md(csv, labels, data.image_size, len(table), prevalence, stats, names)
    written.append((write_text(outdir / "data_summary.md", summary), "prevalence and brightness tables"))
    return written, {"prevalence": prevalence, "brightness": stats}


def write_model_evidence(run: Run, model, data: SplitData, split: str | None, csv, labels, weights,
                         predictions=None) -> tuple[list, dict]:
    """threshold_sweep.csv, f1_threshold_sweep.png and model_summary.md on ``split``'s rows of
    ``data``; returns the (path, description) of each, the sweep and the best thresholds."""
    outdir = run.outdir
    test = data.select(split, csv)
    split, n = test.name or "all", len(test.df)
    reuse = read_logits(predictions, labels)[0] if predictions else None
    probs = sigmoid(split_logits(run, model, test, reuse, labels, desc=split)["logits"])
    sweep = threshold_sweep(test.y, probs, labels)
    best = best_thresholds(sweep)
    written = [(write_csv(outdir / "threshold_sweep.csv", sweep),
                f"confusion counts and rates per threshold ({split})")]
    path = figures.sweep_figure(sweep, best, f"threshold sweep on {split} (n={n})", outdir / "f1_threshold_sweep.png")
    written.append((path, "F1, sensitivity, specificity against the threshold"))
    summary = model_summary_md(weights, split, n, best, path.name)
    written.append((write_text(outdir / "model_summary.md", summary), "best-F1 threshold per label against 0.5"))
    for b in best:
        print(f"{b['label']}: best F1 {_fmt(b['best_f1'])} at threshold {_fmt(b['best_threshold'], '.2f')} "
              f"(F1 at 0.5: {_fmt(b['ref_f1'])})")
    return written, {"sweep": sweep, "best": best}
