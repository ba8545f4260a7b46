"""``main.py valtool``: the whole suite on a new data set in one command.

Labelled CSV: one clean pass over the split (logits and backbone features) feeds eval with
slicing, calibration, MC-Dropout and selective prediction; only the corrupted passes (12 with
the default corruptions, 18 more with the acquisition family) and the TTA draws run the model
again. With ``--internal``, the model's metrics on its own test split are set against this
data's, label by label (external validation). Unlabelled folder: predictions with MC-Dropout/TTA spread per
image, image quality checks, and the stress pass as prediction shifts; against a labelled reference
(``--reference``, or the training CSV the checkpoint records), whether the site is like it and what
performance to expect (``tools.stages.drift``). Each stage writes into its own subfolder;
``summary.json`` and ``report.html`` sit on top.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from tools import distributed, figures
from tools.audit import Subject, open_subject
from tools.compare import internal_external_rows, internal_vs_external
from tools.corruptions import FAMILIES
from tools.drift import MIN_IMAGES
from tools.errors import UserError
from tools.files import NOTICE, write_csv, write_json
from tools.findings import SHIFT_TOLERANCE, corruption_tests, describe, failure_list
from tools.metrics import bootstrap_weights, percentile_ci
from tools.stats import exceed_p
from tools.html_report import write_report
from tools.image_stats import PROPERTIES, measure_images, quality_table
from tools.inference import clean_pass, corrupted_logits
from tools.metrics import sigmoid
from tools.model_files import ModelRequest
from tools.predictions import predictions_frame, spread_columns, unmatched
from tools.runtime import Run
from tools.splits import Source, SplitData, load_folder, load_split
from tools.stages import case_studies as cases
from tools.stages import stress
from tools.stages.calibrate import calibration_split, samplers, spread, temperature_fit, write_calibration
from tools.stages.evaluate import write_evaluation
from tools.stages.discover import discovery_passes, write_discovery
from tools.stages.drift import check_new_films, choose_reference, load_reference, write_drift
from tools.stages.selective import confidence_signals, write_selective
from tools.table import ReadRules, find_name, header, label_matrix, read_kept
from tools.uncertainty import public

log = logging.getLogger("cxr")

MIN_PERMUTATIONS = 20  # fewer permutations cannot estimate the drift tests' null distributions


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
    calib_split: str | None = None  # default: 'calib' when the CSV has it, else val_split
    group_cols: list = field(default_factory=list)
    min_group_size: int = 30
    bootstrap: int = 1000
    mc_samples: int = 20
    tta_samples: int = 8
    corruptions: list = field(default_factory=lambda: list(FAMILIES["default"]))  # names, not families
    case_label: str | None = None
    predictions: list | None = None
    pred_format: str | None = None
    compare_with: str | None = None  # a reference model (A) the audited one (B) is compared with
    discover: bool = True         # slice discovery, shortcut probes, label issues
    discover_split: str = "val"
    label_audit_folds: int = 0
    audit_split: str = "train"
    internal: str | None = None   # the model's metrics JSON on its own test split (internal vs external)
    rules: ReadRules = field(default_factory=ReadRules)  # --uncertain, --views
    reference: str | None = None  # unlabelled mode: the labelled data the model was validated on (drift/)
    reference_split: str | None = "val"
    reference_root: str | None = None  # default: img_root
    drift_permutations: int = 200


def _flag(test: dict) -> dict:
    """A tested entry of ``flagged_problems``: the test's fields, a message and a size."""
    size = test["gap"] if "gap" in test else test["value"]
    return {**test, "message": describe(test), "size": size}


def _fact(kind, message, size=None) -> dict:
    """An entry of ``flagged_problems`` that is a count, not an estimate (a data problem, images
    failing a quality check): nothing to test, so no p-value; it is listed as a finding."""
    return {"kind": kind, "message": message, "size": size, "ci95": None, "p_value": None, "q_value": None,
            "finding": True}


def run_labelled(run: Run, opts: ValtoolOptions, subject: Subject) -> dict:
    labels, model, table = subject.labels, subject.model, subject.source.table
    internal = read_internal(opts.internal) if opts.internal else None
    data = subject.split(run, opts.split)
    mc_samples, tta_samples, not_run = samplers(subject, opts.mc_samples, opts.tta_samples)
    discovering = _discovery_possible(opts, subject, table, not_run)
    # ====== the one clean pass ======
    clean = subject.logits(run, data, features=mc_samples > 0 or discovering, desc="clean")
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
    fit_split = calibration_split(table, opts.calib_split, opts.val_split)
    fit = temperature_fit(run, subject, fit_split) if _can_fit(subject, table, fit_split) else None
    temperature = None if fit is None else fit.temperature
    mc, tta = spread(run, model, data, clean.get("features"), labels, mc_samples, tta_samples)
    cal = write_calibration(run.stage("calibrate"), data, logits, labels, fit, mc, tta, not_run=not_run,
                            bootstrap=opts.bootstrap)
    # ====== selective ======
    signals = confidence_signals(logits, temperature, mc, tta)
    sel = write_selective(run.stage("selective"), data, probs, labels, signals, primary="maxprob",
                          bootstrap=opts.bootstrap)
    passes = model_passes(results, tta, tta_samples) if model is not None else 0
    compared = _compare(run, opts, subject, data, logits) if opts.compare_with else None
    found = {"summary": None, "tests": []}
    if discovering:
        feature_passes = discovery_passes(run, subject, opts.split, opts.discover_split, opts.audit_split,
                                          opts.label_audit_folds)
        found = write_discovery(run.stage("discover"), data, logits, clean["features"], labels, feature_passes,
                                temperature, opts.bootstrap, opts.label_audit_folds)
    if not distributed.is_main():  # every model pass is done; rank 0 alone summarises and writes
        return {}
    summary = _labelled_summary(opts, labels, data, ev, summary_table, cal, sel, passes, found)
    summary["data_checks"] = _data_checks(run, opts, labels, files=model is not None)
    summary["flagged_problems"] += [_fact("data", p) for p in summary["data_checks"]["problems"]]
    if subject.missing("features"):
        not_run["case_studies"] = subject.missing("features")
        summary["case_studies"] = None
    else:
        summary["case_studies"] = _case_studies(run, opts, model, labels, subject.image_size)
    summary["not_run"] = not_run
    if compared is not None:
        summary["compare"] = compared
    if internal is not None:
        summary["internal_vs_external"] = _internal_vs_external(run, opts, internal, ev["metrics"], labels)
    return summary


def read_internal(path) -> dict:
    """``--internal``: a metrics JSON (metrics schema) read and checked, before any model pass."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--internal {path}: file not found; pass the metrics_test.json that eval wrote on the "
                        "model's own test split")
    try:
        metrics = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--internal {path}: not valid JSON ({exc})") from None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("per_class"), dict):
        raise UserError(f"--internal {path}: no per_class block; pass a metrics_<split>.json written by eval")
    return metrics


def _internal_vs_external(run: Run, opts: ValtoolOptions, internal: dict, external: dict | None, labels) -> dict:
    """The internal-vs-external comparison: ``eval/internal_vs_external.csv`` and the block of
    summary.json (with the --internal file's path)."""
    if external is None:
        return {"internal": str(opts.internal), "not_run": "no external metrics: no label had both classes"}
    result = {"internal": str(opts.internal), **internal_vs_external(external, internal, labels)}
    write_csv(run.stage("eval").outdir / "internal_vs_external.csv", internal_external_rows(result))
    for label, reason in result["not_compared"].items():
        log.warning("--internal: %s %s", label, reason)
    log.info("internal vs external (AUROC, margin %.2f): kept %s; dropped %s; unclear %s", result["margin"],
             " ".join(result["kept"]) or "none", " ".join(result["dropped"]) or "none",
             " ".join(result["unclear"]) or "none")
    return result


def _discovery_possible(opts: ValtoolOptions, subject: Subject, table, not_run: dict) -> bool:
    """Whether discovery runs: asked for, features available, a discover split with rows (else
    the reason goes to ``not_run``)."""
    if not opts.discover:
        return False
    reason = subject.missing("features")
    if reason is None and ("split" not in table.columns or not (table["split"].astype(str) == opts.discover_split).any()):
        reason = f"no {opts.discover_split!r} split in --csv to fit the slices on (--discover-split): not run"
    if reason:
        not_run["discover"] = reason
        log.warning("discover: %s", reason)
    return reason is None


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

    reference = open_side(run, opts.compare_with, opts.model, opts.pred_format, opts.csv, opts.img_root, subject.labels,
                          rules=opts.rules)
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

    report = check_data(opts.csv, opts.img_root, labels, progress=False, images=False, files=files, rules=opts.rules)
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


def _labelled_summary(opts: ValtoolOptions, labels, data, ev, stress_table, cal, sel, passes, found) -> dict:
    tests = ev["tests"] + corruption_tests(stress_table, labels) + found["tests"]
    if cal.get("ece_above_tolerance_p") is not None and cal["ece_before"] is not None:
        tests.append({"kind": "calibration", "metric": "ece", "value": cal["ece_before"],
                      "ci95": cal.get("ece_before_ci95"), "p_value": cal["ece_above_tolerance_p"]})
    listed = failure_list(tests)
    worst = stress.worst_corruption(stress_table, labels) if len(stress_table) else None
    if worst is not None:  # picked after looking: it carries its own test's p and q
        match = [t for t in listed["tests"] if t["kind"] == "corruption" and (t["corruption"], t["severity"], t["label"])
                 == (worst["corruption"], worst["severity"], worst["label"])]
        worst.update({k: match[0][k] for k in ("ci95", "p_value", "q_value", "finding")} if match else {})
    flagged = [_flag(t) for t in listed["entries"]]
    slices = [t for t in listed["entries"] if t["kind"] == "slice"]
    calibration = {k: cal.get(k) for k in ("temperature", "temperature_ci95", "fitted_on", "fit_split", "ece_before",
                                           "ece_before_ci95", "ece_after", "ece_after_ci95", "ece_change",
                                           "ece_change_ci95", "ece_change_verdict", "nll_before", "nll_before_ci95",
                                           "nll_after", "nll_after_ci95", "ece_toplabel_before",
                                           "ece_toplabel_after")}
    signals = {k: {m: v.get(m) for m in ("aurc", "aurc_ci95", "e_aurc", "e_aurc_ci95")} for k, v in sel["signals"].items()}
    return {
        "mode": "labelled", "csv": str(opts.csv), "split": data.name, "n": int(len(data.df)), "labels": labels,
        "headline": {k: ev["metrics"][k] for k in ("macro", "micro", "per_class")} if ev["metrics"] else None,
        "worst_slices": slices[:10],
        "label_defined_columns": [c for c, r in ev["groups"].items() if r["derived_from_labels"]],
        "most_harmful_corruption": worst,
        "calibration": calibration,
        "uncertainty": {"mc_dropout": cal["mc_dropout"], "tta": cal["tta"]},
        "selective": {k: sel.get(k) for k in ("aurc", "aurc_ci95", "e_aurc", "e_aurc_ci95", "risk_at_full_coverage",
                                              "coverage_at_risk", "comparisons", "best_signal")} | {"signals": signals},
        "discover": _discovery_summary(found["summary"]),
        "model_passes_over_split": passes,
        "failure_family": listed["family"],
        "flagged_problems": flagged,
        "note": NOTICE,
    }


def _discovery_summary(found: dict | None) -> dict | None:
    """What summary.json keeps of discover/discover_summary.json."""
    if found is None:
        return None
    return {"discover_split": found["discover_split"], "slices": len(found["slices"]),
            "shortcut_risks": [r["column"] for r in found["shortcut_risks"]],
            "label_issue_candidates": found["label_issues"]["candidates"]}


# ====== unlabelled folder ======

def run_unlabelled(run: Run, opts: ValtoolOptions, subject: Subject) -> dict:
    model, labels, image_size = subject.model, subject.labels, subject.image_size
    mc_samples, tta_samples, not_run = samplers(subject, opts.mc_samples, opts.tta_samples)
    reference, ref_data = _drift_reference(run, opts, subject, not_run)
    data, where = unlabelled_films(run, opts, labels, image_size)
    paths, df = data.paths, data.df
    if reference is not None and opts.reference:
        check_new_films(len(paths), where)
    elif reference is not None and len(paths) < MIN_IMAGES:
        not_run["drift"] = f"needs at least {MIN_IMAGES} films in {where} for its two-sample tests, found {len(paths)}"
        reference = None
    # ====== the clean passes: the folder's and the reference's (features for drift/) ======
    clean = clean_pass(run, model, data, features=mc_samples > 0 or reference is not None, desc="clean")
    probs = sigmoid(clean["logits"])
    ref_out = clean_pass(run, model, ref_data, features=True, desc="reference") if reference is not None else None
    mc, tta = spread(run, model, data, clean.get("features"), labels, mc_samples, tta_samples, labelled=False)
    extra = {}
    for j, lbl in enumerate(labels):
        extra.update(spread_columns(lbl, j, mc, tta))
    results = corrupted_logits(run, model, data, opts.corruptions)
    if not distributed.is_main():  # every model pass is done; rank 0 alone summarises and writes
        return {}
    shifts, tests = [], []
    # images resampled for the interval and test of each mean shift (a folder has no patients)
    weights = bootstrap_weights(np.arange(len(paths)), opts.bootstrap, run.seed) if opts.bootstrap > 0 else None
    for (name, severity), logits in results.items():
        corrupted = sigmoid(logits)
        delta = corrupted - probs
        row = {"corruption": name, "severity": severity}
        for j, lbl in enumerate(labels):
            moved = np.abs(delta[:, j])
            row[f"mean_abs_shift_{lbl}"] = float(moved.mean())
            row[f"max_abs_shift_{lbl}"] = float(moved.max())
            row[f"flips_{lbl}"] = int(((corrupted[:, j] >= 0.5) != (probs[:, j] >= 0.5)).sum())
            if weights is not None:
                boot = (weights @ moved) / len(moved)
                tests.append({"kind": "prediction_shift", "corruption": name, "severity": int(severity), "label": lbl,
                              "value": float(moved.mean()), "ci95": percentile_ci(boot),
                              "p_value": exceed_p(boot, SHIFT_TOLERANCE)})
        shifts.append(row)
    shifts = pd.DataFrame(shifts)
    measured = measure_images(paths, data.store)  # the quality table's and drift's image properties, read once
    quality = quality_table(measured, data.store.bad, image_size)
    write_csv(run.stage("predictions").outdir / "predictions_images.csv",
              predictions_frame(df, labels, clean["logits"], probs, extra))
    write_csv(run.stage("quality").outdir / "image_quality.csv", quality)
    write_csv(run.stage("stress").outdir / "prediction_shifts.csv", shifts)
    figures.plot_corruption_examples(data.store[0], run.outdir / "stress" / "stress_examples.png", seed=run.seed,
                                     title=f"{paths[0]} at model resolution", names=opts.corruptions)
    flagged = []
    for col in [c for c in quality.columns if c.startswith("flag_")]:
        count = int(quality[col].sum())
        if count:
            flagged.append(_fact("quality", f"{count} image(s) {col.removeprefix('flag_').replace('_', ' ')}", count))
    found = {"summary": None, "tests": []}
    if reference is not None:
        found = write_drift(run.stage("drift"), reference, ref_data, ref_out, data, clean,
                            measured[["image_path", *PROPERTIES]], labels, opts.bootstrap, opts.drift_permutations)
    elif "drift" in not_run:
        log.warning("drift: %s", not_run["drift"])
    listed = failure_list(tests + found["tests"])
    flagged += [_flag(t) for t in listed["entries"]]
    source = {"image_dir": str(opts.image_dir)} if opts.image_dir else {"csv": str(opts.csv), "split": data.name}
    return {"mode": "unlabelled", **source, "n": len(paths), "labels": labels,
            "mean_probability": {lbl: float(probs[:, j].mean()) for j, lbl in enumerate(labels)},
            "uncertainty": {"mc_dropout": public(mc), "tta": public(tta)},
            "largest_prediction_shift": _largest_shift(shifts, labels),
            "model_passes_over_split": model_passes(results, tta, tta_samples),
            "drift": _drift_entry(found["summary"]),
            "failure_family": listed["family"], "flagged_problems": flagged, "not_run": not_run, "note": NOTICE}


def _drift_reference(run: Run, opts: ValtoolOptions, subject: Subject, not_run: dict) -> tuple:
    """(the reference, its rows with pixels) for drift/, read and checked before any model pass;
    (None, None), with the reason in ``not_run``, when there is none (no --reference and no usable
    record in the checkpoint) or the model has no features to compare."""
    record = subject.info.checkpoint if subject.info else None
    root = opts.reference_root if opts.reference_root is not None else opts.img_root
    reference, reason = choose_reference(opts.reference, root, opts.reference_split, record)
    if reason is None and subject.missing("features"):
        if opts.reference:
            raise UserError(f"--reference: drift {subject.missing('features').removesuffix(': not run')}; pass a "
                            "checkpoint or a state_dict as --weights")
        reason = f"drift {subject.missing('features')}"
    if reason is None:
        try:
            return reference, load_reference(run, reference, subject.labels, subject.image_size, opts.rules)
        except UserError as exc:
            if opts.reference:
                raise
            reason = f"the reference the checkpoint records cannot be used ({exc}); pass --reference CSV"
    not_run["drift"] = reason
    return None, None


def _drift_entry(found: dict | None) -> dict | None:
    """What summary.json keeps of drift/drift_summary.json."""
    if found is None:
        return None
    keys = ("drift_detected", "verdict", "decision_rule", "p_value", "domain_auroc", "domain_auroc_ci",
            "domain_p_value", "mmd", "mmd_p_value", "n_reference", "n_new", "reference", "properties_drifted",
            "estimates_valid")
    return {k: found[k] for k in keys} | {"ood_flagged": found["ood"]["count"]}


def _without_label_values(opts: ValtoolOptions) -> bool:
    """Whether --csv lists films without a value for any of the model's analysed labels (no such
    column, or only empty cells): a new site's list of films, analysed as an unlabelled folder is."""
    if not opts.csv or not opts.model.weights or opts.predictions or not Path(opts.csv).is_file():
        return False
    from tools.model_files import choose_labels, read_model_file

    columns = header(opts.csv)
    labels = choose_labels(read_model_file(opts.model)[1], opts.labels, None)
    present = [label for label in labels if find_name(label, columns)]
    if present and not np.isnan(label_matrix(read_kept(opts.csv, present, rules=opts.rules)[0], present)).all():
        return False
    log.info("--csv %s holds no value for the model's labels (%s): analysed as films without labels, like --image-dir",
             opts.csv, " ".join(labels))
    return True


def unlabelled_films(run: Run, opts: ValtoolOptions, labels, image_size: int) -> tuple[SplitData, str]:
    """The films of an unlabelled run and the flag that named them: every image under --image-dir,
    or the rows of --csv (of --split when it has a split column), labels unknown."""
    if opts.image_dir:
        return load_folder(run, opts.image_dir, len(labels), image_size), f"--image-dir {opts.image_dir}"
    source = Source(opts.csv, opts.img_root, read_kept(opts.csv, labels, require_labels=False, rules=opts.rules)[0])
    data = load_split(run, source, opts.split, labels, image_size)
    return replace(data, y=np.full((len(data.paths), len(labels)), np.nan, np.float32)), f"--csv {opts.csv}"


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
    if opts.image_dir or _without_label_values(opts):
        if not opts.model.weights:
            raise UserError("valtool --image-dir needs the model: pass --weights (predictions cannot be made for new images)")
        if opts.predictions:
            raise UserError("valtool --image-dir runs the model on the folder's images; --predictions applies to --csv")
        if opts.internal:
            raise UserError("valtool --internal compares metrics on labelled data: it applies to a labelled --csv, not to "
                            "films without labels")
        if opts.drift_permutations < MIN_PERMUTATIONS:
            raise UserError(f"--drift-permutations {opts.drift_permutations}: need at least {MIN_PERMUTATIONS} for the "
                            "drift tests' null distributions")
        subject = _folder_subject(run, opts, compile)
        summary = run_unlabelled(run, opts, subject)
    else:
        if opts.reference:
            raise UserError("valtool --reference compares films without labels (--image-dir, or a --csv without label "
                            "values) with labelled data; a labelled --csv is evaluated on its own labels")
        subject = open_subject(run, opts.model, opts.predictions, opts.pred_format, opts.csv, opts.img_root,
                               opts.labels, opts.group_cols, compile, opts.rules)
        summary = run_labelled(run, opts, subject)
    if distributed.is_main():
        summary["model"] = {**subject.describe(), **({"record": subject.info.record()} if subject.info else {})}
        write_json(run.outdir / "summary.json", summary)
        log.info("report: %s", write_report(run.outdir).resolve())
    return summary
