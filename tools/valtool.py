"""``main.py valtool``: the whole suite on a new data set in one command.

Labelled CSV: one clean pass over the split (logits and backbone features) feeds eval with
slicing, calibration, MC-Dropout and selective prediction; only the 12 corrupted passes and the
TTA draws run the model again. Unlabelled folder: predictions with MC-Dropout/TTA spread per
image, image quality checks, and the stress pass as prediction shifts. Each stage writes into
its own subfolder; ``summary.json`` and ``report.html`` sit on top.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from tools import distributed, figures
from tools.audit import Subject, open_subject
from tools.corruptions import SEVERITIES
from tools.errors import UserError
from tools.files import NOTICE, write_csv, write_json
from tools.html_report import write_report
from tools.image_stats import image_quality
from tools.inference import clean_pass, corrupted_logits
from tools.metrics import sigmoid
from tools.model_files import ModelRequest
from tools.predictions import predictions_frame, spread_columns, unmatched
from tools.runtime import Run
from tools.splits import load_folder
from tools.stages import case_studies as cases
from tools.stages import stress
from tools.stages.calibrate import fitted_temperature, samplers, spread, write_calibration
from tools.stages.evaluate import write_evaluation
from tools.stages.selective import confidence_signals, write_selective
from tools.uncertainty import public

log = logging.getLogger("cxr")


@dataclass
class ValtoolOptions:
    """What valtool runs on and how (main.py's flags of the same names)."""
    model: ModelRequest           # the model file (weights None: predictions alone)
    csv: str | None = None        # labelled mode
    image_dir: str | None = None  # unlabelled mode
    img_root: str = "."
    labels: list | None = None    # default: the checkpoint's
    image_size: int | None = None
    split: str = "test"
    val_split: str = "val"
    group_cols: list = field(default_factory=list)
    min_group_size: int = 30
    bootstrap: int = 1000
    mc_samples: int = 20
    tta_samples: int = 8
    corruptions: list = field(default_factory=lambda: list(SEVERITIES))
    case_label: str | None = None
    predictions: list | None = None
    pred_format: str | None = None
    compare_with: str | None = None  # a reference model (A) the audited one (B) is compared with


def _flag(kind, message, size=None, ci95=None) -> dict:
    return {"kind": kind, "message": message, "size": size, "ci95": ci95}


def run_labelled(run: Run, opts: ValtoolOptions, subject: Subject) -> dict:
    labels, model, table = subject.labels, subject.model, subject.source.table
    data = subject.split(run, opts.split)
    mc_samples, tta_samples, not_run = samplers(subject, opts.mc_samples, opts.tta_samples)
    # ====== the one clean pass ======
    clean = subject.logits(run, data, features=mc_samples > 0, desc="clean")
    logits = clean["logits"]
    probs = sigmoid(logits)
    # ====== eval with slicing ======
    ev = write_evaluation(run.stage("eval"), data, logits, labels, opts.group_cols, opts.min_group_size,
                          opts.bootstrap)
    # ====== stress: the only passes besides TTA ======
    results, summary_table = {}, pd.DataFrame()
    if subject.missing("model"):
        not_run["stress"] = subject.missing("model")
    else:
        results = corrupted_logits(run, model, data, opts.corruptions)
        summary_table = stress.write_stress(run.stage("stress"), data, logits, results, labels, opts.group_cols,
                                            opts.bootstrap)
    # ====== calibration and spread ======
    temperature = None
    if _can_fit(subject, table, opts.val_split):
        temperature = fitted_temperature(run, subject, opts.val_split)
    mc, tta = spread(run, model, data, clean.get("features"), labels, mc_samples, tta_samples)
    cal = write_calibration(run.stage("calibrate"), data, logits, labels, 1.0 if temperature is None else temperature,
                            mc, tta, fitted_on=opts.val_split if temperature is not None else None, not_run=not_run)
    # ====== selective ======
    signals = confidence_signals(logits, temperature, mc, tta)
    sel = write_selective(run.stage("selective"), data, probs, labels, signals, primary="maxprob")
    passes = model_passes(results, tta, tta_samples) if model is not None else 0
    compared = _compare(run, opts, subject, data, logits) if opts.compare_with else None
    if not distributed.is_main():  # every model pass is done; rank 0 alone summarises and writes
        return {}
    summary = _labelled_summary(opts, labels, data, ev, summary_table, cal, sel, passes)
    summary["data_checks"] = _data_checks(run, opts, labels, files=model is not None)
    summary["flagged_problems"] += [_flag("data", p) for p in summary["data_checks"]["problems"]]
    if subject.missing("features"):
        not_run["case_studies"] = subject.missing("features")
        summary["case_studies"] = None
    else:
        summary["case_studies"] = _case_studies(run, opts, model, labels, subject.image_size)
    summary["not_run"] = not_run
    if compared is not None:
        summary["compare"] = compared
    return summary


def _can_fit(subject: Subject, table, split: str) -> bool:
    """True when ``split`` has rows the subject can predict (with predictions alone, they must
    cover it); else the calibration is reported at T = 1 with a warning."""
    rows = table["image_path"][table["split"].astype(str) == split] if "split" in table.columns else table.iloc[:0]
    if not len(rows):
        log.warning("no %r split in --csv: temperature not fitted, calibration reported at T = 1", split)
        return False
    if subject.model is None and unmatched(rows.astype(str), subject.predictions.index)[0]:
        log.warning("--predictions do not cover split %r: temperature not fitted, calibration reported at T = 1", split)
        return False
    return True


def _compare(run: Run, opts: ValtoolOptions, subject: Subject, data, logits) -> dict:
    """compare/: the reference model ``--compare-with`` (A) against the audited one (B)."""
    from tools.stages.compare import open_side, side_logits, write_compare

    reference = open_side(run, opts.compare_with, opts.model, opts.pred_format, opts.csv, opts.img_root, subject.labels)
    a_logits = side_logits(run, reference, data)
    return write_compare(run.stage("compare"), data, a_logits, logits, subject.labels, reference.describe(),
                         subject.describe(), opts.group_cols, opts.bootstrap)


def model_passes(results, tta, tta_samples: int) -> int:
    """Passes of the model over the split: the clean one, one per corrupted set, one per TTA draw."""
    return 1 + len(results) + (tta_samples if tta is not None else 0)


def _data_checks(run: Run, opts: ValtoolOptions, labels, files: bool = True) -> dict:
    """Table-level checks of the whole CSV (labels, duplicates, patients across splits,
    prevalence); images were already decoded once for the split, so they are not decoded again."""
    from tools.check_data import check_data

    report = check_data(opts.csv, opts.img_root, labels, progress=False, images=False, files=files)
    report["skipped_images"] = run.skipped
    write_json(run.stage("data_checks").outdir / "data_checks.json", report)
    for line in report["problems"] + report["warnings"]:
        log.warning("data check: %s", line)
    return {k: report[k] for k in ("problems", "warnings", "ok")}


def _case_studies(run: Run, opts: ValtoolOptions, model, labels, image_size: int) -> dict | None:
    """The case-study panels from eval's predictions."""
    label = opts.case_label or labels[-1]
    if label not in labels:
        raise UserError(f"--case-label {label}: not one of the labels ({' '.join(labels)})")
    case_opts = cases.CaseOptions(preds=str(run.outdir / "eval" / f"predictions_{opts.split}.csv"), labels=labels,
                                  label=label, image_size=image_size, img_root=opts.img_root, weights=opts.model.weights)
    found = cases.case_studies(run.stage("case_studies"), model, case_opts)["cases"]
    return {kind: {k: c[k] for k in ("figure", "image_path", "exact", "why_nearest")} for kind, c in found.items()}


def _labelled_summary(opts: ValtoolOptions, labels, data, ev, stress_table, cal, sel, passes) -> dict:
    worst = stress.worst_corruption(stress_table, labels) if len(stress_table) else None
    flagged = []
    for f in ev["failures"]:
        flagged.append(_flag("slice", f"{f['group_col']}={f['group']}: {f['label']} {f['metric']} "
                             f"{f['gap']:+.3f} vs the rest" + (" (small group)" if f["small"] else ""),
                             f["gap"], f["ci95"]))
    corrupted = stress_table[stress_table["corruption"] != "clean"] if len(stress_table) else stress_table
    for _, r in corrupted.iterrows():
        for lbl in labels:
            d, hi = r[f"delta_auroc_{lbl}"], r[f"delta_auroc_{lbl}_hi"]
            # a drop of at least 0.02 whose paired interval lies below 0 (or, without intervals, 0.05)
            real = (pd.notna(hi) and hi < 0) if opts.bootstrap > 0 else True
            if pd.notna(d) and d <= (-0.02 if opts.bootstrap > 0 else -0.05) and real:
                ci = [r[f"delta_auroc_{lbl}_lo"], hi] if opts.bootstrap > 0 else None
                flagged.append(_flag("corruption", f"{r['corruption']} severity {int(r['severity'])} "
                                     f"({r['param']}): {lbl} AUROC {d:+.3f}", float(d), ci))
    if cal["ece_before"] is not None and cal["ece_before"] > 0.05:
        flagged.append(_flag("calibration", f"ECE {cal['ece_before']:.3f} before temperature scaling"
                             + (f", {cal['ece_after']:.3f} after" if cal["fitted_on"] else " (not fitted: no val split)"),
                             cal["ece_before"]))
    flagged.sort(key=lambda f: f["size"] if f["kind"] != "calibration" else -f["size"])
    return {
        "mode": "labelled", "csv": str(opts.csv), "split": data.name, "n": int(len(data.df)), "labels": labels,
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

def run_unlabelled(run: Run, opts: ValtoolOptions, subject: Subject) -> dict:
    model, labels, image_size = subject.model, subject.labels, subject.image_size
    data = load_folder(run, opts.image_dir, len(labels), image_size)
    paths, df = data.paths, data.df
    mc_samples, tta_samples, not_run = samplers(subject, opts.mc_samples, opts.tta_samples)
    clean = clean_pass(run, model, data, features=mc_samples > 0, desc="clean")
    probs = sigmoid(clean["logits"])
    mc, tta = spread(run, model, data, clean.get("features"), labels, mc_samples, tta_samples, labelled=False)
    extra = {}
    for j, lbl in enumerate(labels):
        extra.update(spread_columns(lbl, j, mc, tta))
    results = corrupted_logits(run, model, data, opts.corruptions)
    if not distributed.is_main():  # every model pass is done; rank 0 alone summarises and writes
        return {}
    shifts = []
    for (name, severity), logits in results.items():
        corrupted = sigmoid(logits)
        delta = corrupted - probs
        row = {"corruption": name, "severity": severity}
        for j, lbl in enumerate(labels):
            row[f"mean_abs_shift_{lbl}"] = float(np.abs(delta[:, j]).mean())
            row[f"max_abs_shift_{lbl}"] = float(np.abs(delta[:, j]).max())
            row[f"flips_{lbl}"] = int(((corrupted[:, j] >= 0.5) != (probs[:, j] >= 0.5)).sum())
        shifts.append(row)
    shifts = pd.DataFrame(shifts)
    quality = image_quality(paths, data.store, image_size)
    write_csv(run.stage("predictions").outdir / "predictions_images.csv",
              predictions_frame(df, labels, clean["logits"], probs, extra))
    write_csv(run.stage("quality").outdir / "image_quality.csv", quality)
    write_csv(run.stage("stress").outdir / "prediction_shifts.csv", shifts)
    figures.plot_corruption_examples(data.store[0], run.outdir / "stress" / "stress_examples.png", seed=run.seed,
                                     title=f"{paths[0]} at model resolution")
    flagged = []
    for col in [c for c in quality.columns if c.startswith("flag_")]:
        count = int(quality[col].sum())
        if count:
            flagged.append(_flag("quality", f"{count} image(s) {col.removeprefix('flag_').replace('_', ' ')}", count))
    for _, r in shifts.iterrows():
        for lbl in labels:
            if r[f"mean_abs_shift_{lbl}"] >= 0.05:
                flagged.append(_flag("corruption", f"{r['corruption']} severity {r['severity']}: {lbl} probability "
                                     f"moves {r[f'mean_abs_shift_{lbl}']:.3f} on average", -r[f"mean_abs_shift_{lbl}"]))
    return {"mode": "unlabelled", "image_dir": str(opts.image_dir), "n": len(paths), "labels": labels,
            "mean_probability": {lbl: float(probs[:, j].mean()) for j, lbl in enumerate(labels)},
            "uncertainty": {"mc_dropout": public(mc), "tta": public(tta)},
            "largest_prediction_shift": _largest_shift(shifts, labels),
            "model_passes_over_split": model_passes(results, tta, tta_samples),
            "flagged_problems": flagged, "not_run": not_run, "note": NOTICE}


def _folder_subject(run: Run, opts: ValtoolOptions, compile: bool) -> Subject:
    """The model of an unlabelled run: its outputs named by --labels or, without, all named ones."""
    from tools.model_files import load_audited_model

    model, info = load_audited_model(run, opts.model, opts.labels, None, compile)
    return Subject(model, info, info.labels, None)


def _largest_shift(shifts, labels):
    best = None
    for _, r in shifts.iterrows():
        for lbl in labels:
            v = r[f"mean_abs_shift_{lbl}"]
            if best is None or v > best["mean_abs_shift"]:
                best = {"corruption": r["corruption"], "severity": int(r["severity"]), "label": lbl,
                        "mean_abs_shift": float(v)}
    return best


def run_valtool(run: Run, opts: ValtoolOptions, compile: bool = False) -> dict:
    if bool(opts.csv) == bool(opts.image_dir):
        raise UserError("valtool takes either --csv (labelled) or --image-dir DIR (unlabelled folder), not both/neither")
    if opts.image_dir:
        if not opts.model.weights:
            raise UserError("valtool --image-dir needs the model: pass --weights (predictions cannot be made for new images)")
        if opts.predictions:
            raise UserError("valtool --image-dir runs the model on the folder's images; --predictions applies to --csv")
        subject = _folder_subject(run, opts, compile)
        summary = run_unlabelled(run, opts, subject)
    else:
        subject = open_subject(run, opts.model, opts.predictions, opts.pred_format, opts.csv, opts.img_root,
                               opts.labels, opts.group_cols, compile)
        summary = run_labelled(run, opts, subject)
    if distributed.is_main():
        summary["model"] = {**subject.describe(), **({"record": subject.info.record()} if subject.info else {})}
        write_json(run.outdir / "summary.json", summary)
        log.info("report: %s", write_report(run.outdir).resolve())
    return summary
