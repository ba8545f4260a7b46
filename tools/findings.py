"""The failure list: every comparison the suite makes, one family, one correction.

Each analysis contributes tests: a group against the rest of the patients for each flaggable
gap (``tools.slicing``: group column x group x label or macro x metric; a column with two values
gives one comparison per label and metric, not two), a corrupted pass against the clean one per
label (stress), ECE against its tolerance (calibration), and from ``tools.discover``: each
discovered slice against the rest, each column probed for a shortcut, each label's count of
confident contradictions against chance; on an unlabelled folder, each mean probability shift
under a corruption against its tolerance and, against a reference (``tools.drift``), the feature
drift (two tests, Holm-adjusted), each image property's distribution, each label's mean
predicted probability and the count of out-of-distribution films. Every test carries a p-value; the
Benjamini-Hochberg q-values are computed over the whole family (``tools.stats.bh_qvalues``).

An entry of the list is a test that points to a failure (the model does worse: a gap or a drop
below 0, by at least MIN_DROP for a corruption; an ECE or a shift above its tolerance; a column
the features predict with AUROC >= MIN_PROBE_AUROC while a label's prevalence differs across it;
more contradicted labels than chance gives; a new site unlike the reference: its features, an
image property by a distance of MIN_PROPERTY_DISTANCE or more, a label's mean probability by
MIN_PREVALENCE_SHIFT or more, more out-of-distribution films than the 1% expected) with p < ALPHA. It
is a **finding** when q < ALPHA, otherwise a **candidate**: seen in this data, not established
once the number of comparisons is accounted for.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from tools.discover import MIN_PROBE_AUROC
from tools.stats import bh_qvalues

ALPHA = 0.05
FLAG_METRICS = ("auroc", "sens@95spec", "f1@0.5", "sens@0.5", "spec@0.5")
MIN_DROP = 0.02       # an AUROC drop under a corruption smaller than this is not a failure
ECE_TOLERANCE = 0.05  # an ECE above this is a calibration failure
SHIFT_TOLERANCE = 0.05  # unlabelled: a mean |probability shift| under a corruption above this
MIN_PROPERTY_DISTANCE = 0.1  # a new site: an image property nearer the reference's (KS / total variation) is no failure
MIN_PREVALENCE_SHIFT = 0.05  # nor is a label's mean predicted probability moving by less than this


def slice_tests(result: dict, labels, metrics=FLAG_METRICS) -> list[dict]:
    """Every flaggable gap of one ``tools.slicing.group_metrics`` result with a p-value; a column
    with two groups gives one test per (label, metric): the side with the lower gap."""
    tests = []
    for value, block in result["groups"].items():
        gap = block.get("gap_to_rest")
        if not gap:
            continue
        for name in ["macro", *labels]:
            g = gap["macro"] if name == "macro" else gap["per_class"][name]
            if not g.get("flaggable"):
                continue
            for m in metrics:
                p = (g.get("p_value") or {}).get(m)
                if p is None or g.get(m) is None or not np.isfinite(g[m]):
                    continue
                tests.append({"kind": "slice", "group_col": result["group_col"], "group": value, "label": name,
                              "metric": m, "gap": float(g[m]), "ci95": (g.get("ci95") or {}).get(m),
                              "p_value": p, "n": block["n"], "small": block["small"]})
    if len(result["groups"]) == 2:
        lowest = {}
        for t in tests:
            key = (t["label"], t["metric"])
            if key not in lowest or t["gap"] < lowest[key]["gap"]:
                lowest[key] = t
        tests = list(lowest.values())
    return tests


def corruption_tests(summary: pd.DataFrame, labels) -> list[dict]:
    """One test per corrupted pass and label: the AUROC drop against the clean pass (stress's
    ``stress_summary.csv`` with its ``delta_auroc_<L>_p`` columns)."""
    tests = []
    if not len(summary) or "corruption" not in summary.columns:
        return tests
    for _, r in summary[summary["corruption"] != "clean"].iterrows():
        for lbl in labels:
            d, p = r[f"delta_auroc_{lbl}"], r.get(f"delta_auroc_{lbl}_p")
            if pd.isna(d) or p is None or pd.isna(p):
                continue
            lo, hi = r[f"delta_auroc_{lbl}_lo"], r[f"delta_auroc_{lbl}_hi"]
            tests.append({"kind": "corruption", "corruption": r["corruption"], "severity": int(r["severity"]),
                          "param": r["param"], "label": lbl, "metric": "auroc", "gap": float(d),
                          "ci95": None if pd.isna(lo) else [float(lo), float(hi)], "p_value": float(p)})
    return tests


def is_failure(test: dict) -> bool:
    """Whether a test points to a failure (before its p-value is looked at)."""
    if test["kind"] == "calibration":
        return test["value"] > ECE_TOLERANCE
    if test["kind"] == "prediction_shift":
        return test["value"] > SHIFT_TOLERANCE
    if test["kind"] == "corruption":
        return test["gap"] <= -MIN_DROP
    if test["kind"] == "shortcut":
        return test["value"] >= MIN_PROBE_AUROC and test.get("label") is not None
    if test["kind"] == "label_issue":
        return test["count"] > test["expected"]
    if test["kind"] == "drift":
        return True
    if test["kind"] == "property_drift":
        return test["value"] >= MIN_PROPERTY_DISTANCE
    if test["kind"] == "prediction_drift":
        return abs(test["value"]) >= MIN_PREVALENCE_SHIFT
    if test["kind"] == "ood":
        return test["count"] > test["expected"]
    return test["gap"] < 0


def failure_list(tests: list[dict], alpha: float = ALPHA) -> dict:
    """``{"family": {...}, "tests": [...], "entries": [...]}``: every test with its q-value and
    ``finding`` (copies; ``tests`` is left as given), then the tests that point to a failure with
    p < alpha, findings (q < alpha) first, each by q then by size."""
    q = bh_qvalues([np.nan if t["p_value"] is None else t["p_value"] for t in tests])
    tests = [{**t, "q_value": None if np.isnan(qv) else float(qv), "finding": bool(qv < alpha)}
             for t, qv in zip(tests, q)]
    entries = [t for t in tests if t["p_value"] is not None and t["p_value"] < alpha and is_failure(t)]
    entries.sort(key=lambda t: (not t["finding"], t["q_value"], t["gap"] if "gap" in t else -t["value"]))
    kinds = sorted({t["kind"] for t in tests})
    family = {"tests": len(tests), "by_kind": {k: sum(t["kind"] == k for t in tests) for k in kinds},
              "method": "Benjamini-Hochberg", "alpha": alpha,
              "findings": sum(t["finding"] for t in entries), "candidates": sum(not t["finding"] for t in entries)}
    return {"family": family, "tests": tests, "entries": entries}


def describe(test: dict) -> str:
    """One line for a console, the report and ``flagged_problems``."""
    stat = f"p = {p_text(test['p_value'])}, q = {p_text(test.get('q_value'))}"
    if test["kind"] == "slice":
        small = ", small group" if test.get("small") else ""
        return (f"{test['group_col']}={test['group']}: {test['label']} {test['metric']} {test['gap']:+.3f} vs the "
                f"rest{_ci(test['ci95'])} (n={test['n']}{small}; {stat})")
    if test["kind"] == "corruption":
        return (f"{test['corruption']} severity {test['severity']} ({test['param']}): {test['label']} AUROC "
                f"{test['gap']:+.3f}{_ci(test['ci95'])} ({stat})")
    if test["kind"] == "discovered_slice":
        return f"discovered slice {test['slice_id']} ({test['label']}): {test['description']} ({stat})"
    ci = test["ci95"]
    shown = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    if test["kind"] == "shortcut":
        return (f"shortcut risk {test['column']}: the features predict it (probe AUROC {test['value']:.3f}{shown}) "
                f"and {test['detail']} ({stat})")
    if test["kind"] == "label_issue":
        return (f"{test['label']} labels ({test['split']}): {test['count']} of {test['n']} contradicted with confidence "
                f"({test['value']:.1%}{_pct(ci)}), {test['expected']:.1f} expected from calibrated probabilities ({stat})")
    if test["kind"] == "prediction_shift":
        return (f"{test['corruption']} severity {test['severity']}: {test['label']} probability moves "
                f"{test['value']:.3f}{shown} on average, above {SHIFT_TOLERANCE} ({stat})")
    if test["kind"] == "drift":
        return (f"the new site's films differ from the reference's: domain classifier AUROC {test['value']:.3f}{shown}, "
                f"MMD^2 {test['mmd']:.4f} (n_reference = {test['n_reference']}, n_new = {test['n_new']}; {stat}, "
                "Holm over the two tests)")
    if test["kind"] == "property_drift":
        return (f"image property {test['property']}: {test['reference']} at the reference, {test['new']} at the new site "
                f"({test['statistic']} distance {test['value']:.3f}{shown}; {stat})")
    if test["kind"] == "prediction_drift":
        return (f"{test['label']} mean predicted probability {test['reference']:.3f} at the reference, {test['new']:.3f} "
                f"at the new site ({test['value']:+.3f}{_ci(ci)}; {stat})")
    if test["kind"] == "ood":
        return (f"{test['count']} of {test['n']} films out of distribution ({test['value']:.1%}{_pct(ci)}), "
                f"{test['expected']:.1f} expected at the reference's 99th percentile ({stat})")
    return f"ECE {test['value']:.3f}{shown}, above the tolerance {ECE_TOLERANCE} ({stat})"


def p_text(value) -> str:
    """A p- or q-value in a sentence: three decimals, "<0.001" below that, "n/a" when absent."""
    return "n/a" if value is None else ("<0.001" if value < 0.001 else f"{value:.3f}")


def _pct(ci) -> str:
    return f" [{ci[0]:.1%}, {ci[1]:.1%}]" if ci else ""


def _ci(ci) -> str:
    return "" if not ci else f" [{ci[0]:+.3f}, {ci[1]:+.3f}]"
