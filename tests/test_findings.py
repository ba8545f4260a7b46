"""Findings a statistician would sign: p- and q-values over one family of comparisons, intervals
that stay intervals at a boundary, columns defined by the labels kept out, a calibration split
of its own, and intervals on every headline number; checked against scipy and on data where the
truth was planted (and where nothing was)."""
import json

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import minimize_scalar
from scipy.stats import binomtest, false_discovery_control, norm
from sklearn.metrics import roc_auc_score

from conftest import run_main
from tools.findings import failure_list, slice_tests
from tools.slicing import group_metrics
from tools.stats import auroc_score_interval, bh_qvalues, bootstrap_p, mover, mover_p, score_interval, wilson

LABELS = ["Cardiomegaly", "Edema", "Effusion"]


# ====== the building blocks against scipy ======

def test_bh_qvalues_equal_scipy():
    rng = np.random.default_rng(0)
    p = np.r_[rng.random(40) ** 3, 1.0, 0.0]
    np.testing.assert_allclose(bh_qvalues(p), false_discovery_control(p), rtol=1e-12)
    with_nan = np.r_[p, np.nan]
    q = bh_qvalues(with_nan)
    assert np.isnan(q[-1])
    np.testing.assert_allclose(q[:-1], false_discovery_control(p), rtol=1e-12)  # NaN is not counted in m


@pytest.mark.parametrize("k,n", [(0, 12), (7, 20), (20, 20), (311, 400)])
def test_wilson_equals_scipy(k, n):
    expected = binomtest(k, n).proportion_ci(method="wilson")
    lo, hi = wilson(k, n)
    assert lo == pytest.approx(expected.low, abs=1e-12) and hi == pytest.approx(expected.high, abs=1e-12)


def test_auroc_score_interval_solves_its_equation_and_covers():
    lo, hi = auroc_score_interval([0.8, 1.0], [30, 25], [60, 40])
    for t, theta, m, n in ((lo[0], 0.8, 30, 60), (hi[0], 0.8, 30, 60), (lo[1], 1.0, 25, 40)):
        big_n = (m + n) / 2
        v = t * (1 - t) / (m * n) * (1 + (big_n - 1) * ((1 - t) / (2 - t) + t / (1 + t)))
        assert (theta - t) ** 2 == pytest.approx(norm.ppf(0.975) ** 2 * v, abs=1e-9)
    assert lo[1] < 0.95 and hi[1] == 1.0  # a perfect AUROC still gets an interval
    # coverage on binormal scores with true AUROC Phi(1.5 / sqrt(2)) = 0.855
    rng = np.random.default_rng(1)
    truth, covered = norm.cdf(1.5 / np.sqrt(2)), 0
    for _ in range(300):
        pos, neg = rng.normal(1.5, 1, 25), rng.normal(0, 1, 40)
        a = roc_auc_score(np.r_[np.ones(25), np.zeros(40)], np.r_[pos, neg])
        lo, hi = auroc_score_interval(a, 25, 40)
        covered += lo <= truth <= hi
    assert covered / 300 >= 0.92


def test_a_specificity_interval_counts_the_negatives_and_a_sensitivity_the_positives():
    for metric, k, n in (("spec@0.5", 180, 200), ("sens@0.5", 9, 10), ("sens@95spec", 9, 10)):
        expected = binomtest(k, n).proportion_ci(method="wilson")
        lo, hi = score_interval(metric, k / n, 10, 200)
        assert lo == pytest.approx(expected.low, abs=1e-12) and hi == pytest.approx(expected.high, abs=1e-12)


def test_mover_p_is_below_005_exactly_when_the_95_interval_excludes_0():
    rng = np.random.default_rng(2)
    t1, t2 = rng.uniform(0.6, 1.0, 200), rng.uniform(0.6, 1.0, 200)
    pos1, neg1, pos2, neg2 = (rng.integers(10, 80, 200) for _ in range(4))
    for metric in ("auroc", "sens@95spec", "sens@0.5", "spec@0.5"):
        p = mover_p(metric, t1, pos1, neg1, t2, pos2, neg2)
        lo1, hi1 = score_interval(metric, t1, pos1, neg1)
        lo2, hi2 = score_interval(metric, t2, pos2, neg2)
        lower, upper = mover(t1 - t2, lo1, hi1, t1, lo2, hi2, t2)
        excludes = (lower > 0) | (upper < 0)
        clear = np.abs(p - 0.05) > 1e-6
        assert np.array_equal((p < 0.05)[clear], excludes[clear])


def test_bootstrap_p_from_the_bootstrap_standard_error():
    boot = np.random.default_rng(3).normal(-0.1, 0.04, 500)
    assert bootstrap_p(-0.1, boot) == pytest.approx(2 * norm.sf(0.1 / np.std(boot, ddof=1)))
    assert bootstrap_p(0.0, np.zeros(50)) == 1.0 and bootstrap_p(0.1, np.full(50, 0.1)) == 0.0
    assert bootstrap_p(0.1, np.full(5, 0.1)) is None  # too few resamples


# ====== slices ======

def synthetic(seed, n_patients=400, planted=0.0):
    """Patients of 1-3 films, three labels, informative scores and metadata drawn independently
    of everything (nothing planted) except, with ``planted`` > 0, Edema scores in site C pulled
    towards noise by that share."""
    rng = np.random.default_rng(seed)
    per = rng.integers(1, 4, n_patients)
    patient = np.repeat(np.arange(n_patients), per)
    n = len(patient)
    y = (rng.random((n, 3)) < [0.3, 0.25, 0.35]).astype(float)
    z = 1.6 * (2 * y - 1) + rng.normal(0, 1.2, (n, 3))
    site = rng.choice(list("ABC"), n_patients)[patient]
    if planted:
        c = site == "C"
        z[c, 1] = (1 - planted) * z[c, 1] + planted * rng.normal(0, 1.6, c.sum())
    df = pd.DataFrame({"site": site, "sex": rng.choice(["F", "M"], n_patients)[patient],
                       "age": rng.integers(20, 90, n_patients)[patient],
                       "n_findings": y.sum(1).astype(int)})
    return df, y, 1 / (1 + np.exp(-z)), patient.astype(str)


def family(df, y, p, clusters, cols, n_boot=200, seed=0):
    tests, results = [], {}
    for col in cols:
        results[col] = group_metrics(df, y, p, LABELS, col, clusters, n_boot=n_boot, seed=seed)
        tests += slice_tests(results[col], LABELS)
    listed = failure_list(tests)
    return listed, listed["tests"], results


@pytest.mark.slow
def test_nothing_planted_gives_findings_at_no_more_than_the_nominal_rate():
    """20 seeds of data where no group differs: BH at 0.05 keeps the chance of any finding at
    about 5% (a seed with a finding: expected about 1 of 20), and raw p < 0.05 near 5% of tests."""
    seeds_with_finding, n_tests, n_raw = 0, 0, 0
    for seed in range(20):
        df, y, p, clusters = synthetic(seed)
        listed, tests, _ = family(df, y, p, clusters, ["site", "sex", "age"], n_boot=200, seed=seed)
        seeds_with_finding += listed["family"]["findings"] > 0
        n_tests += len(tests)
        n_raw += sum(t["p_value"] < 0.05 for t in tests)
    assert seeds_with_finding <= 3  # P(Binomial(20, 0.05) > 3) = 0.016
    assert 0.01 <= n_raw / n_tests <= 0.10


def test_a_planted_slice_failure_is_a_finding_and_a_two_valued_column_is_one_comparison():
    df, y, p, clusters = synthetic(7, n_patients=700, planted=0.8)
    listed, tests, results = family(df, y, p, clusters, ["site", "sex", "n_findings"], n_boot=300)
    found = [t for t in listed["entries"] if t["finding"]]
    assert any(t["group"] == "C" and t["label"] == "Edema" and t["metric"] == "auroc" for t in found)
    assert all(t["group_col"] == "site" and t["group"] == "C" and t["label"] in ("Edema", "macro") for t in found)
    sex = [t for t in tests if t["group_col"] == "sex"]
    keys = [(t["label"], t["metric"]) for t in sex]
    assert len(keys) == len(set(keys)) > 0  # F against M, once per label and metric
    q = false_discovery_control([t["p_value"] for t in tests])
    assert [t["q_value"] for t in tests] == pytest.approx(list(q))
    assert all(t["finding"] == (t["q_value"] < 0.05) for t in tests)


def test_false_positives_in_a_group_are_a_specificity_finding_that_auroc_and_f1_miss():
    """The AP mechanism of the demo: in one view every Cardiomegaly score is pushed up (a bigger
    apparent heart), so the ranking within the view is kept but its negatives are called positive
    more often. The specificity gap at 0.5 is a finding; the AUROC gap is not."""
    df, y, p, clusters = synthetic(8, n_patients=700)
    rng = np.random.default_rng(8)
    df["view"] = np.where(rng.random(700) < 0.35, "AP", "PA")[clusters.astype(int)]
    ap = df["view"].to_numpy() == "AP"
    logit = np.log(p[:, 0] / (1 - p[:, 0]))
    p[ap, 0] = 1 / (1 + np.exp(-(logit[ap] + 1.5)))
    listed, tests, results = family(df, y, p, clusters, ["view", "site"], n_boot=300)
    found = {(t["group"], t["label"], t["metric"]) for t in listed["entries"] if t["finding"]}
    assert ("AP", "Cardiomegaly", "spec@0.5") in found
    assert not any(g == "AP" and m in ("auroc", "sens@0.5") for g, _, m in found)
    gap = results["view"]["groups"]["AP"]["gap_to_rest"]["per_class"]["Cardiomegaly"]
    assert gap["spec@0.5"] < -0.2 < 0.05 < gap["sens@0.5"]
    lo, hi = gap["ci95"]["spec@0.5"]
    assert lo < gap["spec@0.5"] < hi < 0
    # the same numbers from the confusion matrix of each side
    yy, pp = y[:, 0], p[:, 0]
    spec = lambda m: np.mean(pp[m & (yy == 0)] < 0.5)  # noqa: E731
    assert gap["spec@0.5"] == pytest.approx(spec(ap) - spec(~ap), abs=1e-12)


def test_a_column_that_counts_the_positive_labels_is_defined_by_the_labels():
    df, y, p, clusters = synthetic(3)
    _, tests, results = family(df, y, p, clusters, ["n_findings", "site"], n_boot=50)
    assert results["n_findings"]["derived_from_labels"] is True
    assert results["site"]["derived_from_labels"] is False
    for block in results["n_findings"]["groups"].values():
        gap = block["gap_to_rest"]
        assert all(g["derived_from_labels"] and not g["flaggable"] for g in [gap["macro"], *gap["per_class"].values()])
    assert tests and all(t["group_col"] == "site" for t in tests)


def test_a_perfect_group_gets_an_interval_and_a_gap_that_are_not_points():
    rng = np.random.default_rng(4)
    n = 600
    y = (rng.random((n, 3)) < 0.4).astype(float)
    group = np.where(np.arange(n) < 150, "perfect", "rest")
    p = 1 / (1 + np.exp(-(1.2 * (2 * y - 1) + rng.normal(0, 1, (n, 3)))))
    perfect = group == "perfect"
    p[perfect] = np.where(y[perfect] == 1, 0.6 + 0.3 * rng.random((perfect.sum(), 3)), 0.1 * rng.random((perfect.sum(), 3)))
    result = group_metrics(pd.DataFrame({"g": group}), y, p, LABELS, "g", np.arange(n), n_boot=200)
    block = result["groups"]["perfect"]
    for lbl in LABELS:
        c = block["per_class"][lbl]
        assert c["auroc"] == 1.0
        lo, hi = c["ci95"]["auroc"]
        assert lo < 0.99 and hi == 1.0  # a percentile bootstrap alone would give [1, 1]
        glo, ghi = block["gap_to_rest"]["per_class"][lbl]["ci95"]["auroc"]
        assert glo < block["gap_to_rest"]["per_class"][lbl]["auroc"] < ghi
    assert block["macro"]["ci95"]["auroc"][0] < 0.99


def test_too_few_positives_or_negatives_make_a_gap_unflaggable():
    df, y, p, clusters = synthetic(5, n_patients=300)
    df["tiny"] = np.where(np.arange(len(df)) < 12, "few", "many")
    result = group_metrics(df, y, p, LABELS, "tiny", clusters, n_boot=50)
    gap = result["groups"]["few"]["gap_to_rest"]
    assert not any(g["flaggable"] for g in [gap["macro"], *gap["per_class"].values()])
    assert slice_tests(result, LABELS) == []


# ====== end to end through main.py, on predictions alone ======

@pytest.fixture(scope="module")
def planted_csv(tmp_path_factory):
    """A labelled table (no images: predictions alone) with train/val/calib/test splits, site C
    Edema planted as a failure, and a column counting the positive labels."""
    d = tmp_path_factory.mktemp("findings")
    df, y, p, clusters = synthetic(11, n_patients=900, planted=0.8)
    n = len(df)
    rng = np.random.default_rng(0)
    split_of_patient = rng.choice(["train", "val", "calib", "test"], 900, p=[0.2, 0.2, 0.2, 0.4])
    table = pd.DataFrame({"image_path": [f"films/{i}.png" for i in range(n)], "patient_id": clusters,
                          "split": split_of_patient[clusters.astype(int)],
                          **{lbl: y[:, j] for j, lbl in enumerate(LABELS)}, "site": df["site"], "sex": df["sex"],
                          "num_findings": df["n_findings"]})
    # the logits are stretched 3.5 times (calibrated logits would be about 2.2 times the scores'),
    # so the model is over-confident and its temperature about 1.6
    preds = pd.DataFrame({"image_path": table["image_path"],
                          **{f"{lbl}_logit": 3.5 * np.log(p[:, j] / (1 - p[:, j])) for j, lbl in enumerate(LABELS)}})
    table.to_csv(d / "labels.csv", index=False)
    preds.to_csv(d / "preds.csv", index=False)
    return {"dir": d, "table": table, "preds": preds}


def test_valtool_lists_findings_with_q_values_over_the_whole_family(planted_csv, tmp_path):
    d = planted_csv["dir"]
    out = tmp_path / "vt"
    assert run_main("valtool", "--csv", d / "labels.csv", "--img-root", d, "--predictions", d / "preds.csv",
                    "--group-col", "site", "sex", "num_findings", "--bootstrap", 300, "--outdir", out) == 0
    summary = json.loads((out / "summary.json").read_text())
    tests = pd.read_csv(out / "eval" / "slice_tests.csv")
    assert set(tests["group_col"]) <= {"site", "sex"}
    assert summary["label_defined_columns"] == ["num_findings"]
    groups = json.loads((out / "eval" / "group_metrics_num_findings.json").read_text())
    assert groups["derived_from_labels"] is True
    # the family: every slice test and the calibration test; q recomputed here with scipy
    cal = json.loads((out / "calibrate" / "calibration_summary.json").read_text())
    p_all = list(tests["p_value"]) + ([cal["ece_above_tolerance_p"]] if cal["ece_before"] is not None else [])
    q_all = false_discovery_control(p_all)
    assert summary["failure_family"]["tests"] == len(p_all)
    slices = [f for f in summary["flagged_problems"] if f["kind"] == "slice"]
    for f in slices:
        row = tests[(tests["group_col"] == f["group_col"]) & (tests["group"].astype(str) == str(f["group"]))
                    & (tests["label"] == f["label"]) & (tests["metric"] == f["metric"])]
        assert len(row) == 1 and f["p_value"] == pytest.approx(row["p_value"].iloc[0])
        assert f["q_value"] == pytest.approx(q_all[row.index[0]])
        assert f["finding"] == (f["q_value"] < 0.05) and f["p_value"] < 0.05 and f["gap"] < 0
    assert any(f["finding"] and f["group"] == "C" and f["label"] == "Edema" for f in slices)
    assert all(f["group_col"] == "site" and f["group"] == "C" for f in slices if f["finding"])
    for f in summary["flagged_problems"]:
        assert {"p_value", "q_value", "finding"} <= set(f)
    report = (out / "report.html").read_text()
    assert "Benjamini-Hochberg" in report and "Candidates" in report and "Findings" in report


def test_calibration_is_fitted_on_the_calib_split_and_every_headline_has_an_interval(planted_csv, tmp_path):
    d, table, preds = planted_csv["dir"], planted_csv["table"], planted_csv["preds"]
    out = tmp_path / "cal"
    assert run_main("calibrate", "--csv", d / "labels.csv", "--img-root", d, "--predictions", d / "preds.csv",
                    "--bootstrap", 200, "--outdir", out) == 0
    cal = json.loads((out / "calibration_summary.json").read_text())
    assert cal["fit_split"] == "calib"
    rows = (table["split"] == "calib").to_numpy()
    z = preds[[f"{lbl}_logit" for lbl in LABELS]].to_numpy()[rows].ravel()
    y = table[LABELS].to_numpy(float)[rows].ravel()

    def nll(log_t):
        q = np.clip(1 / (1 + np.exp(-z / np.exp(log_t))), 1e-12, 1 - 1e-12)
        return -np.mean(y * np.log(q) + (1 - y) * np.log(1 - q))

    best = np.exp(minimize_scalar(nll, bounds=(-4, 4), method="bounded", options={"xatol": 1e-9}).x)
    assert cal["temperature"] == pytest.approx(best, rel=1e-3)
    for key in ("ece_before", "ece_after", "nll_before", "nll_after", "brier_before", "brier_after", "temperature"):
        lo, hi = cal[f"{key}_ci95"]
        assert lo <= cal[key] <= hi and lo < hi
    lo, hi = cal["ece_change_ci95"]
    assert lo <= cal["ece_after"] - cal["ece_before"] <= hi
    assert cal["temperature"] > 1.3  # the planted over-confidence
    said = "lowered the ECE" if hi < 0 else "raised the ECE" if lo > 0 else "paired 95% interval holds 0"
    assert said in cal["ece_change_verdict"]  # a claim only as far as the paired interval allows

    out = tmp_path / "sel"
    assert run_main("selective", "--csv", d / "labels.csv", "--img-root", d, "--predictions", d / "preds.csv",
                    "--confidence", "all", "--bootstrap", 200, "--outdir", out) == 0
    sel = json.loads((out / "selective_summary.json").read_text())
    for name, s in sel["signals"].items():
        for key in ("aurc", "e_aurc"):
            lo, hi = s[f"{key}_ci95"]
            assert lo <= s[key] <= hi
    (cmp,) = sel["comparisons"]
    assert {cmp["a"], cmp["b"]} == {"maxprob", "calibrated"}
    assert cmp["aurc_diff"] == pytest.approx(sel["signals"][cmp["a"]]["aurc"] - sel["signals"][cmp["b"]]["aurc"])
    assert cmp["ci95"][0] <= cmp["aurc_diff"] <= cmp["ci95"][1]


def test_fitting_on_the_selection_split_is_warned_about(planted_csv, tmp_path, capfd):
    d = planted_csv["dir"]
    assert run_main("calibrate", "--csv", d / "labels.csv", "--img-root", d, "--predictions", d / "preds.csv",
                    "--calib-split", "val", "--bootstrap", 0, "--mc-samples", 0, "--outdir", tmp_path / "c") == 0
    assert "the split train chose the checkpoint on" in capfd.readouterr().err
    cal = json.loads((tmp_path / "c" / "calibration_summary.json").read_text())
    assert cal["fit_split"] == "val" and "ece_before_ci95" not in cal
