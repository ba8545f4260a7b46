"""Specification of tools/selective.py: risk-coverage curves, AURC and coverage at a target risk."""

import itertools
import json

import numpy as np
import pytest

from conftest import read_figure
from tools import selective as sel
from tools.figures import plot_risk_coverage


def random_decisions(n, seed, n_levels=None):
    """Confidences (with ties when ``n_levels`` is given) and correctness related to them."""
    rng = np.random.default_rng(seed)
    conf = rng.random(n)
    if n_levels:
        conf = np.round(conf * n_levels) / n_levels
    correct = rng.random(n) < 0.5 + 0.45 * conf
    return conf, correct


def brute_force_curve(conf, correct):
    """One row per distinct threshold, high to low, by keeping conf >= t explicitly."""
    rows = []
    for t in sorted(set(conf.tolist()), reverse=True):
        kept = conf >= t
        rows.append((kept.sum() / len(conf), 1 - correct[kept].mean(), t, kept.sum()))
    return rows


def brute_force_aurc(conf, correct):
    """Mean over all tie-breaking orders of the mean risk over k = 1..n (explicit enumeration)."""
    n = len(conf)
    values = []
    for perm in itertools.permutations(range(n)):
        # A permutation is a valid ranking when it lists confidences from high to low.
        c = conf[list(perm)]
        if np.all(c[:-1] >= c[1:]):
            wrong = ~correct[list(perm)]
            values.append(np.mean([wrong[:k].sum() / k for k in range(1, n + 1)]))
    return float(np.mean(values))


# ====== risk-coverage curve ======

@pytest.mark.parametrize("n_levels", [None, 4, 10])
def test_risk_coverage_matches_a_brute_force_loop(n_levels):
    conf, correct = random_decisions(300, seed=1, n_levels=n_levels)
    curve = sel.risk_coverage(conf, correct)
    assert list(curve.columns) == ["coverage", "risk", "threshold", "n_kept"]
    expected = np.array(brute_force_curve(conf, correct))
    assert len(curve) == len(expected) == len(np.unique(conf))
    np.testing.assert_allclose(curve.to_numpy(dtype=float), expected, rtol=0, atol=1e-12)
    assert curve["coverage"].iloc[-1] == 1.0
    assert curve["risk"].iloc[-1] == pytest.approx(1 - correct.mean())


def test_risk_coverage_of_a_hand_made_example():
    conf = np.array([0.9, 0.6, 0.9, 0.7, 0.6])
    correct = np.array([True, False, False, True, True])
    curve = sel.risk_coverage(conf, correct)
    assert curve["threshold"].tolist() == [0.9, 0.7, 0.6]
    assert curve["n_kept"].tolist() == [2, 3, 5]
    np.testing.assert_allclose(curve["coverage"], [0.4, 0.6, 1.0])
    np.testing.assert_allclose(curve["risk"], [1 / 2, 1 / 3, 2 / 5])


def test_risk_coverage_is_vectorised():
    conf, correct = random_decisions(200_000, seed=2)
    curve = sel.risk_coverage(conf, correct)
    assert len(curve) == len(np.unique(conf))


def test_thin_curve_keeps_exact_rows_nearest_to_even_coverage_levels():
    conf, correct = random_decisions(5_000, seed=3)
    curve = sel.risk_coverage(conf, correct)
    thin = sel.thin_curve(curve, rows=100)
    assert 90 <= len(thin) <= 101 and list(thin.columns) == list(curve.columns)
    # every kept row is a row of the full curve, in order, with the first and last among them
    kept = curve.reset_index().merge(thin, on=list(curve.columns))["index"].to_numpy()
    assert len(kept) == len(thin) and np.all(np.diff(kept) > 0) and kept[0] == 0 and kept[-1] == len(curve) - 1
    # no evenly spaced level is further from a kept row than the largest gap of the full curve
    levels = np.linspace(curve["coverage"].iloc[0], 1.0, 101)
    nearest = np.abs(levels[:, None] - thin["coverage"].to_numpy()[None, :]).min(axis=1)
    assert nearest.max() <= np.diff(curve["coverage"]).max()
    short = sel.risk_coverage(conf[:50], correct[:50])
    assert sel.thin_curve(short, rows=100) is short


# ====== AURC ======

@pytest.mark.parametrize("seed", range(4))
def test_aurc_without_ties_is_the_mean_risk_over_k(seed):
    conf, correct = random_decisions(200, seed=seed)
    order = np.argsort(-conf)
    wrong = ~correct[order]
    expected = np.mean([wrong[:k].sum() / k for k in range(1, 201)])
    assert sel.aurc(conf, correct) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_aurc_with_ties_averages_over_orders_inside_a_tie_group(seed):
    conf, correct = random_decisions(7, seed=seed, n_levels=2)
    assert sel.aurc(conf, correct) == pytest.approx(brute_force_aurc(conf, correct), abs=1e-12)


def test_aurc_does_not_depend_on_input_order():
    conf, correct = random_decisions(500, seed=5, n_levels=6)
    perm = np.random.default_rng(0).permutation(500)
    assert sel.aurc(conf[perm], correct[perm]) == pytest.approx(sel.aurc(conf, correct), abs=1e-15)


def test_constant_confidence_gives_the_random_ranking_aurc():
    _, correct = random_decisions(100, seed=6)
    assert sel.aurc(np.ones(100), correct) == pytest.approx(1 - correct.mean())


def test_oracle_aurc_matches_its_definition_and_an_oracle_ranking_has_zero_excess():
    _, correct = random_decisions(1000, seed=7)
    n, c = 1000, int(correct.sum())
    expected = np.mean([max(k - c, 0) / k for k in range(1, n + 1)])
    assert sel.oracle_aurc(correct) == pytest.approx(expected, abs=1e-12)
    summary = sel.selective_summary(correct.astype(float), correct)
    assert summary["e_aurc"] == pytest.approx(0.0, abs=1e-12)
    assert summary["oracle_aurc"] == pytest.approx(expected, abs=1e-12)
    # Large-n limit quoted in the docstring (Geifman et al. 2019).
    r = 1 - c / n
    assert sel.oracle_aurc(correct) == pytest.approx(r + (1 - r) * np.log(1 - r), abs=2e-3)
    assert sel.aurc_from_curve(sel.oracle_curve(correct)) == pytest.approx(expected, abs=1e-12)


def test_worse_ranking_has_larger_aurc():
    conf, correct = random_decisions(2000, seed=8)
    good = sel.selective_summary(conf, correct)
    bad = sel.selective_summary(-conf, correct)
    assert good["oracle_aurc"] <= good["aurc"] < good["risk_at_full_coverage"] < bad["aurc"]


# ====== coverage at risk and summary ======

def test_coverage_at_risk_picks_the_largest_coverage_within_the_target():
    conf = np.array([0.99, 0.95, 0.9, 0.85, 0.8, 0.7, 0.65, 0.6, 0.55, 0.51])
    correct = np.array([1, 1, 0, 1, 1, 1, 1, 0, 0, 1], dtype=bool)
    curve = sel.risk_coverage(conf, correct)
    # risks by coverage: 0, 0, 1/3, 1/4, 1/5, 1/6, 1/7, 2/8, 3/9, 3/10
    assert sel.coverage_at_risk(curve, 0.0) == {"coverage": 0.2, "threshold": 0.95, "risk": 0.0}
    assert sel.coverage_at_risk(curve, 0.2) == {"coverage": 0.7, "threshold": 0.65,
                                                "risk": pytest.approx(1 / 7)}
    assert sel.coverage_at_risk(curve, 0.25)["coverage"] == 0.8  # risk exactly 2/8 counts
    assert sel.coverage_at_risk(curve, 0.3)["coverage"] == 1.0
    none = sel.coverage_at_risk(sel.risk_coverage(conf, ~correct), 0.01)
    assert none == {"coverage": None, "threshold": None, "risk": None}


def test_selective_summary_keys_and_json():
    conf, correct = random_decisions(400, seed=9)
    summary = sel.selective_summary(conf, correct)
    assert set(summary) == {"aurc", "e_aurc", "oracle_aurc", "risk_at_full_coverage", "n",
                            "coverage_at_risk"}
    assert list(summary["coverage_at_risk"]) == ["0.01", "0.02", "0.05", "0.10"]
    assert summary["n"] == 400
    assert summary["aurc"] == pytest.approx(sel.aurc(conf, correct))
    assert summary["e_aurc"] == pytest.approx(summary["aurc"] - summary["oracle_aurc"])
    assert summary["risk_at_full_coverage"] == pytest.approx(1 - correct.mean())
    json.dumps(summary, allow_nan=False)


def test_known_decisions_mask_unknown_pairs():
    probs = np.array([[0.9, 0.2], [0.4, 0.7], [0.6, 0.5]])
    y = np.array([[1.0, np.nan], [1.0, 0.0], [np.nan, 1.0]])
    conf, correct = sel.known_decisions(sel.confidence_from_probs(probs), probs, y)
    np.testing.assert_allclose(conf, [0.9, 0.6, 0.7, 0.5])
    assert correct.tolist() == [True, False, False, True]
    extra_p = np.vstack([probs, np.full((5, 2), 0.99)])
    extra_y = np.vstack([y, np.full((5, 2), np.nan)])
    conf2, correct2 = sel.known_decisions(sel.confidence_from_probs(extra_p), extra_p, extra_y)
    assert sel.selective_summary(conf2, correct2) == sel.selective_summary(conf, correct)


def test_confidence_signals():
    np.testing.assert_allclose(sel.confidence_from_probs(np.array([0.1, 0.5, 0.8])),
                               [0.9, 0.5, 0.8])
    std = np.array([0.3, 0.01, 0.1])
    order = np.argsort(-sel.confidence_from_spread(std))
    assert order.tolist() == [1, 2, 0]


# ====== degenerate inputs ======

def test_degenerate_inputs():
    all_right = sel.selective_summary(np.array([0.9, 0.8, 0.8]), np.ones(3, dtype=bool))
    assert all_right["aurc"] == 0.0 and all_right["e_aurc"] == 0.0
    assert all_right["coverage_at_risk"]["0.01"]["coverage"] == 1.0

    all_wrong = sel.selective_summary(np.array([0.9, 0.8, 0.7]), np.zeros(3, dtype=bool))
    assert all_wrong["aurc"] == 1.0 and all_wrong["oracle_aurc"] == 1.0
    assert all_wrong["e_aurc"] == 0.0
    assert all_wrong["coverage_at_risk"]["0.10"]["coverage"] is None

    one = sel.selective_summary(np.array([0.7]), np.array([False]))
    assert one["aurc"] == 1.0 and one["n"] == 1 and one["risk_at_full_coverage"] == 1.0

    conf, correct = sel.known_decisions(np.full((2, 3), 0.9), np.full((2, 3), 0.9),
                                        np.full((2, 3), np.nan))
    empty = sel.selective_summary(conf, correct)
    assert empty["n"] == 0
    assert all(empty[k] is None for k in ("aurc", "e_aurc", "oracle_aurc",
                                          "risk_at_full_coverage"))
    assert empty["coverage_at_risk"]["0.05"] == {"coverage": None, "threshold": None,
                                                 "risk": None}
    curve = sel.risk_coverage(conf, correct)
    assert len(curve) == 0 and list(curve.columns) == ["coverage", "risk", "threshold", "n_kept"]
    assert np.isnan(sel.aurc(conf, correct)) and np.isnan(sel.oracle_aurc(correct))
    json.dumps(empty, allow_nan=False)


def test_nan_confidence_and_mismatched_lengths_are_errors():
    with pytest.raises(ValueError):
        sel.risk_coverage(np.array([0.9, np.nan]), np.array([True, False]))
    with pytest.raises(ValueError):
        sel.risk_coverage(np.array([0.9, 0.8]), np.array([True]))


# ====== figure ======

def test_plot_risk_coverage_writes_a_png_atomically(tmp_path):
    conf, correct = random_decisions(500, seed=10)
    curves = {"maxprob": sel.risk_coverage(conf, correct),
              "reversed": sel.risk_coverage(-conf, correct)}
    out = tmp_path / "risk_coverage_test.png"
    plot_risk_coverage(curves, out, "test split", oracle=sel.oracle_curve(correct),
                           random_risk=1 - correct.mean())
    read_figure(out)
    assert [f.name for f in tmp_path.iterdir()] == [out.name]


# ====== resamples ======

@pytest.mark.parametrize("n_levels", [None, 8])
def test_every_resample_equals_the_summary_of_its_repeated_decisions(n_levels):
    """AURC, E-AURC and coverage at each target risk of a few patient resamples against
    selective_summary on the resample's decisions repeated by their multiplicity."""
    from tools.metrics import bootstrap_resamples

    rng = np.random.default_rng(4)
    n = 300
    probs = rng.random((n, 2))
    if n_levels:
        probs = np.round(probs * n_levels) / n_levels
    y = (rng.random((n, 2)) < 0.2 + 0.6 * probs).astype(float)
    y[rng.random((n, 2)) < 0.1] = np.nan
    conf, correct = sel.known_decisions(sel.confidence_from_probs(probs), probs, y)
    rows = np.nonzero(~np.isnan(y))[0]
    resamples = bootstrap_resamples(rng.integers(0, 90, n), 5, seed=2)
    boot = sel.selective_resamples(conf, correct, rows, resamples)
    dense = sel.selective_resamples(conf, correct, rows, resamples.weights())
    for b, w in enumerate(resamples.weights()):
        keep = np.repeat(np.arange(len(rows)), w[rows].astype(int))
        direct = sel.selective_summary(conf[keep], correct[keep])
        assert boot["aurc"][b] == pytest.approx(direct["aurc"], abs=1e-12)
        assert boot["e_aurc"][b] == pytest.approx(direct["e_aurc"], abs=1e-12)
        assert dense["aurc"][b] == boot["aurc"][b]
        for key, values in boot["coverage_at_risk"].items():
            expected = direct["coverage_at_risk"][key]["coverage"]
            assert (np.isnan(values[b]) if expected is None else values[b] == pytest.approx(expected, abs=1e-15))


def test_resampled_aurc_is_reproducible_from_the_seed():
    from tools.metrics import bootstrap_resamples

    conf, correct = random_decisions(200, seed=3, n_levels=6)
    rows = np.arange(200) // 2
    clusters = np.arange(100) // 2

    def run(seed):
        return sel.selective_resamples(conf, correct, rows, bootstrap_resamples(clusters, 50, seed))["aurc"]

    np.testing.assert_array_equal(run(1), run(1))
    assert not np.array_equal(run(1), run(2))


def test_same_ranking_needs_the_same_order_and_the_same_ties():
    a = np.array([0.9, 0.7, 0.7, 0.6])
    assert sel.same_ranking(a, a ** 3)  # a monotone transform keeps order and ties
    assert not sel.same_ranking(a, np.array([0.9, 0.7, 0.69, 0.6]))  # a tie broken
    assert not sel.same_ranking(np.array([0.9, 0.7, 0.69, 0.6]), a)  # a tie made
    assert not sel.same_ranking(a, a[::-1])
    assert not sel.same_ranking(a, a[:3])
