"""tools/metrics.py against independent computations with scikit-learn (SPEC "Metrics schema")."""
import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, confusion_matrix, f1_score, roc_auc_score, roc_curve

from tools.bench import sklearn_reference
from tools.files import write_json
from tools.metrics import (
    METRICS,
    binary_metrics,
    binary_metrics_weighted,
    bootstrap_resamples,
    bootstrap_weights,
    compute_metrics,
    metrics_with_ci,
    scores,
)

LABELS = ["Cardiomegaly", "Edema", "Effusion"]


def sklearn_metrics(y, p) -> dict:
    """Every metric of one label from scikit-learn, NaN where undefined; sens@0.5 and spec@0.5
    from the confusion matrix of ``p >= 0.5``."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    known = ~np.isnan(y)
    y, p = y[known].astype(int), p[known]
    f1 = f1_score(y, (p >= 0.5).astype(int), zero_division=np.nan) if len(y) else np.nan
    if len(np.unique(y)) < 2:
        return {"auroc": np.nan, "auprc": np.nan, "f1@0.5": float(f1), "sens@95spec": np.nan,
                "sens@0.5": np.nan, "spec@0.5": np.nan}
    fpr, tpr, _ = roc_curve(y, p, drop_intermediate=False)
    (tn, fp), (fn, tp) = confusion_matrix(y, (p >= 0.5).astype(int), labels=[0, 1])
    return {
        "auroc": roc_auc_score(y, p),
        "auprc": average_precision_score(y, p),
        "f1@0.5": float(f1),
        "sens@95spec": float(tpr[fpr <= 0.05].max()),
        "sens@0.5": tp / (tp + fn),
        "spec@0.5": tn / (tn + fp),
    }


def assert_same(ours: dict, ref: dict):
    for m in METRICS:
        if np.isnan(ref[m]):
            assert np.isnan(ours[m]), m
        else:
            assert ours[m] == pytest.approx(ref[m], abs=1e-12), m


@pytest.fixture
def tied_data():
    """300 rows, 3 labels; scores rounded to 0.05 so there are many ties; ~10% unknown labels."""
    rng = np.random.default_rng(42)
    n = 300
    y = (rng.random((n, 3)) < [0.3, 0.15, 0.5]).astype(float)
    p = np.clip(0.35 * y + rng.random((n, 3)) * 0.65, 0, 1)
    p = np.round(p * 20) / 20
    y[rng.random((n, 3)) < 0.1] = np.nan
    return y, p


# ====== one label ======

def test_binary_metrics_match_sklearn_with_ties_and_unknowns(tied_data):
    y, p = tied_data
    for j in range(3):
        assert_same(binary_metrics(y[:, j], p[:, j]), sklearn_metrics(y[:, j], p[:, j]))


def test_sens_at_95_spec_on_a_hand_made_curve():
    # 20 negatives: scores 0.00..0.95; the top negative (0.95) is 1 false positive = 5% FPR.
    neg = np.arange(20) / 20
    pos = np.array([0.99, 0.97, 0.96, 0.9, 0.5])
    y = np.r_[np.zeros(20), np.ones(5)]
    p = np.r_[neg, pos]
    # Specificity >= 0.95 allows 1 false positive (threshold 0.95): 3 of 5 positives are above it.
    assert binary_metrics(y, p)["sens@95spec"] == pytest.approx(3 / 5)


# ====== several labels ======

def test_compute_metrics_per_class_macro_micro(tied_data):
    y, p = tied_data
    res = compute_metrics(y, p, LABELS, split="test")
    assert res["split"] == "test" and res["n"] == 300 and res["labels"] == LABELS
    for j, label in enumerate(LABELS):
        pc = res["per_class"][label]
        assert_same(pc, sklearn_metrics(y[:, j], p[:, j]))
        known = ~np.isnan(y[:, j])
        assert pc["n"] == known.sum()
        assert pc["n_pos"] == y[known, j].sum()
        assert pc["prevalence"] == pytest.approx(y[known, j].mean())
    for m in METRICS:
        assert res["macro"][m] == pytest.approx(np.mean([res["per_class"][k][m] for k in LABELS]))
    known = ~np.isnan(y)
    assert_same(res["micro"], sklearn_metrics(y[known], p[known]))


def test_macro_averages_only_defined_labels(tied_data):
    y, p = tied_data
    y = y.copy()
    y[~np.isnan(y[:, 1]), 1] = 0.0  # Edema: negatives only -> AUROC undefined
    res = compute_metrics(y, p, LABELS)
    assert math.isnan(res["per_class"]["Edema"]["auroc"])
    expected = np.mean([roc_auc_score(y[~np.isnan(y[:, j]), j], p[~np.isnan(y[:, j]), j]) for j in (0, 2)])
    assert res["macro"]["auroc"] == pytest.approx(expected)


def test_one_class_only_gives_nan_not_a_crash():
    y = np.array([[0.0], [0.0], [0.0], [np.nan]])
    p = np.array([[0.1], [0.7], [0.2], [0.9]])
    res = compute_metrics(y, p, ["Edema"])["per_class"]["Edema"]
    assert math.isnan(res["auroc"]) and math.isnan(res["auprc"]) and math.isnan(res["sens@95spec"])
    assert res["f1@0.5"] == 0.0  # one false positive, no true positive: F1 is 0, not undefined
    assert res["n"] == 3 and res["n_pos"] == 0 and res["prevalence"] == 0.0
    y_none_predicted = compute_metrics(y, np.full_like(p, 0.1), ["Edema"])["per_class"]["Edema"]
    assert math.isnan(y_none_predicted["f1@0.5"])  # no positive and none predicted


def test_all_unknown_labels():
    y = np.full((4, 2), np.nan)
    p = np.full((4, 2), 0.5)
    res = compute_metrics(y, p, ["A", "B"])
    for label in ("A", "B"):
        pc = res["per_class"][label]
        assert pc["n"] == 0 and pc["n_pos"] == 0 and math.isnan(pc["prevalence"])
        assert all(math.isnan(pc[m]) for m in METRICS)
    assert all(math.isnan(res["macro"][m]) for m in METRICS)
    assert all(math.isnan(res["micro"][m]) for m in METRICS)


def test_a_single_row():
    res = compute_metrics(np.array([[1.0, 0.0]]), np.array([[0.8, 0.3]]), ["A", "B"])
    assert math.isnan(res["per_class"]["A"]["auroc"]) and res["per_class"]["A"]["f1@0.5"] == 1.0
    assert math.isnan(res["per_class"]["B"]["f1@0.5"])
    assert res["micro"]["auroc"] == 1.0  # pooled, the pair has one positive and one negative


def test_json_has_null_not_nan(tmp_path):
    res = compute_metrics(np.array([[0.0], [0.0]]), np.array([[0.2], [0.4]]), ["Edema"])
    path = write_json(tmp_path / "m.json", res)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    loaded = json.loads(text, parse_constant=refuse)
    assert loaded["per_class"]["Edema"]["auroc"] is None
    assert loaded["macro"]["auroc"] is None


# ====== bootstrap ======

def test_ci_contains_the_point_estimate(tied_data):
    y, p = tied_data
    res = metrics_with_ci(y, p, LABELS, clusters=np.arange(len(y)) // 2, n_boot=300, seed=0)
    for m in ("auroc", "auprc", "sens@95spec"):
        lo, hi = res["macro"]["ci95"][m]
        assert lo <= res["macro"][m] <= hi and hi - lo < 0.5
        for label in LABELS:
            lo, hi = res["per_class"][label]["ci95"][m]
            assert lo <= res["per_class"][label][m] <= hi
    again = metrics_with_ci(y, p, LABELS, clusters=np.arange(len(y)) // 2, n_boot=300, seed=0)
    assert again["macro"]["ci95"] == res["macro"]["ci95"]  # seeded


def test_cluster_bootstrap_keeps_a_patients_rows_together():
    clusters = np.array(["a", "a", "b", "c", "c", "c", "d", "e", "e"])
    w = bootstrap_weights(clusters, n_boot=200, seed=1)
    assert w.shape == (200, 9)
    for patient in np.unique(clusters):
        rows = w[:, clusters == patient]
        assert np.all(rows == rows[:, :1])  # every row of a drawn patient comes along, equally
    first_rows = w[:, [0, 2, 3, 6, 7]]  # one row per patient
    np.testing.assert_array_equal(first_rows.sum(axis=1), 5)  # 5 patients drawn per resample
    assert w.std(axis=0).min() > 0  # patients do vary between resamples


def group_gap(y, p, in_group, n_boot):
    """The group's gap_to_rest as slicing reports it."""
    from tools.slicing import group_metrics

    df = pd.DataFrame({"g": np.where(in_group, "in", "out")})
    return group_metrics(df, y, p, LABELS, "g", np.arange(len(y)), n_boot=n_boot)["groups"]["in"]["gap_to_rest"]


def test_group_gap_point_value_is_group_minus_rest(tied_data):
    y, p = tied_data
    in_group = np.random.default_rng(3).random(len(y)) < 0.4
    gap = group_gap(y, p, in_group, n_boot=0)
    for j, label in enumerate(LABELS):
        g = sklearn_metrics(y[in_group, j], p[in_group, j])
        r = sklearn_metrics(y[~in_group, j], p[~in_group, j])
        for m in METRICS:
            assert gap["per_class"][label][m] == pytest.approx(g[m] - r[m], abs=1e-12)
    macro_g = np.mean([sklearn_metrics(y[in_group, j], p[in_group, j])["auroc"] for j in range(3)])
    macro_r = np.mean([sklearn_metrics(y[~in_group, j], p[~in_group, j])["auroc"] for j in range(3)])
    assert gap["macro"]["auroc"] == pytest.approx(macro_g - macro_r)
    with_ci = group_gap(y, p, in_group, n_boot=100)
    assert with_ci["macro"]["auroc"] == pytest.approx(gap["macro"]["auroc"])
    lo, hi = with_ci["macro"]["ci95"]["auroc"]
    assert lo <= with_ci["macro"]["auroc"] <= hi


def test_gaps_where_a_label_has_one_class_are_marked_and_never_tested():
    from tools.findings import slice_tests
    from tools.slicing import group_metrics

    rng = np.random.default_rng(0)
    n = 400
    y = rng.integers(0, 2, (n, 2)).astype(float)
    group = np.where(rng.random(n) < 0.3, "none", "some")
    y[group == "none"] = 0  # the group is defined by having no positives
    p = np.clip(y * 0.5 + rng.random((n, 2)) * 0.7, 0, 1)
    df = pd.DataFrame({"g": group})
    result = group_metrics(df, y, p, ["a", "b"], "g", np.arange(n), n_boot=300, seed=1)
    assert result["derived_from_labels"] is False  # "some" holds all-negative rows too
    for value in ("none", "some"):
        gap = result["groups"][value]["gap_to_rest"]
        for block in (gap["macro"], gap["per_class"]["a"], gap["per_class"]["b"]):
            assert block["derived_from_labels"] is True and block["flaggable"] is False
    assert slice_tests(result, ["a", "b"]) == []  # F1 = 0 with no positives is not a failure
    assert result["groups"]["none"]["per_class"]["a"]["f1@0.5"] == 0.0


# ====== resamples ======

def sklearn_weighted(y, p, w) -> dict:
    """Every metric of one label from scikit-learn with row weights ``w`` (rows of weight 0 and
    unknown labels left out): the bench's reference loop."""
    return dict(zip(METRICS, sklearn_reference(np.asarray(y, float), p, w)))


@pytest.mark.parametrize("levels", [None, 20])
def test_every_resample_equals_sklearn_on_that_resample(levels):
    """Per label and micro, each of a few patient resamples against scikit-learn with the
    resample's multiplicities as weights; with continuous scores and with many ties."""
    rng = np.random.default_rng(11)
    n = 600
    y = (rng.random((n, 3)) < [0.05, 0.3, 0.6]).astype(float)
    p = np.clip(0.3 * y + 0.7 * rng.random((n, 3)), 0, 1)
    if levels:
        p = np.round(p * levels) / levels
    y[rng.random((n, 3)) < 0.1] = np.nan
    clusters = rng.integers(0, 170, n)
    resamples = bootstrap_resamples(clusters, 6, seed=5)
    boot = scores(y, p, resamples)["boot"]
    for b, w in enumerate(resamples.weights()):
        for j in range(3):
            assert_same({m: boot["per_class"][j][m][b] for m in METRICS}, sklearn_weighted(y[:, j], p[:, j], w))
        known = ~np.isnan(y)
        rows = np.nonzero(known)[0]
        assert_same({m: boot["micro"][m][b] for m in METRICS}, sklearn_weighted(y[known], p[known], w[rows]))


def test_long_rankings_and_tied_negatives_equal_sklearn():
    """Thousands of positive tie groups (the sensitivity is found by bisection there) and scores
    tied across classes, on resamples of single rows."""
    rng = np.random.default_rng(2)
    n = 12000
    y = (rng.random(n) < 0.5).astype(float)
    p = np.round(np.clip(0.2 * y + 0.8 * rng.random(n), 0, 1), 3)
    w = bootstrap_weights(np.arange(n), 3, seed=0)
    res = binary_metrics_weighted(y, p, w)
    for b in range(3):
        assert_same({m: res[m][b] for m in METRICS}, sklearn_weighted(y, p, w[b]))


def test_resamples_hold_what_the_row_weights_hold():
    clusters = np.array(["b", "a", "a", "c", "b", "d"])
    res = bootstrap_resamples(clusters, 70, seed=3)  # more than one block of resamples
    w = bootstrap_weights(clusters, 70, seed=3)
    assert res.n_boot == 70 and res.n_rows == 6
    np.testing.assert_array_equal(res.weights(), w)
    np.testing.assert_array_equal(res.rows(clusters != "a").weights(), w[:, clusters != "a"])
    np.testing.assert_array_equal(res.head(5).weights(), w[:5])
    values = np.arange(12.0).reshape(6, 2)
    np.testing.assert_allclose(res.totals(values), w @ values)
    assert all(not block.flags.writeable for block in res.blocks)  # shared by every analysis of the split


def test_the_same_seed_gives_the_same_resamples_and_intervals(tied_data):
    y, p = tied_data
    clusters = np.arange(len(y)) // 3
    a = scores(y, p, bootstrap_resamples(clusters, 120, seed=9))["boot"]
    b = scores(y, p, bootstrap_resamples(clusters, 120, seed=9))["boot"]
    c = scores(y, p, bootstrap_resamples(clusters, 120, seed=10))["boot"]
    for m in METRICS:
        np.testing.assert_array_equal(a["macro"][m], b["macro"][m])
        assert not np.array_equal(a["macro"][m], c["macro"][m], equal_nan=True)


def test_row_weights_and_resamples_give_the_same_values(tied_data):
    """Dense row weights (every row its own cluster), patient resamples, and the float64 path
    taken for weights that are not integers, all agree on integer weights."""
    from tools.metrics import Resamples

    y, p = tied_data
    clusters = np.arange(len(y)) // 2
    res = bootstrap_resamples(clusters, 40, seed=1)
    w = res.weights()
    inexact = Resamples(np.arange(len(y)), w.T.astype(np.float64), integral=False)
    assert res.exact_dtype(1) == np.float32 and inexact.exact_dtype(1) == np.float64
    ref = scores(y, p, res)["boot"]
    for other in (w, inexact):
        got = scores(y, p, other)["boot"]
        for m in METRICS:
            np.testing.assert_allclose(got["micro"][m], ref["micro"][m], rtol=0, atol=1e-12)
            for j in range(3):
                np.testing.assert_allclose(got["per_class"][j][m], ref["per_class"][j][m], rtol=0, atol=1e-12)


def test_cumulative_sums_in_blocks_equal_numpy():
    from tools.metrics import accumulate_rows, count_at_most, cumsum_rows

    rng = np.random.default_rng(0)
    for n in (1, 7, 64, 65, 255, 256, 1000, 5003):
        x = rng.integers(0, 9, (n, 5)).astype(np.float32)
        np.testing.assert_array_equal(cumsum_rows(x.copy()), np.cumsum(x, axis=0))
        limit = rng.integers(-1, 9 * n, 5).astype(np.float32)
        cum = np.cumsum(x, axis=0)
        np.testing.assert_array_equal(count_at_most(cum, limit), (cum <= limit).sum(axis=0))
        z = rng.random((n, 3))
        np.testing.assert_array_equal(accumulate_rows(z.copy(), np.minimum), np.minimum.accumulate(z, axis=0))


def test_a_two_valued_column_has_opposite_gaps_on_the_same_resamples(tied_data):
    """With two groups, each is the other's rest: the gaps are exact opposites, resample by resample."""
    from tools.slicing import group_metrics

    y, p = tied_data
    df = pd.DataFrame({"g": np.where(np.arange(len(y)) % 3 == 0, "a", "b")})
    result = group_metrics(df, y, p, LABELS, "g", np.arange(len(y)) // 2, n_boot=200, seed=4)
    a, b = result["groups"]["a"]["gap_to_rest"], result["groups"]["b"]["gap_to_rest"]
    for m in METRICS:
        assert a["macro"][m] == pytest.approx(-b["macro"][m], abs=1e-12)
        assert a["macro"]["ci95"][m] == pytest.approx([-b["macro"]["ci95"][m][1], -b["macro"]["ci95"][m][0]], abs=1e-12)
