"""tools/compare.py: model A against model B on the same rows, checked against scikit-learn, a
direct paired bootstrap and hand-worked examples; and the figure of a comparison table."""
import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm as scipy_norm
from sklearn.metrics import average_precision_score, roc_auc_score

from conftest import read_figure
from tools.compare import COLUMNS, compare_table, decision_changes, holm
from tools.figures import MAX_COMPARE_ROWS, compare_figure
from tools.metrics import METRICS, bootstrap_weights, scores
from tools.slicing import group_values

LABELS = ["Effusion", "Edema"]


@pytest.fixture
def pair_data():
    """400 films of 200 patients (two each), 2 labels with ~10% unknown, two imperfect models,
    and a table with a categorical (sex) and a many-valued numeric (age) column."""
    rng = np.random.default_rng(7)
    n = 400
    y = (rng.random((n, 2)) < [0.3, 0.5]).astype(float)
    prob_a = np.clip(0.3 * y + 0.7 * rng.random((n, 2)), 0, 1)
    prob_b = np.clip(0.4 * y + 0.6 * rng.random((n, 2)), 0, 1)
    y[rng.random((n, 2)) < 0.1] = np.nan
    clusters = np.repeat(np.arange(n // 2), 2).astype(str)
    df = pd.DataFrame({"sex": rng.choice(["F", "M"], n), "age": rng.integers(20, 90, n)})
    return y, prob_a, prob_b, clusters, df


def row(table, label, metric, scope=None, group_col="", group=""):
    """The one row of ``label`` and ``metric`` in ``scope`` (default: the label/macro scope)."""
    scope = scope or ("macro" if label == "macro" else "label")
    hit = table[(table["scope"] == scope) & (table["label"] == label) & (table["metric"] == metric)
                & (table["group_col"] == group_col) & (table["group"] == group)]
    assert len(hit) == 1, (scope, label, metric, group_col, group)
    return hit.iloc[0]


# ====== point values ======

def test_point_values_match_sklearn_and_diff_is_b_minus_a(pair_data):
    y, prob_a, prob_b, clusters, _ = pair_data
    table = compare_table(y, prob_a, prob_b, LABELS, clusters, n_boot=0)
    assert list(table.columns) == COLUMNS == ["scope", "group_col", "group", "label", "metric", "a", "b",
                                              "diff", "ci_low", "ci_high", "p_value", "p_holm"]
    # label rows label by label, metric by metric, then the macro rows
    assert list(zip(table["label"], table["metric"])) == [(lbl, m) for lbl in [*LABELS, "macro"] for m in METRICS]
    assert list(table["scope"]) == ["label"] * 2 * len(METRICS) + ["macro"] * len(METRICS)
    for j, label in enumerate(LABELS):
        known = ~np.isnan(y[:, j])
        for side, prob in (("a", prob_a), ("b", prob_b)):
            assert row(table, label, "auroc")[side] == pytest.approx(roc_auc_score(y[known, j], prob[known, j]),
                                                                     abs=1e-12)
            assert row(table, label, "auprc")[side] == pytest.approx(
                average_precision_score(y[known, j], prob[known, j]), abs=1e-12)
    for m in METRICS:
        macro = row(table, "macro", m)
        assert macro["a"] == pytest.approx(np.mean([row(table, lbl, m)["a"] for lbl in LABELS]))
    np.testing.assert_allclose(table["diff"], table["b"] - table["a"], rtol=0, atol=0)
    assert (table["diff"] != 0).all()
    # without resamples: no intervals, no p-values
    assert table[["ci_low", "ci_high", "p_value", "p_holm"]].isna().all().all()


def test_an_undefined_metric_gives_nan_values_and_no_p_value(pair_data):
    y, prob_a, prob_b, clusters, _ = pair_data
    y = y.copy()
    y[:, 1] = np.where(np.isnan(y[:, 1]), np.nan, 0.0)  # Edema: negatives only
    table = compare_table(y, prob_a, prob_b, LABELS, clusters, n_boot=100)
    for m in ("auroc", "auprc", "sens@95spec", "sens@0.5", "spec@0.5"):
        r = row(table, "Edema", m)
        assert np.isnan([r["a"], r["b"], r["diff"], r["ci_low"], r["ci_high"], r["p_value"], r["p_holm"]]).all()
        # the macro average is then the one defined label
        assert row(table, "macro", m)["a"] == row(table, "Effusion", m)["a"]


# ====== paired bootstrap ======

def test_identical_predictions_differ_by_zero_with_p_one(pair_data):
    y, prob_a, _, clusters, df = pair_data
    table = compare_table(y, prob_a, prob_a.copy(), LABELS, clusters, df, ("sex", "age"), n_boot=200)
    assert (table["diff"] == 0).all()
    assert (table["ci_low"] == 0).all() and (table["ci_high"] == 0).all()
    assert (table["p_value"] == 1).all() and (table["p_holm"] == 1).all()


def test_a_planted_improvement_on_one_label_is_found_and_the_other_is_untouched():
    rng = np.random.default_rng(3)
    n = 300
    y = (rng.random((n, 2)) < 0.4).astype(float)
    informative = np.clip(0.5 * y + 0.5 * rng.random((n, 2)), 0, 1)
    prob_a = np.c_[rng.random(n), informative[:, 1]]  # A guesses on Effusion
    prob_b = informative                                 # B informative on both; equal to A on Edema
    clusters = np.repeat(np.arange(n // 3), 3)
    table = compare_table(y, prob_a, prob_b, LABELS, clusters, n_boot=1000, seed=1)
    better = row(table, "Effusion", "auroc")
    assert better["diff"] > 0.3
    assert better["ci_low"] > 0
    assert better["p_value"] < 1e-6
    assert better["p_holm"] < 0.05
    for m in METRICS:
        untouched = row(table, "Edema", m)
        assert untouched["diff"] == 0 and untouched["p_value"] == 1


def test_intervals_and_p_values_come_from_one_set_of_paired_patient_resamples(pair_data):
    """A group row recomputed by hand: the group's columns of the one weight matrix, both models
    scored on them, the percentile interval and the Wald p-value (bootstrap SE) of B - A."""
    y, prob_a, prob_b, clusters, df = pair_data
    n_boot, seed = 300, 4
    table = compare_table(y, prob_a, prob_b, LABELS, clusters, df, ("sex",), n_boot=n_boot, seed=seed)
    weights = bootstrap_weights(clusters, n_boot, seed)
    for mask, scope, col, value in ((np.ones(len(y), bool), "label", "", ""),
                                    (df["sex"].to_numpy() == "M", "group", "sex", "M")):
        sa = scores(y[mask], prob_a[mask], weights[:, mask])
        sb = scores(y[mask], prob_b[mask], weights[:, mask])
        diff = sb["point"]["per_class"][0]["auroc"][0] - sa["point"]["per_class"][0]["auroc"][0]
        diff_b = sb["boot"]["per_class"][0]["auroc"] - sa["boot"]["per_class"][0]["auroc"]
        r = row(table, "Effusion", "auroc", scope, col, value)
        assert r["diff"] == pytest.approx(diff, abs=1e-12)
        assert [r["ci_low"], r["ci_high"]] == pytest.approx(np.percentile(diff_b, [2.5, 97.5]))
        z = abs(diff) / np.std(diff_b, ddof=1)
        assert r["p_value"] == pytest.approx(2 * scipy_norm.sf(z), rel=1e-9)


# ====== multiple testing ======

def test_holm_of_a_hand_worked_example():
    # sorted: 0.01 x 4 = 0.04; 0.03 x 3 = 0.09; 0.04 x 2 = 0.08 -> 0.09 (monotone); 0.20 x 1 = 0.20
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.20]), [0.04, 0.09, 0.09, 0.20])
    # NaN is not a test: kept, and not counted in m
    np.testing.assert_allclose(holm([0.01, np.nan, 0.04, 0.03, 0.20]), [0.04, np.nan, 0.09, 0.09, 0.20])
    np.testing.assert_allclose(holm([0.3, 0.6]), [0.6, 0.6])   # 0.3 x 2; 0.6 x 1 -> 0.6
    np.testing.assert_allclose(holm([0.5, 0.9]), [1.0, 1.0])   # capped at 1
    assert holm([]).shape == (0,)


def test_p_holm_adjusts_over_the_whole_table(pair_data):
    y, prob_a, prob_b, clusters, df = pair_data
    table = compare_table(y, prob_a, prob_b, LABELS, clusters, df, ("sex",), n_boot=100)
    np.testing.assert_allclose(table["p_holm"], holm(table["p_value"]))
    assert (table["p_holm"] >= table["p_value"]).all()


# ====== groups ======

def test_group_rows_follow_slicing_group_values(pair_data):
    y, prob_a, prob_b, clusters, df = pair_data
    table = compare_table(y, prob_a, prob_b, LABELS, clusters, df, ("sex", "age"), n_boot=0)
    groups = table[table["scope"] == "group"]
    assert list(groups["group_col"].unique()) == ["sex", "age"]
    for col in ("sex", "age"):
        values, edges = group_values(df[col])
        assert (edges is None) == (col == "sex")  # age has many values: quantile bins, as eval
        block = groups[groups["group_col"] == col]
        assert list(block["group"].unique()) == sorted(pd.unique(values), key=str)
        assert len(block) == len(pd.unique(values)) * (len(LABELS) + 1) * len(METRICS)
        for value in pd.unique(values):
            mask = values == value  # the group's rows are the rows group_values puts in it
            for j, label in enumerate(LABELS):
                known = mask & ~np.isnan(y[:, j])
                r = row(table, label, "auroc", "group", col, value)
                assert r["a"] == pytest.approx(roc_auc_score(y[known, j], prob_a[known, j]), abs=1e-12)
                assert r["b"] == pytest.approx(roc_auc_score(y[known, j], prob_b[known, j]), abs=1e-12)


def test_bad_inputs_are_named():
    y = np.zeros((4, 2))
    with pytest.raises(ValueError, match="shape"):
        compare_table(y, np.zeros((4, 2)), np.zeros((3, 2)), LABELS, np.arange(4))
    with pytest.raises(ValueError, match="cluster"):
        compare_table(y, y, y, LABELS, np.arange(3))
    with pytest.raises(ValueError, match="not in the table"):
        compare_table(y, y, y, LABELS, np.arange(4), pd.DataFrame({"sex": list("FFMM")}), ("age",))


# ====== decisions ======

def test_decision_changes_of_a_hand_example():
    y = np.array([[1, 0], [0, np.nan], [1, 1], [np.nan, 0], [0, 1]], float)
    prob_a = np.array([[0.9, 0.6], [0.7, 0.9], [0.2, 0.8], [0.9, 0.1], [0.4, 0.3]])
    prob_b = np.array([[0.8, 0.4], [0.3, 0.1], [0.6, 0.5], [0.1, 0.1], [0.6, 0.7]])
    # known pairs: 8. Changed: (0,1) A wrong -> fixed; (1,0) fixed; (2,0) fixed; (4,0) broken;
    # (4,1) fixed. (1,1) and (3,0) change but are unknown; (2,1) stays at 1 (0.5 >= 0.5).
    out = decision_changes(y, prob_a, prob_b, LABELS)
    assert out == {"pairs": 8, "changed": 5, "fixed": 4, "broken": 1, "changed_share": 5 / 8,
                   "per_label": {"Effusion": {"pairs": 4, "changed": 3, "fixed": 2, "broken": 1},
                                 "Edema": {"pairs": 4, "changed": 2, "fixed": 2, "broken": 0}}}
    # the same counts directly
    known = ~np.isnan(y)
    da, db = prob_a >= 0.5, prob_b >= 0.5
    changed = known & (da != db)
    assert out["changed"] == changed.sum()
    assert out["fixed"] == (changed & (db == (y == 1))).sum()
    assert out["broken"] == (changed & (da == (y == 1))).sum()
    # another threshold moves the decisions
    assert decision_changes(y, prob_a, prob_b, LABELS, threshold=0.95)["changed"] == 0


# ====== figure ======

def test_compare_figure_writes_a_png(pair_data, tmp_path):
    y, prob_a, prob_b, clusters, df = pair_data
    table = compare_table(y, prob_a, prob_b, LABELS, clusters, df, ("sex",), n_boot=100)
    out = compare_figure(table, "auroc", tmp_path / "compare_auroc.png")
    assert out == tmp_path / "compare_auroc.png"
    read_figure(out)


def test_compare_figure_of_a_long_table_and_of_the_csv_read_back(pair_data, tmp_path):
    y, prob_a, prob_b, clusters, df = pair_data
    df = df.assign(site=[f"site{k % 14}" for k in range(len(df))])  # 14 x 3 group rows per metric
    table = compare_table(y, prob_a, prob_b, LABELS, clusters, df, ("site",), n_boot=0)
    assert (table["metric"] == "auroc").sum() > MAX_COMPARE_ROWS
    read_figure(compare_figure(table, "auroc", tmp_path / "long.png"))
    table.to_csv(tmp_path / "compare.csv", index=False)
    read_figure(compare_figure(pd.read_csv(tmp_path / "compare.csv"), "f1@0.5", tmp_path / "read_back.png"))
