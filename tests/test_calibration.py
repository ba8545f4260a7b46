"""Specification of tools/calibration.py: temperature scaling and calibration metrics."""

import math

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

from conftest import read_figure
from tools import calibration as cal
from tools.figures import plot_reliability
from tools.metrics import sigmoid

LABELS = ["Cardiomegaly", "Edema", "Effusion"]


def synthetic(n, temperatures, seed=0):
    """Labels drawn from sigmoid(z); logits z * T0 per column, so the true temperature is T0."""
    rng = np.random.default_rng(seed)
    t0 = np.asarray(temperatures, dtype=float)
    z = rng.normal(0.0, 2.0, size=(n, t0.size))
    y = (rng.random(z.shape) < sigmoid(z)).astype(float)
    return z * t0, y


def with_unknown_rows(probs, y, n_extra=50, seed=1):
    """The same data plus rows whose labels are all unknown (NaN) and whose predictions are noise."""
    rng = np.random.default_rng(seed)
    extra_p = rng.random((n_extra, probs.shape[1]))
    extra_y = np.full((n_extra, probs.shape[1]), np.nan)
    return np.vstack([probs, extra_p]), np.vstack([y, extra_y])


def ece_loop(p, y, n_bins=15):
    """ECE written as a plain loop over bins, as an independent reference."""
    p, y = np.ravel(p), np.ravel(y)
    total, n = 0.0, len(p)
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        in_bin = [i for i in range(n) if lo <= p[i] < hi or (b == n_bins - 1 and p[i] == 1.0)]
        if in_bin:
            mean_p = sum(p[i] for i in in_bin) / len(in_bin)
            rate = sum(y[i] for i in in_bin) / len(in_bin)
            total += len(in_bin) / n * abs(mean_p - rate)
    return total


# ====== sigmoid and temperature ======

def test_sigmoid_is_stable_and_matches_the_formula():
    x = np.array([-1000.0, -30.0, -1.0, 0.0, 2.0, 30.0, 1000.0, np.nan])
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        s = sigmoid(x)
    assert s[0] == 0.0 and s[-2] == 1.0 and s[3] == 0.5 and np.isnan(s[-1])
    for xi, si in zip(x[1:-2], s[1:-2]):
        assert si == pytest.approx(1.0 / (1.0 + math.exp(-xi)), rel=1e-12)


def test_fit_temperature_recovers_a_known_temperature():
    logits, y = synthetic(20000, [2.5, 2.5, 2.5])
    assert cal.fit_temperature(logits, y) == pytest.approx(2.5, rel=0.05)


def test_fit_temperature_per_label_recovers_each_label():
    logits, y = synthetic(20000, [0.5, 1.0, 3.0], seed=3)
    T = cal.fit_temperature(logits, y, per_label=True)
    assert T.shape == (3,)
    np.testing.assert_allclose(T, [0.5, 1.0, 3.0], rtol=0.05)


def test_fit_temperature_is_a_minimum_of_the_nll():
    logits, y = synthetic(5000, [1.7, 1.7, 1.7], seed=4)
    T = cal.fit_temperature(logits, y)

    def nll_at(t):
        return cal.nll(sigmoid(logits / t), y)

    assert nll_at(T) <= min(nll_at(T * 0.99), nll_at(T * 1.01))


@pytest.mark.parametrize("t0", [0.3, 1.0, 4.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fitting_never_increases_the_nll_it_is_fitted_on(t0, seed):
    logits, y = synthetic(300, [t0, t0, t0], seed=seed)
    before = cal.nll(sigmoid(logits), y)
    T = cal.fit_temperature(logits, y)
    assert cal.nll(sigmoid(cal.apply_temperature(logits, T)), y) <= before + 1e-12
    T_per = cal.fit_temperature(logits, y, per_label=True)
    for j in range(3):
        before_j = cal.nll(sigmoid(logits[:, j]), y[:, j])
        after_j = cal.nll(sigmoid(logits[:, j] / T_per[j]), y[:, j])
        assert after_j <= before_j + 1e-12


def test_fit_temperature_ignores_unknown_pairs():
    logits, y = synthetic(2000, [2.0, 2.0, 2.0], seed=5)
    more_logits, more_y = with_unknown_rows(logits, y)
    assert cal.fit_temperature(more_logits, more_y) == cal.fit_temperature(logits, y)
    y_masked = y.copy()
    y_masked[:, 1] = np.nan
    T = cal.fit_temperature(logits, y_masked, per_label=True)
    assert T[1] == 1.0
    np.testing.assert_allclose(T[[0, 2]], cal.fit_temperature(logits, y, per_label=True)[[0, 2]])


def test_fit_temperature_degenerate_inputs_stay_finite_and_bounded():
    assert cal.fit_temperature(np.zeros((0, 3)), np.zeros((0, 3))) == 1.0
    assert cal.fit_temperature(np.ones((4, 3)), np.full((4, 3), np.nan)) == 1.0
    assert cal.fit_temperature(np.zeros((4, 3)), np.ones((4, 3))) == 1.0
    # Separable data: the NLL keeps falling as T -> 0, so the search stops at its lower bound.
    T = cal.fit_temperature(np.array([[3.0], [-2.0]]), np.array([[1.0], [0.0]]))
    assert T == pytest.approx(cal.T_MIN, rel=1e-4)
    T = cal.fit_temperature(np.array([[1.0]]), np.array([[0.0]]))
    assert T == pytest.approx(cal.T_MAX, rel=1e-4)


def test_apply_temperature_broadcasts_per_label():
    logits = np.array([[2.0, 4.0, -6.0]])
    np.testing.assert_allclose(cal.apply_temperature(logits, 2.0), [[1.0, 2.0, -3.0]])
    np.testing.assert_allclose(cal.apply_temperature(logits, np.array([1.0, 2.0, 3.0])),
                               [[2.0, 2.0, -2.0]])
    with pytest.raises(ValueError):
        cal.apply_temperature(logits, 0.0)


def test_temperature_does_not_change_auroc():
    logits, y = synthetic(500, [1.0, 1.0, 1.0], seed=6)
    before = cal.calibration_report(sigmoid(logits), y, LABELS)
    after = cal.calibration_report(sigmoid(logits / 2.7), y, LABELS)
    assert after["auroc"] == pytest.approx(before["auroc"], abs=1e-12)
    for label in LABELS:
        assert after["per_class"][label]["auroc"] == pytest.approx(
            before["per_class"][label]["auroc"], abs=1e-12)


# ====== ECE and reliability bins ======

def test_ece_of_a_hand_computed_example():
    # bins of width 1/15: 0.05 -> bin 0 (gap 0.05), 0.15 -> bin 2 (gap 0.85),
    # 0.95 and 1.0 -> bin 14 (mean 0.975, rate 1, gap 0.025, mass 2/4).
    p = np.array([0.05, 0.15, 0.95, 1.0])
    y = np.array([0.0, 1.0, 1.0, 1.0])
    assert cal.ece(p, y) == pytest.approx((0.05 + 0.85 + 2 * 0.025) / 4)


def test_toplabel_ece_of_a_hand_computed_example():
    # confidences 0.82, 0.7, 0.9 fall in three different bins; correctness 1, 0, 1.
    p = np.array([0.18, 0.7, 0.9])
    y = np.array([0.0, 0.0, 1.0])
    assert cal.ece_toplabel(p, y) == pytest.approx((0.18 + 0.7 + 0.1) / 3)


@pytest.mark.parametrize("seed", range(5))
def test_ece_matches_a_plain_loop(seed):
    rng = np.random.default_rng(seed)
    p = rng.random((40, 3)) ** 2
    p[0, 0], p[1, 1], p[2, 2] = 0.0, 1.0, 1.0
    y = (rng.random((40, 3)) < 0.4).astype(float)
    assert cal.ece(p, y) == pytest.approx(ece_loop(p, y), abs=1e-12)
    assert cal.ece(p, y, n_bins=7) == pytest.approx(ece_loop(p, y, 7), abs=1e-12)
    conf = np.maximum(p, 1 - p)
    correct = ((p >= 0.5) == (y == 1)).astype(float)
    assert cal.ece_toplabel(p, y) == pytest.approx(ece_loop(conf, correct), abs=1e-12)


def test_reliability_bins_edges_counts_and_empty_bins():
    p = np.array([0.0, 0.01, 0.5, 0.99, 1.0])
    y = np.array([0.0, 1.0, 1.0, 1.0, 0.0])
    bins = cal.reliability_bins(p, y)
    np.testing.assert_allclose(bins["edges"], np.linspace(0, 1, 16))
    assert bins["count"].sum() == 5
    assert bins["count"][0] == 2 and bins["count"][7] == 1 and bins["count"][14] == 2
    assert bins["mean_pred"][14] == pytest.approx(0.995)
    assert bins["frac_pos"][0] == 0.5
    assert np.isnan(bins["mean_pred"][3]) and np.isnan(bins["frac_pos"][3])
    assert cal.ece(p, y) == pytest.approx(cal._ece_from_bins(bins))


def test_ece_is_zero_when_each_bin_is_calibrated():
    # 10 pairs at 0.3 with 3 positives, 10 at 0.8 with 8 positives.
    p = np.r_[np.full(10, 0.3), np.full(10, 0.8)]
    y = np.r_[np.ones(3), np.zeros(7), np.ones(8), np.zeros(2)]
    assert cal.ece(p, y) == pytest.approx(0.0, abs=1e-12)


# ====== NLL, Brier, AUROC ======

def test_nll_and_brier_match_sklearn():
    rng = np.random.default_rng(7)
    p = rng.uniform(0.02, 0.98, size=(60, 3))
    y = (rng.random((60, 3)) < 0.3).astype(float)
    y[rng.random(y.shape) < 0.2] = np.nan
    known = ~np.isnan(y)
    assert cal.nll(p, y) == pytest.approx(log_loss(y[known], p[known], labels=[0, 1]), rel=1e-10)
    assert cal.brier(p, y) == pytest.approx(brier_score_loss(y[known], p[known]), rel=1e-10)


def test_nll_clips_extreme_probabilities():
    assert cal.nll(np.array([0.0]), np.array([1.0])) == pytest.approx(-math.log(1e-7))
    assert cal.nll(np.array([1.0]), np.array([1.0])) == pytest.approx(-math.log1p(-1e-7))


def test_report_matches_independent_metrics_and_ignores_unknown_pairs():
    logits, y = synthetic(400, [1.5, 1.5, 1.5], seed=8)
    p = sigmoid(logits)
    y[::7, 0] = np.nan
    report = cal.calibration_report(p, y, LABELS)
    known = ~np.isnan(y)
    assert report["auroc"] == pytest.approx(roc_auc_score(y[known], p[known]))
    assert report["ece"] == pytest.approx(ece_loop(p[known], y[known]))
    assert report["brier"] == pytest.approx(brier_score_loss(y[known], p[known]))
    for j, label in enumerate(LABELS):
        k = known[:, j]
        per = report["per_class"][label]
        assert set(per) == {"ece", "nll", "brier", "auroc"}
        assert per["auroc"] == pytest.approx(roc_auc_score(y[k, j], p[k, j]))
        assert per["nll"] == pytest.approx(log_loss(y[k, j], p[k, j], labels=[0, 1]))
    more_p, more_y = with_unknown_rows(p, y)
    assert cal.calibration_report(more_p, more_y, LABELS) == report


def test_report_is_json_ready_for_undefined_metrics():
    p = np.array([[0.2, 0.7, 0.4], [0.3, 0.9, 0.6]])
    y = np.array([[np.nan, 1.0, 0.0], [np.nan, 1.0, 1.0]])
    report = cal.calibration_report(p, y, LABELS)
    assert report["per_class"]["Cardiomegaly"] == {"ece": None, "nll": None, "brier": None,
                                                   "auroc": None}
    assert report["per_class"]["Edema"]["auroc"] is None  # one class only
    assert report["per_class"]["Effusion"]["auroc"] == 1.0
    empty = cal.calibration_report(p, np.full_like(p, np.nan), LABELS)
    assert all(empty[k] is None for k in ("ece", "ece_toplabel", "nll", "brier", "auroc"))
    single = cal.calibration_report(p[:1, :1], np.array([[1.0]]), LABELS[:1])
    assert single["auroc"] is None and single["brier"] == pytest.approx(0.64)
    with pytest.raises(ValueError):
        cal.calibration_report(p, y, LABELS[:2])


def test_metrics_return_nan_when_nothing_is_known():
    p, y = np.array([[0.3]]), np.array([[np.nan]])
    for metric in (cal.ece, cal.ece_toplabel, cal.nll, cal.brier, cal.auroc):
        assert np.isnan(metric(p, y))


def test_error_detection_auroc():
    p = np.array([0.9, 0.8, 0.2, 0.6, 0.4, 0.3])
    y = np.array([1.0, 0.0, 0.0, 1.0, 1.0, np.nan])
    wrong = np.array([0, 1, 0, 0, 1])
    spread = np.array([0.05, 0.3, 0.1, 0.2, 0.25, 9.0])
    assert cal.error_detection_auroc(spread, p, y) == pytest.approx(
        roc_auc_score(wrong, spread[:5]))
    assert cal.error_detection_auroc(np.array([0.1, 0.4, 0.2, 0.3, 0.35, 0.0]), p, y) == 1.0
    assert cal.error_detection_auroc(spread[:2], p[:2], np.array([1.0, 1.0])) is None  # no error


# ====== figure ======

def test_plot_reliability_writes_a_png_atomically(tmp_path):
    logits, y = synthetic(300, [2.0, 2.0, 2.0], seed=9)
    out = tmp_path / "reliability_uncal.png"
    plot_reliability(sigmoid(logits), y, out, "uncalibrated")
    read_figure(out)
    assert [f.name for f in tmp_path.iterdir()] == [out.name]
    plot_reliability(np.zeros((2, 3)), np.full((2, 3), np.nan), out, "nothing known")
    read_figure(out)
    assert [f.name for f in tmp_path.iterdir()] == [out.name]


# ====== resamples ======

def test_resampled_ece_nll_brier_equal_the_metrics_of_the_repeated_rows():
    from tools.metrics import bootstrap_resamples

    z, y = synthetic(300, [1.5, 0.7])
    y[np.random.default_rng(3).random(y.shape) < 0.1] = np.nan
    probs = sigmoid(z)
    resamples = bootstrap_resamples(np.arange(300) // 3, 6, seed=8)
    boot = cal.calibration_resamples(probs, y, resamples)
    dense = cal.calibration_resamples(probs, y, resamples.weights())
    for b, w in enumerate(resamples.weights()):
        rows = np.repeat(np.arange(300), w.astype(int))
        for key, f in (("ece", cal.ece), ("nll", cal.nll), ("brier", cal.brier)):
            assert boot[key][b] == pytest.approx(f(probs[rows], y[rows]), rel=1e-12, abs=1e-15)
            assert dense[key][b] == pytest.approx(boot[key][b], rel=1e-12, abs=1e-15)


def test_resampled_temperatures_are_the_fits_on_the_repeated_rows():
    from tools.metrics import bootstrap_resamples

    z, y = synthetic(400, [1.8])
    fitted = cal.fit_temperature(z, y)
    resamples = bootstrap_resamples(np.arange(400) // 2, 5, seed=1)
    refits = cal.temperature_resamples(z, y, resamples, fitted)
    for b, w in enumerate(resamples.weights()):
        rows = np.repeat(np.arange(400), w.astype(int))
        assert refits[b] == pytest.approx(cal.fit_temperature(z[rows], y[rows]), rel=1e-3)
