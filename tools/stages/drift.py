"""The drift stage: is a new site like the reference the model was validated on? (``tools.drift``)

valtool runs it on an unlabelled folder with a labelled reference: ``--reference CSV``
(``--reference-split``, default val; image paths relative to ``--reference-root``, default
``--img-root``), or else the training CSV and validation split this suite's checkpoint records,
when they are still there. It writes ``drift/drift_summary.json``, ``property_drift.csv``,
``prediction_drift.csv``, ``estimated_performance.json``, ``ood_scores.csv`` and the figures
``property_drift.png``, ``prediction_drift.png``, ``ood_distances.png``, ``ood_montage.png``.
The two-sample tests compare one reference film per patient with the new films; calibration,
predicted prevalence and the out-of-distribution threshold use every reference film. The
reference's model pass runs on every rank (sharded under torchrun, like the new folder's); the
analyses and files on rank 0.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tools import distributed, figures
from tools import drift as dr
from tools.calibration import fit_platt
from tools.errors import UserError
from tools.files import NOTICE, write_csv, write_json
from tools.findings import ALPHA, p_text
from tools.image_stats import image_properties
from tools.metrics import binary_metrics, bootstrap_resamples, sigmoid
from tools.runtime import Run
from tools.splits import SplitData, load_split, read_source
from tools.stats import bh_qvalues
from tools.table import ReadRules, find_name, header

log = logging.getLogger("cxr")

NEEDS_REFERENCE = ("drift and the label-free performance estimate need a labelled reference: pass --reference CSV "
                   "(the data the model was validated on)")
MONTAGE_FILMS = 8  # most atypical films shown


@dataclass
class Reference:
    """The labelled data a new site is compared with: a table, the folder its image paths start
    from, its split (None: every row), and where it came from (``--reference`` or the checkpoint)."""
    csv: str
    img_root: str
    split: str | None
    origin: str


def choose_reference(csv, img_root, split, record: dict | None) -> tuple[Reference | None, str | None]:
    """(the reference, None), or (None, why there is none): ``csv`` when given, else the training
    CSV and validation split the checkpoint ``record`` holds, if the file is still there."""
    if csv:
        return Reference(str(csv), str(img_root), split, "--reference"), None
    data = (record or {}).get("data") or {}
    if not data.get("csv"):
        return None, f"{NEEDS_REFERENCE}; the model file records no training data"
    if not Path(data["csv"]).is_file():
        return None, f"{NEEDS_REFERENCE}; the checkpoint's training CSV {data['csv']} is not there any more"
    return Reference(data["csv"], data["img_root"], data.get("val_split"), "the checkpoint"), None


def _named(reference: Reference, call):
    """``call()``, its errors naming --reference and --reference-root: the table readers are shared
    with --csv and name that flag and --img-root, which would send the user to the wrong ones."""
    try:
        return call()
    except UserError as exc:
        text = str(exc).replace(f"--csv {reference.csv}", f"--reference {reference.csv}")
        raise UserError(text.replace("--img-root", "--reference-root")) from None


def load_reference(run: Run, reference: Reference, labels, image_size: int, rules: ReadRules = ReadRules()) -> SplitData:
    """The reference's rows of its split with their pixels, checked: a column and known values for
    the model's labels (the calibration is fitted on them), rows in the split, MIN_IMAGES films."""
    flag = f"--reference {reference.csv}"
    if not Path(reference.csv).is_file():
        raise UserError(f"{flag}: file not found; pass the labelled CSV the model was validated on (or leave "
                        "--reference out to use the training CSV the checkpoint records)")
    if not any(find_name(label, header(reference.csv)) for label in labels):
        raise UserError(f"{flag}: no column for the model's labels ({' '.join(labels)}); the label-free estimates are "
                        "calibrated on the reference's labels: pass the labelled CSV the model was validated on")
    source = _named(reference, lambda: read_source(reference.csv, reference.img_root, labels, rules=rules))
    table = source.table
    split = reference.split if "split" in table.columns else None  # a table without splits: every row
    if split is not None and not (table["split"].astype(str) == split).any():
        present = ", ".join(sorted(table["split"].dropna().astype(str).unique())) or "none"
        raise UserError(f"--reference-split {split}: no rows in {flag} (splits present: {present}); pass one of them")
    data = _named(reference, lambda: load_split(run, source, split, labels, image_size))
    where = f"{flag}" + (f" (split {data.name})" if data.name else "")
    if len(data.paths) < dr.MIN_IMAGES:
        raise UserError(f"{where}: {len(data.paths)} film(s); the drift tests need at least {dr.MIN_IMAGES} on each "
                        "side: pass a larger reference or split")
    if np.isnan(data.y).all():
        raise UserError(f"{where}: no known label value for {' '.join(labels)}; the label-free estimates are "
                        "calibrated on the reference's labels: pass a labelled reference")
    return data


def check_new_films(n: int, where: str) -> None:
    """A folder too small for two-sample tests is an error that says how many it needs."""
    if n < dr.MIN_IMAGES:
        raise UserError(f"{where}: {n} film(s); the drift tests need at least {dr.MIN_IMAGES} on each side: add films "
                        "or leave out --reference")


# ====== the analyses and their files ======

def write_drift(run: Run, reference: Reference, ref: SplitData, ref_out: dict, new: SplitData, new_out: dict,
                new_properties: pd.DataFrame, labels, bootstrap: int = 1000, permutations: int = 200) -> dict:
    """Every analysis of ``tools.drift`` on the reference ``ref`` and the new films ``new`` (each
    with its clean pass's ``logits`` and ``features``; ``new_properties``: the new films'
    ``tools.image_stats.image_properties``, measured once by the caller); writes the stage's files
    and returns ``{"summary": drift_summary.json's content, "tests": the tests for the failure family}``."""
    if not distributed.is_main():
        return {"summary": None, "tests": []}
    seed = run.seed
    # ====== features: domain classifier and MMD, on one reference film per patient ======
    decision = dr.feature_drift(ref_out["features"], ref.clusters, new_out["features"], permutations, bootstrap, seed)
    tested, domain, mmd = decision["tested"], decision["domain"], decision["mmd"]
    n_ref, n_new = len(tested), len(new.paths)
    sizes = f"n_reference = {n_ref}, n_new = {n_new}"
    verdict = (f"drift detected ({sizes})" if decision["drift_detected"]
               else f"no drift detected at this sample size ({sizes})")

    # ====== image properties ======
    tested_ref = ref.subset(tested)  # the films the tests compare: one per reference patient
    props_ref = image_properties(tested_ref.paths, tested_ref.store)
    properties = dr.property_drift(props_ref, new_properties, seed=seed)
    q = bh_qvalues(properties["p_value"].astype(float).to_numpy())
    properties["q_value"] = np.where(np.isnan(q), None, q)
    write_csv(run.outdir / "property_drift.csv", properties)
    figures.property_drift_figure(props_ref, new_properties, properties, run.outdir / "property_drift.png")

    # ====== predictions ======
    p_ref, p_new = sigmoid(ref_out["logits"]), sigmoid(new_out["logits"])
    predictions = dr.prediction_drift(p_ref, p_new, labels, ref.clusters, bootstrap, seed)
    write_csv(run.outdir / "prediction_drift.csv", predictions)
    figures.prediction_drift_figure(predictions, run.outdir / "prediction_drift.png")

    # ====== performance without labels ======
    estimates = _estimates(ref, ref_out["logits"], new_out["logits"], labels, bootstrap, seed, decision)
    write_json(run.outdir / "estimated_performance.json", estimates)

    # ====== out-of-distribution films ======
    ood = dr.ood_scores(ref_out["features"], new_out["features"], ref.clusters, seed)
    order = np.argsort(-ood["new_scores"], kind="mergesort")
    write_csv(run.outdir / "ood_scores.csv",
              pd.DataFrame({"image_path": [new.paths[i] for i in order], "score": ood["new_scores"][order],
                            "flagged": ood["flagged"][order]}))
    figures.ood_figure(ood["reference_scores"], ood["new_scores"], ood["threshold"], run.outdir / "ood_distances.png")
    shown = order[:MONTAGE_FILMS]
    figures.montage_figure([new.store[i] for i in shown],
                           [f"{Path(new.paths[i]).name}: {ood['new_scores'][i]:.1f}{' (flagged)' if ood['flagged'][i] else ''}"
                            for i in shown],
                           f"new site, most atypical first (flagged: distance above {ood['threshold']:.1f})",
                           run.outdir / "ood_montage.png")

    summary = {
        "reference": {"csv": reference.csv, "img_root": reference.img_root, "split": ref.name,
                      "origin": reference.origin},
        "drift_detected": decision["drift_detected"], "verdict": verdict, "decision_rule": decision["rule"],
        "p_value": decision["p_value"], "n_reference": n_ref, "n_new": n_new, "reference_films": len(ref.paths),
        "domain_auroc": domain["auroc"], "domain_auroc_ci": domain["ci95"], "domain_p_value": domain["p_value"],
        "domain_p_permutation": domain["p_permutation"], "domain_folds": domain["folds"],
        "mmd": mmd["mmd"], "mmd_p_value": mmd["p_value"], "mmd_p_permutation": mmd["p_permutation"],
        "mmd_bandwidth": mmd["bandwidth"], "permutations": int(permutations),
        "feature_components": decision["components"],
        "properties_drifted": [r["property"] for _, r in properties.iterrows()
                               if r["q_value"] is not None and r["q_value"] < ALPHA],
        "ood": {k: ood[k] for k in ("threshold", "count", "n", "expected", "share", "share_ci95", "p_value",
                                    "reference_share")} | {"quantile": dr.OOD_QUANTILE},
        "estimates_valid": estimates["valid"],
        "note": NOTICE,
    }
    write_json(run.outdir / "drift_summary.json", summary)
    log.info("drift: %s; domain classifier AUROC %.3f (p %s), MMD^2 %.4f (p %s); %d of %d films out of distribution",
             verdict, domain["auroc"], p_text(domain["p_value"]), mmd["mmd"], p_text(mmd["p_value"]), ood["count"],
             n_new)
    return {"summary": summary, "tests": _tests(summary, domain, properties, predictions, ood)}


def _estimates(ref: SplitData, ref_logits, new_logits, labels, bootstrap: int, seed: int, decision: dict) -> dict:
    """estimated_performance.json: per label, CBPE's expected metrics with intervals, valid unless
    feature drift was detected, beside the metrics measured on the reference."""
    calibration = fit_platt(ref_logits, ref.y)
    draws = fit_platt(ref_logits, ref.y, bootstrap_resamples(ref.clusters, bootstrap, seed)) if bootstrap > 0 else None
    estimated = dr.estimate_performance(new_logits, calibration, labels, draws, bootstrap, seed)
    valid = not decision["drift_detected"]
    reason = None if valid else ("feature drift detected: the films are not like the reference's, so the reference's "
                                 "calibration need not hold for them; the estimate is shown for orientation only")
    measured = _measured(ref.y, sigmoid(ref_logits), labels)
    # a label with one class in the reference has nothing to be calibrated on: no estimate
    uncalibrated = [label for label in labels if measured[label]["auroc"] is None]
    if uncalibrated:
        log.warning("drift: %s with one class only in the reference: not calibrated, no valid estimate",
                    " ".join(uncalibrated))
    per_label = {}
    for j, label in enumerate(labels):
        e = estimated[label]
        per_label[label] = {
            "auroc": e["auroc"], "auroc_ci": e["auroc_ci"], "f1@0.5": e["f1@0.5"], "f1@0.5_ci": e["f1@0.5_ci"],
            "sensitivity": e["sensitivity"], "sensitivity_ci": e["sensitivity_ci"],
            "specificity": e["specificity"], "specificity_ci": e["specificity_ci"],
            "expected_prevalence": e["prevalence"], "valid": valid and label not in uncalibrated,
            "calibration": {"slope": float(calibration[j, 0]), "bias": float(calibration[j, 1])},
            "reference_measured": measured[label]}
    return {"method": "CBPE: expected metrics under labels drawn from Platt-calibrated probabilities (fitted on the "
                      "reference); intervals: percentiles over label draws with the calibration refitted on bootstrap "
                      "resamples of the reference",
            "valid": valid, "invalid_reason": reason, "uncalibrated_labels": uncalibrated, "n_new": int(len(new_logits)),
            "simulations": int(bootstrap), "labels": list(labels), "per_label": per_label, "note": NOTICE}


def _measured(y, p, labels) -> dict:
    """The reference's own metrics at 0.5 (what the estimate would be compared with were the new
    site like it)."""
    out = {}
    for j, label in enumerate(labels):
        known = ~np.isnan(y[:, j])
        t, s = y[known, j], p[known, j]
        decided = s >= 0.5
        sens = float(np.mean(decided[t == 1])) if (t == 1).any() else None
        spec = float(np.mean(~decided[t == 0])) if (t == 0).any() else None
        m = binary_metrics(t, s)
        out[label] = {"auroc": None if np.isnan(m["auroc"]) else m["auroc"],
                      "f1@0.5": None if np.isnan(m["f1@0.5"]) else m["f1@0.5"], "sensitivity": sens,
                      "specificity": spec, "n": int(known.sum())}
    return out


def _tests(summary: dict, domain: dict, properties: pd.DataFrame, predictions: pd.DataFrame, ood: dict) -> list[dict]:
    """The stage's entries for the failure family: the feature drift (the two tests, Holm-adjusted),
    each property, each label's mean-probability shift, the out-of-distribution count."""
    tests = []
    if summary["p_value"] is not None:
        tests.append({"kind": "drift", "value": domain["auroc"], "ci95": domain["ci95"], "p_value": summary["p_value"],
                      "mmd": summary["mmd"], "n_reference": summary["n_reference"], "n_new": summary["n_new"]})
    for _, r in properties.iterrows():
        if r["p_value"] is not None and not pd.isna(r["p_value"]):
            tests.append({"kind": "property_drift", "property": r["property"], "statistic": r["statistic"],
                          "value": float(r["distance"]), "ci95": _interval(r["distance_ci_low"], r["distance_ci_high"]),
                          "p_value": float(r["p_value"]),
                          "reference": _shown(r, "reference"), "new": _shown(r, "new")})
    for _, r in predictions.iterrows():
        if r["p_value"] is not None and not pd.isna(r["p_value"]):
            tests.append({"kind": "prediction_drift", "label": r["label"], "value": float(r["difference"]),
                          "ci95": [float(r["ci_low"]), float(r["ci_high"])], "p_value": float(r["p_value"]),
                          "reference": float(r["reference_mean_prob"]), "new": float(r["new_mean_prob"])})
    if ood["p_value"] is not None:
        tests.append({"kind": "ood", "value": ood["share"], "ci95": ood["share_ci95"], "p_value": ood["p_value"],
                      "count": ood["count"], "n": ood["n"], "expected": ood["expected"]})
    return tests


def _interval(low, high) -> list | None:
    return None if low is None or pd.isna(low) else [float(low), float(high)]


def _shown(row, side: str) -> str:
    """A property's typical value on one side: its mean for a number, its most common value else."""
    mean = row[f"{side}_mean"]
    return f"{mean:.3g}" if mean is not None and not pd.isna(mean) else str(row[f"{side}_mode"])
