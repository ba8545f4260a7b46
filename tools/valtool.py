"""``main.py valtool``: the whole suite on a new data set in one command.

Labelled CSV: one clean pass over the split (logits and backbone features) feeds eval with
slicing, calibration, MC-Dropout and selective prediction; only the 12 corrupted passes and the
TTA draws run the model again. Unlabelled folder: predictions with MC-Dropout/TTA spread per
image, image quality checks, and the stress pass as prediction shifts. Each stage writes into
its own subfolder; ``summary.json`` and ``report.html`` sit on top.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from tools import distributed, pipeline, reports, stress, uncertainty
from tools.calibration import fit_temperature
from tools.data import IMAGE_EXTENSIONS, content_box
from tools.errors import UserError
from tools.io import NOTICE, write_csv, write_json
from tools.metrics import sigmoid
from tools.selective import confidence_from_probs, confidence_from_spread

log = logging.getLogger("cxr")


def _stage(run, name: str):
    """The run, writing into ``<outdir>/<name>/``."""
    sub = run.outdir / name
    if distributed.is_main():
        sub.mkdir(parents=True, exist_ok=True)
    return replace(run, outdir=sub)


def _flag(kind, message, size=None, ci95=None) -> dict:
    return {"kind": kind, "message": message, "size": size, "ci95": ci95}


def run_labelled(run) -> dict:
    args = run.args
    model, _ = pipeline.load_checkpoint_model(run)
    table = pipeline.read_input_table(args)
    data = pipeline.load_split(run, table, args.split)
    # ====== the one clean pass ======
    clean = pipeline.clean_pass(run, model, data, features=args.mc_samples > 0, desc="clean")
    logits = clean["logits"]
    probs = sigmoid(logits)
    # ====== eval with slicing ======
    ev = reports.write_evaluation(_stage(run, "eval"), data, logits)
    # ====== stress: the only passes besides TTA ======
    results = stress.corrupted_logits(run, model, data, args.corruptions)
    summary_table = stress.write_stress(_stage(run, "stress"), data, logits, results)
    # ====== calibration and spread ======
    has_val = "split" in table.columns and (table["split"].astype(str) == args.val_split).any()
    if has_val:
        val = pipeline.load_split(run, table, args.val_split)
        temperature = fit_temperature(pipeline.clean_pass(run, model, val, desc="val")["logits"], val.y)
    else:
        temperature = 1.0
        log.warning("no %r split in --csv: temperature not fitted, calibration reported at T = 1", args.val_split)
    mc, tta = uncertainty.spread(run, model, data, clean.get("features"), data.y)
    cal = reports.write_calibration(_stage(run, "calibrate"), data, logits, temperature, mc, tta,
                                    fitted_on=args.val_split if has_val else None)
    # ====== selective ======
    signals = {"maxprob": confidence_from_probs(probs)}
    if has_val:
        signals["calibrated"] = confidence_from_probs(sigmoid(logits / temperature))
    for name, stats in (("mc_std", mc), ("tta_std", tta)):
        if stats is not None:
            signals[name] = confidence_from_spread(stats["std"])
    sel = reports.write_selective(_stage(run, "selective"), data, probs, signals, primary="maxprob")
    passes = model_passes(results, tta, args)
    if not distributed.is_main():  # every model pass is done; rank 0 alone summarises and writes
        return {}
    summary = _labelled_summary(args, data, ev, summary_table, cal, sel, passes)
    summary["data_checks"] = _data_checks(run, data)
    summary["flagged_problems"] += [_flag("data", p) for p in summary["data_checks"]["problems"]]
    summary["case_studies"] = _case_studies(run, model)
    return summary


def model_passes(results, tta, args) -> int:
    """Passes of the model over the split: the clean one, one per corrupted set, one per TTA draw."""
    return 1 + len(results) + (args.tta_samples if tta is not None else 0)


def _data_checks(run, data) -> dict:
    """Table-level checks of the whole CSV (labels, duplicates, patients across splits,
    prevalence); images were already decoded once for the split, so they are not decoded again."""
    from tools.check_data import check_data

    report = check_data(run.args.csv, run.args.img_root, run.args.labels, progress=False, images=False)
    report["skipped_images"] = run.skipped
    write_json(_stage(run, "data_checks").outdir / "data_checks.json", report)
    for line in report["problems"] + report["warnings"]:
        log.warning("data check: %s", line)
    return {k: report[k] for k in ("problems", "warnings", "ok")}


def _case_studies(run, model) -> dict | None:
    """The case-study panels from eval's predictions (make_case_studies.py's logic)."""
    from argparse import Namespace

    from make_case_studies import case_studies

    args = run.args
    label = args.case_label or args.labels[-1]
    if label not in args.labels:
        raise UserError(f"--case-label {label}: not one of the labels ({' '.join(args.labels)})")
    case_args = Namespace(**{**vars(args), "label": label,
                             "preds": str(run.outdir / "eval" / f"predictions_{args.split}.csv")})
    cases = case_studies(_stage(run, "case_studies"), model, case_args)["cases"]
    return {kind: {k: c[k] for k in ("figure", "image_path", "exact", "why_nearest")} for kind, c in cases.items()}


def _labelled_summary(args, data, ev, stress_table, cal, sel, passes) -> dict:
    worst = stress.worst_corruption(stress_table, args.labels) if len(stress_table) else None
    flagged = []
    for f in ev["failures"]:
        flagged.append(_flag("slice", f"{f['group_col']}={f['group']}: {f['label']} {f['metric']} "
                             f"{f['gap']:+.3f} vs the rest" + (" (small group)" if f["small"] else ""),
                             f["gap"], f["ci95"]))
    for _, r in stress_table[stress_table["corruption"] != "clean"].iterrows():
        for lbl in args.labels:
            d, hi = r[f"delta_auroc_{lbl}"], r[f"delta_auroc_{lbl}_hi"]
            # a drop of at least 0.02 whose paired interval lies below 0 (or, without intervals, 0.05)
            real = (pd.notna(hi) and hi < 0) if args.bootstrap > 0 else True
            if pd.notna(d) and d <= (-0.02 if args.bootstrap > 0 else -0.05) and real:
                ci = [r[f"delta_auroc_{lbl}_lo"], hi] if args.bootstrap > 0 else None
                flagged.append(_flag("corruption", f"{r['corruption']} severity {int(r['severity'])} "
                                     f"({r['param']}): {lbl} AUROC {d:+.3f}", float(d), ci))
    if cal["ece_before"] is not None and cal["ece_before"] > 0.05:
        flagged.append(_flag("calibration", f"ECE {cal['ece_before']:.3f} before temperature scaling"
                             + (f", {cal['ece_after']:.3f} after" if cal["fitted_on"] else " (not fitted: no val split)"),
                             cal["ece_before"]))
    flagged.sort(key=lambda f: f["size"] if f["kind"] != "calibration" else -f["size"])
    return {
        "mode": "labelled", "csv": str(args.csv), "split": data.name, "n": int(len(data.df)), "labels": args.labels,
        "headline": {k: ev["metrics"][k] for k in ("macro", "micro", "per_class")} if ev["metrics"] else None,
        "worst_slices": ev["failures"][:10],
        "most_harmful_corruption": worst,
        "calibration": {k: cal[k] for k in ("temperature", "fitted_on", "ece_before", "ece_after", "nll_before",
                                            "nll_after", "ece_toplabel_before", "ece_toplabel_after")},
        "uncertainty": {"mc_dropout": cal["mc_dropout"], "tta": cal["tta"]},
        "selective": {k: sel[k] for k in ("aurc", "e_aurc", "risk_at_full_coverage", "coverage_at_risk")}
        | {"signals": {k: {"aurc": v["aurc"], "e_aurc": v["e_aurc"]} for k, v in sel["signals"].items()}},
        "model_passes_over_split": passes,
        "flagged_problems": flagged,
        "note": NOTICE,
    }


# ====== unlabelled folder ======

def find_images(folder) -> list[str]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--image-dir {folder}: not a directory")
    paths = sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise UserError(f"--image-dir {folder}: no .png/.jpg/.jpeg files found (searched recursively)")
    return paths


def image_quality(paths, store, image_size) -> pd.DataFrame:
    """Per image: original size, bit depth proxy, brightness, contrast and simple flags
    (tiny, nearly blank, saturated) that often explain odd predictions."""
    from PIL import Image

    rows, bad = [], set(store.bad)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:  # reads the header only: no second decode
                w, h = im.size
        except OSError:
            h = w = None
        pix = store[i]
        box = content_box(pix[None])[0]  # without the letterbox padding
        content = pix[box] if box.any() else pix.ravel()
        mean, std = float(content.mean()), float(content.std())
        rows.append({"image_path": path, "height": h, "width": w, "mean_intensity": mean, "std_intensity": std,
                     "flag_small": bool(h is not None and min(h, w) < image_size),
                     "flag_low_contrast": std < 10, "flag_saturated": float((content >= 250).mean()) > 0.2,
                     "flag_dark": mean < 30, "flag_undecodable": i in bad})
    return pd.DataFrame(rows)


def run_unlabelled(run) -> dict:
    args = run.args
    model, _ = pipeline.load_checkpoint_model(run)
    paths = find_images(args.image_dir)
    df = pd.DataFrame({"image_path": paths})
    store = pipeline.shared_store(run, paths)
    data = pipeline.SplitData("images", df, paths, np.full((len(paths), len(args.labels)), np.nan, np.float32), store)
    clean = pipeline.clean_pass(run, model, data, features=args.mc_samples > 0, desc="clean")
    probs = sigmoid(clean["logits"])
    mc, tta = uncertainty.spread(run, model, data, clean.get("features"), None)
    extra = {}
    for j, lbl in enumerate(args.labels):
        extra.update(uncertainty.spread_columns(lbl, j, mc, tta))
    results = stress.corrupted_logits(run, model, data, args.corruptions)
    if not distributed.is_main():  # every model pass is done; rank 0 alone summarises and writes
        return {}
    shifts = []
    for (name, severity), logits in results.items():
        corrupted = sigmoid(logits)
        delta = corrupted - probs
        row = {"corruption": name, "severity": severity}
        for j, lbl in enumerate(args.labels):
            row[f"mean_abs_shift_{lbl}"] = float(np.abs(delta[:, j]).mean())
            row[f"max_abs_shift_{lbl}"] = float(np.abs(delta[:, j]).max())
            row[f"flips_{lbl}"] = int(((corrupted[:, j] >= 0.5) != (probs[:, j] >= 0.5)).sum())
        shifts.append(row)
    shifts = pd.DataFrame(shifts)
    quality = image_quality(paths, store, args.image_size)
    pred_dir = _stage(run, "predictions").outdir
    write_csv(pred_dir / "predictions_images.csv",
              reports.predictions_frame(df, args.labels, clean["logits"], probs, extra))
    write_csv(_stage(run, "quality").outdir / "image_quality.csv", quality)
    write_csv(_stage(run, "stress").outdir / "prediction_shifts.csv", shifts)
    from tools.corruptions import plot_corruption_examples

    plot_corruption_examples(store[0], run.outdir / "stress" / "stress_examples.png", seed=args.seed,
                             title=f"{paths[0]} at model resolution")
    flagged = []
    for col in [c for c in quality.columns if c.startswith("flag_")]:
        count = int(quality[col].sum())
        if count:
            flagged.append(_flag("quality", f"{count} image(s) {col.removeprefix('flag_').replace('_', ' ')}", count))
    for _, r in shifts.iterrows():
        for lbl in args.labels:
            if r[f"mean_abs_shift_{lbl}"] >= 0.05:
                flagged.append(_flag("corruption", f"{r['corruption']} severity {r['severity']}: {lbl} probability "
                                     f"moves {r[f'mean_abs_shift_{lbl}']:.3f} on average", -r[f"mean_abs_shift_{lbl}"]))
    return {"mode": "unlabelled", "image_dir": str(args.image_dir), "n": len(paths), "labels": args.labels,
            "mean_probability": {lbl: float(probs[:, j].mean()) for j, lbl in enumerate(args.labels)},
            "uncertainty": {"mc_dropout": uncertainty.public(mc), "tta": uncertainty.public(tta)},
            "largest_prediction_shift": _largest_shift(shifts, args.labels),
            "model_passes_over_split": model_passes(results, tta, args),
            "flagged_problems": flagged, "note": NOTICE}


def _largest_shift(shifts, labels):
    best = None
    for _, r in shifts.iterrows():
        for lbl in labels:
            v = r[f"mean_abs_shift_{lbl}"]
            if best is None or v > best["mean_abs_shift"]:
                best = {"corruption": r["corruption"], "severity": int(r["severity"]), "label": lbl,
                        "mean_abs_shift": float(v)}
    return best


def run_valtool(run) -> dict:
    args = run.args
    if bool(args.csv) == bool(args.image_dir):
        raise UserError("valtool takes either --csv (labelled) or --image-dir DIR (unlabelled folder), not both/neither")
    summary = run_labelled(run) if args.csv else run_unlabelled(run)
    if distributed.is_main():
        write_json(run.outdir / "summary.json", summary)
        from tools.report import write_report

        log.info("report: %s", write_report(run.outdir).resolve())
    return summary

