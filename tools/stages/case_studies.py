"""The case-study stage: three studies of one finding chosen from a predictions CSV (a PA study
the model gets right, the same film under blur and JPEG, an AP study it misses), each drawn as
the film, a Grad-CAM overlay and the probabilities; make_case_studies.py's docstring describes
the figures. When no study of a kind exists, the nearest one is used and said so.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tools import figures
from tools.corruptions import apply_corruption
from tools.dataset import CXRDataset, make_loader, model_image
from tools.errors import UserError
from tools.files import write_json
from tools.gradcam import film_gradcam
from tools.inference import predict
from tools.metrics import sigmoid
from tools.predictions import read_predictions
from tools.runtime import Run
from tools.table import resolve_paths

PROG = "make_case_studies.py"
THRESHOLD = 0.5
CORRUPTIONS = (("gaussian_blur", 3), ("jpeg", 3))
# A clean probability this far from the predictions CSV's means another checkpoint wrote it
# (bf16 autocast in eval moves probabilities by far less).
PROB_MISMATCH = 0.05


@dataclass
class CaseOptions:
    preds: str          # predictions CSV written by eval
    labels: list        # the model's labels, in its output order
    label: str          # the finding the cases are chosen for and explained
    image_size: int
    img_root: str = "."
    weights: str | None = None  # recorded in case_studies.json


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


# ====== running the model on the films ======

def probabilities(run: Run, model, films) -> np.ndarray:
    """Sigmoid probabilities (N, L) of letterboxed uint8 films through the suite's predict loop
    (the run's precision, as eval)."""
    dataset = CXRDataset([""] * len(films), None, films[0].shape[0], source=films)
    loader = make_loader(dataset, run.inference_batch, 0, run.device, persistent=False)
    return sigmoid(predict(model, loader, run.device, run.precision)["logits"])


@dataclass
class Panel:
    name: str             # "clean", "gaussian_blur sev3", ...
    image: np.ndarray     # letterboxed uint8 film
    probs: np.ndarray     # (L,)
    heat: np.ndarray      # Grad-CAM of the case label


# ====== one case ======

def truth_of(row: pd.Series, labels) -> dict:
    """Ground truth per label present in the table: 0/1, or None where unknown or absent."""
    out = {}
    for lbl in labels:
        value = pd.to_numeric(row.get(lbl), errors="coerce") if lbl in row.index else np.nan
        out[lbl] = None if pd.isna(value) else int(value)
    return out


def run_case(run: Run, pick: Pick, df, opts: CaseOptions, model, corrupt: bool):
    """Film, probabilities and Grad-CAM of the picked row (and its corrupted versions)."""
    row = df.iloc[pick.row]
    path = resolve_paths(df.iloc[[pick.row]], opts.img_root)[0]
    if not Path(path).is_file():
        raise UserError(f"--preds {opts.preds}: image {path} of the chosen case not found under "
                        f"--img-root {opts.img_root}; pass the --img-root used for eval")
    image = model_image(path, opts.image_size, run.dicom_window)  # the pixels the store holds for the row
    films = [("clean", image)]
    if corrupt:
        # index = the row's position, as stress numbers images, so the corrupted film is the same.
        films += [(f"{name} sev{sev}", apply_corruption(image, name, sev, run.seed, index=pick.row))
                  for name, sev in CORRUPTIONS]
    j = opts.labels.index(opts.label)
    probs = probabilities(run, model, [film for _, film in films])
    panels = [Panel(name, film, probs[k], film_gradcam(model, film, j, run.device)) for k, (name, film) in enumerate(films)]
    return row, panels


def view_of(row: pd.Series) -> str | None:
    """The row's ``view`` as written, or None when missing or when there is no view column."""
    view = row.get("view") if "view" in row.index else None
    return None if view is None or pd.isna(view) else str(view)


def case_record(pick: Pick, row, panels, opts: CaseOptions, figure: str) -> dict:
    labels, label = opts.labels, opts.label
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


def case_studies(run: Run, model, opts: CaseOptions) -> dict:
    """Choose, run and draw the three cases into ``run.outdir`` (valtool calls this with its
    already-loaded model)."""
    if opts.label not in opts.labels:
        raise UserError(f"--label {opts.label}: not one of the checkpoint's labels ({' '.join(opts.labels)})")
    df = read_predictions(opts.preds, opts.labels, opts.label)

    # ====== choose, run and draw each case ======
    files = {"clean_pa": "case_clean_pa.png", "corrupted": "case_corrupted.png", "ap_miss": "case_ap_miss.png"}
    picks = {"clean_pa": pick_case(df, opts.label, "clean_pa"), "ap_miss": pick_case(df, opts.label, "ap_miss")}
    picks["corrupted"] = picks["clean_pa"]
    runs = {"corrupted": run_case(run, picks["clean_pa"], df, opts, model, corrupt=True),
            "ap_miss": run_case(run, picks["ap_miss"], df, opts, model, corrupt=False)}
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
        figures.case_figure(panels, opts.labels, opts.label, truth_of(row, opts.labels), title, run.outdir / files[kind])
        cases[kind] = case_record(pick, row, panels, opts, files[kind])
        clean = cases[kind]["probabilities"]["clean"][opts.label]
        if abs(clean - cases[kind]["predictions_csv_prob"]) > PROB_MISMATCH:
            print(f"{PROG}: warning: {row['image_path']}: --weights gives {opts.label} p={clean:.3f}, --preds says "
                  f"{cases[kind]['predictions_csv_prob']:.3f}; were the predictions written with this checkpoint?",
                  file=sys.stderr)
        drops = "".join(f", {k} drop {v:+.3f}" for k, v in cases[kind].get("confidence_drop", {}).items())
        print(f"{kind}: {row['image_path']} ({opts.label} p={clean:.3f}{drops}) -> {run.outdir / files[kind]}")

    summary = {"label": opts.label, "threshold": THRESHOLD, "labels": opts.labels, "weights": opts.weights,
               "preds": opts.preds, "image_size": opts.image_size, "seed": run.seed,
               "corruptions": [{"name": n, "severity": s} for n, s in CORRUPTIONS], "cases": cases}
    write_json(run.outdir / "case_studies.json", summary)
    return summary
