#!/usr/bin/env python
"""Case-study figures from a predictions CSV written by `main.py eval`.

Three studies of one finding (--label, default Effusion), each shown as the film, a Grad-CAM
overlay of that finding and the model's probabilities for every label:

  case_clean_pa.png   a PA study with the finding present that the model calls positive (p >= 0.5),
                      the one with the highest probability;
  case_corrupted.png  the same study after Gaussian blur (severity 3) and JPEG (severity 3), the
                      model re-run on each, with the confidence drop;
  case_ap_miss.png    an AP study with the finding present that the model misses (p < 0.5), the
                      one with the lowest probability.

When no study of a kind exists, the nearest one is used, said on stdout and in the figure title
("nearest case: ..."). case_studies.json lists each case. The predictions CSV carries every input
column, so --csv is not needed (accepted so that the suite's common flags work here too).
Research use only; not for clinical use.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tools.cli import guarded
from tools.errors import UserError

PROG = "make_case_studies.py"
THRESHOLD = 0.5
CORRUPTIONS = (("gaussian_blur", 3), ("jpeg", 3))
# A clean probability this far from the predictions CSV's means another checkpoint wrote it
# (bf16 autocast in eval moves probabilities by far less).
PROB_MISMATCH = 0.05


# ====== parser ======

def build_parser() -> argparse.ArgumentParser:
    from main import common_parser

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, parents=[common_parser("outputs/case_studies")],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cases = parser.add_argument_group("case studies")
    cases.add_argument("--preds", required=True,
                       help="predictions_<split>.csv written by main.py eval (input columns, <L>_logit, <L>_prob)")
    cases.add_argument("--label", default="Effusion", help="the finding the cases are chosen for and explained")
    return parser


# ====== the predictions table ======

def read_predictions(path, labels, label) -> pd.DataFrame:
    """The predictions CSV, validated: ``image_path``, the ``label`` column (0/1/empty) and
    ``<L>_prob`` in [0, 1] for every label L. Label and probability columns come back as float."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--preds {path}: file not found; pass predictions_<split>.csv written by main.py eval")
    try:
        df = pd.read_csv(path, dtype={"image_path": str})
    except pd.errors.EmptyDataError:
        raise UserError(f"--preds {path}: the file is empty; pass predictions_<split>.csv written by main.py eval") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise UserError(f"--preds {path}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    needed = ["image_path", label] + [f"{lbl}_prob" for lbl in labels]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise UserError(f"--preds {path}: column(s) {', '.join(missing)} not found; it must be written by "
                        f"main.py eval with the checkpoint's labels ({' '.join(labels)})")
    if len(df) == 0:
        raise UserError(f"--preds {path}: the table has a header but no rows")
    df = df.copy()
    df[label] = _numeric_column(df, label, path, allowed="0, 1 or empty", check=lambda v: v.isin([0.0, 1.0]))
    for lbl in labels:
        col = f"{lbl}_prob"
        df[col] = _numeric_column(df, col, path, allowed="a probability in [0, 1]",
                                  check=lambda v: (v >= 0.0) & (v <= 1.0))
    return df


def _numeric_column(df, col, path, allowed, check) -> pd.Series:
    """``col`` as float (empty = NaN); a value that is not a number or fails ``check`` is an error."""
    values = pd.to_numeric(df[col], errors="coerce").astype(float)
    bad = (values.isna() & df[col].notna()) | (values.notna() & ~check(values))
    if bad.any():
        pos = int(np.flatnonzero(bad.to_numpy())[0])
        value = df[col].iloc[pos]
        value = value.item() if isinstance(value, np.generic) else value
        raise UserError(f"--preds {path}: column {col}, row {pos + 2}: value {value!r} is not "
                        f"{allowed} ({int(bad.sum())} such rows)")
    return values


# ====== choosing the cases ======

@dataclass(frozen=True)
class Rule:
    """Rows a case may be drawn from, in words and as a filter on (truth y, probability p, view)."""
    text: str
    keep: object  # (y, p, view) arrays -> boolean mask


def case_rules(kind: str, label: str) -> tuple[str, list[Rule]]:
    """``("highest" | "lowest", rules)`` for a case kind; the first rule is the exact case, the
    others are nearer-to-farther substitutes, tried in order."""
    present = f"{label} present"
    pos, neg = f"model positive (p >= {THRESHOLD})", f"model negative (p < {THRESHOLD})"
    if kind == "clean_pa":
        return "highest", [
            Rule(f"PA study, {present}, {pos}", lambda y, p, v: (v == "PA") & (y == 1) & (p >= THRESHOLD)),
            Rule(f"{present}, {pos}, any view", lambda y, p, v: (y == 1) & (p >= THRESHOLD)),
            Rule(f"{present}, {neg}, any view", lambda y, p, v: y == 1),
            Rule(f"any study, none has {present}", lambda y, p, v: np.ones_like(p, bool)),
        ]
    if kind == "ap_miss":
        return "lowest", [
            Rule(f"AP study, {present}, {neg}", lambda y, p, v: (v == "AP") & (y == 1) & (p < THRESHOLD)),
            Rule(f"AP study, {present}, {pos}", lambda y, p, v: (v == "AP") & (y == 1)),
            Rule(f"{present}, {neg}, any view", lambda y, p, v: (y == 1) & (p < THRESHOLD)),
            Rule(f"{present}, {pos}, any view", lambda y, p, v: y == 1),
            Rule(f"any study, none has {present}", lambda y, p, v: np.ones_like(p, bool)),
        ]
    raise ValueError(f"unknown case kind {kind!r}")


@dataclass(frozen=True)
class Pick:
    kind: str
    row: int          # position in the predictions table
    exact: bool
    rule: str         # the rule the row satisfies
    wanted: str       # the exact rule
    reason: str       # why the exact case is missing ("" when exact)


def normalised_views(df: pd.DataFrame) -> np.ndarray:
    """``view`` upper-cased and stripped ("" where missing or when there is no view column)."""
    if "view" not in df.columns:
        return np.full(len(df), "", dtype=object)
    return df["view"].fillna("").astype(str).str.strip().str.upper().to_numpy(dtype=object)


def pick_case(df: pd.DataFrame, label: str, kind: str) -> Pick:
    """The row for case ``kind``: the first rule of :func:`case_rules` with any row (rows without a
    probability are never picked), the highest or lowest ``<label>_prob`` among its rows, first
    in table order on ties."""
    order, rules = case_rules(kind, label)
    y = df[label].to_numpy(dtype=float)
    p = df[f"{label}_prob"].to_numpy(dtype=float)
    views = normalised_views(df)
    for i, rule in enumerate(rules):
        mask = rule.keep(y, p, views) & ~np.isnan(p)
        if not mask.any():
            continue
        rows = np.flatnonzero(mask)
        best = rows[np.argmax(p[rows]) if order == "highest" else np.argmin(p[rows])]
        reason = "" if i == 0 else ("no view column in --preds" if "view" not in df.columns else f"no {rules[0].text}")
        return Pick(kind, int(best), i == 0, rule.text, rules[0].text, reason)
    raise UserError(f"--preds: no row has a {label}_prob value; pass predictions written by main.py eval")


def case_title(pick: Pick, image_path: str, view) -> str:
    study = image_path if view is None else f"{image_path} (view {view})"
    if pick.exact:
        return f"{pick.rule}\n{study}"
    return f"nearest case: {pick.rule} ({pick.reason})\n{study}"


# ====== running the model on one film ======

def probabilities(model, images, device) -> np.ndarray:
    """Sigmoid probabilities (N, L) of letterboxed uint8 films, fp32, the model's predict path."""
    import torch

    from tools.data import to_model_input
    from tools.model import backbone_features, head

    model.eval()
    with torch.inference_mode():
        x = to_model_input(torch.from_numpy(np.stack(images)).to(device))
        return torch.sigmoid(head(model)(backbone_features(model, x))).float().cpu().numpy()


def heatmap(model, image, label_index: int, device) -> np.ndarray:
    import torch

    from tools.data import to_model_input
    from tools.gradcam import gradcam

    return gradcam(model, to_model_input(torch.from_numpy(image)[None].to(device)), label_index)


@dataclass
class Panel:
    name: str             # "clean", "gaussian_blur sev3", ...
    image: np.ndarray     # letterboxed uint8 film
    probs: np.ndarray     # (L,)
    heat: np.ndarray      # Grad-CAM of the case label


def panel_text(panel: Panel, labels, label, truth: dict, clean_prob: float | None) -> str:
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
    from matplotlib.figure import Figure

    from tools.gradcam import overlay
    from tools.io import save_figure

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


# ====== one case ======

def truth_of(row: pd.Series, labels) -> dict:
    """Ground truth per label present in the table: 0/1, or None where unknown or absent."""
    out = {}
    for lbl in labels:
        value = pd.to_numeric(row.get(lbl), errors="coerce") if lbl in row.index else np.nan
        out[lbl] = None if pd.isna(value) else int(value)
    return out


def run_case(pick: Pick, df, args, model, device, corrupt: bool):
    """Film, probabilities and Grad-CAM of the picked row (and its corrupted versions)."""
    from tools.corruptions import apply_corruption
    from tools.data import letterbox, load_image, resolve_paths

    row = df.iloc[pick.row]
    path = resolve_paths(df.iloc[[pick.row]], args.img_root)[0]
    if not Path(path).is_file():
        raise UserError(f"--preds {args.preds}: image {path} of the chosen case not found under "
                        f"--img-root {args.img_root}; pass the --img-root used for eval")
    image = letterbox(load_image(path), args.image_size)
    films = [("clean", image)]
    if corrupt:
        # index = the row's position, as stress numbers images, so the corrupted film is the same.
        films += [(f"{name} sev{sev}", apply_corruption(image, name, sev, args.seed, index=pick.row))
                  for name, sev in CORRUPTIONS]
    j = args.labels.index(args.label)
    probs = probabilities(model, [film for _, film in films], device)
    panels = [Panel(name, film, probs[k], heatmap(model, film, j, device)) for k, (name, film) in enumerate(films)]
    return row, panels


def view_of(row: pd.Series) -> str | None:
    """The row's ``view`` as written, or None when missing or when there is no view column."""
    view = row.get("view") if "view" in row.index else None
    return None if view is None or pd.isna(view) else str(view)


def case_record(pick: Pick, row, panels, args, figure: str) -> dict:
    labels, label = args.labels, args.label
    j = labels.index(label)
    record = {
        "figure": figure, "image_path": row["image_path"], "row": pick.row,
        "view": view_of(row), "label": label,
        "truth": truth_of(row, [label])[label], "exact": pick.exact, "nearest": not pick.exact,
        "selected_as": pick.rule, "wanted": pick.wanted, "why_nearest": pick.reason or None,
        "predictions_csv_prob": float(row[f"{label}_prob"]),
        "probabilities": {"clean": dict(zip(labels, map(float, panels[0].probs)))},
    }
    if len(panels) > 1:
        clean = float(panels[0].probs[j])
        record["probabilities"]["corrupted"] = {
            f"{name}_sev{sev}": dict(zip(labels, map(float, p.probs))) for (name, sev), p in zip(CORRUPTIONS, panels[1:])}
        record["confidence_drop"] = {
            f"{name}_sev{sev}": clean - float(p.probs[j]) for (name, sev), p in zip(CORRUPTIONS, panels[1:])}
    return record


# ====== main ======

def make_case_studies(args) -> dict:
    from tools import pipeline

    # ====== run set-up and model ======
    args.command = PROG
    run = pipeline.start_run(args)
    model, _ = pipeline.load_checkpoint_model(run)
    return case_studies(run, model, args)


def case_studies(run, model, args) -> dict:
    """Choose, run and draw the three cases into ``run.outdir`` (valtool calls this with its
    already-loaded model)."""
    from tools.io import write_json

    if args.label not in args.labels:
        raise UserError(f"--label {args.label}: not one of the checkpoint's labels ({' '.join(args.labels)})")
    df = read_predictions(args.preds, args.labels, args.label)

    # ====== choose, run and draw each case ======
    figures = {"clean_pa": "case_clean_pa.png", "corrupted": "case_corrupted.png", "ap_miss": "case_ap_miss.png"}
    picks = {"clean_pa": pick_case(df, args.label, "clean_pa"), "ap_miss": pick_case(df, args.label, "ap_miss")}
    picks["corrupted"] = picks["clean_pa"]
    runs = {"corrupted": run_case(picks["clean_pa"], df, args, model, run.device, corrupt=True),
            "ap_miss": run_case(picks["ap_miss"], df, args, model, run.device, corrupt=False)}
    runs["clean_pa"] = (runs["corrupted"][0], runs["corrupted"][1][:1])  # the same clean film
    cases = {}
    for kind in ("clean_pa", "corrupted", "ap_miss"):
        pick = picks[kind]
        row, panels = runs[kind]
        if not pick.exact and kind != "corrupted":
            print(f"{kind}: {pick.reason}; nearest case: {pick.rule}: {row['image_path']}")
        title = case_title(pick, row["image_path"], view_of(row))
        if kind == "corrupted":
            title += "\nclean, then " + ", ".join(f"{name} severity {sev}" for name, sev in CORRUPTIONS)
        case_figure(panels, args.labels, args.label, truth_of(row, args.labels), title, run.outdir / figures[kind])
        cases[kind] = case_record(pick, row, panels, args, figures[kind])
        clean = cases[kind]["probabilities"]["clean"][args.label]
        if abs(clean - cases[kind]["predictions_csv_prob"]) > PROB_MISMATCH:
            print(f"{PROG}: warning: {row['image_path']}: --weights gives {args.label} p={clean:.3f}, --preds says "
                  f"{cases[kind]['predictions_csv_prob']:.3f}; were the predictions written with this checkpoint?",
                  file=sys.stderr)
        drops = "".join(f", {k} drop {v:+.3f}" for k, v in cases[kind].get("confidence_drop", {}).items())
        print(f"{kind}: {row['image_path']} ({args.label} p={clean:.3f}{drops}) -> {run.outdir / figures[kind]}")

    summary = {"label": args.label, "threshold": THRESHOLD, "labels": args.labels, "weights": args.weights,
               "preds": args.preds, "image_size": args.image_size, "seed": args.seed,
               "corruptions": [{"name": n, "severity": s} for n, s in CORRUPTIONS], "cases": cases}
    write_json(run.outdir / "case_studies.json", summary)
    return summary


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return guarded(PROG, make_case_studies, args, args.outdir)


if __name__ == "__main__":
    sys.exit(main())
