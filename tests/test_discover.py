"""Discovery on data where the truth is planted: the demo generator's hidden device, site-B shortcut
and flipped test labels (``demo_truth.csv``), and the statistics behind each entry checked against
scipy. The fast tests use films' own pixels as features and predictions of a model that fails where
the truth says; the slow ones run ``main.py discover`` and valtool on the trained model."""
import json

import cv2
import numpy as np
import pandas as pd
import pytest
from scipy.stats import binom, chi2_contingency, fisher_exact, mannwhitneyu

from conftest import run_main
from tools import discover as dsc
from tools.calibration import apply_temperature, fit_temperature
from tools.make_demo_data import LABELS, PARAMS, TRUTH_FILE, make_demo_dataset
from tools.stats import bh_qvalues

THUMB = 16  # films reduced to 16 x 16 pixels serve as features


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """600 demo films at 64 px with their truth, thumbnail features, and the probabilities of a
    model that sees every true label except the device's label (Cardiomegaly) on the hidden
    device's films (there it guesses), seeded."""
    root = tmp_path_factory.mktemp("planted")
    csv = make_demo_dataset(root, n=600, seed=11, size=64)
    df = pd.read_csv(csv)
    truth = pd.read_csv(root / TRUTH_FILE)
    assert list(truth["image_path"]) == list(df["image_path"])
    films = [cv2.imread(str(root / p), cv2.IMREAD_GRAYSCALE) for p in df["image_path"]]
    features = np.stack([cv2.resize(f, (THUMB, THUMB), interpolation=cv2.INTER_AREA).ravel() for f in films]) / 255.0
    rng = np.random.default_rng(0)
    true = truth[[f"true_{lbl}" for lbl in LABELS]].to_numpy(float)
    logits = 2.5 * (2 * true - 1) + rng.normal(0, 1.2, true.shape)
    device = truth["hidden_device"].to_numpy() == 1
    j = LABELS.index(PARAMS["hidden_device"]["label"])
    logits[device, j] = rng.normal(-1.0, 1.2, device.sum())
    probs = 1 / (1 + np.exp(-logits))
    y = df[LABELS].to_numpy(float)
    return {"df": df, "truth": truth, "features": features, "probs": probs, "y": y, "device": device, "films": films}


def test_the_worst_slice_of_the_device_label_recovers_the_hidden_device(planted):
    """Fitted on the train rows, assigned on the test rows from features alone: the slice of the
    device's label with the largest gap there has precision and recall >= 0.6 for the planted
    device films."""
    df, feats, probs, y, device = (planted[k] for k in ("df", "features", "probs", "y", "device"))
    fit, test = (df["split"] == "train").to_numpy(), (df["split"] == "test").to_numpy()
    reducer = dsc.fit_reducer(np.vstack([feats[fit], feats[test]]))
    label = PARAMS["hidden_device"]["label"]
    slices = [s for s in dsc.discover_slices(reducer(feats[fit]), y[fit], probs[fit], LABELS) if s.target == label]
    assert slices, f"no {label} slice found"
    members, _ = dsc.assign(slices, reducer(feats[test]))
    j = LABELS.index(label)
    gaps = [dsc.auroc_gap(y[test], probs[test], m, j) for m in members]
    worst = members[int(np.nanargmin(gaps))]
    hidden = device[test]
    precision = (worst & hidden).sum() / worst.sum()
    recall = (worst & hidden).sum() / hidden.sum()
    assert precision >= 0.6 and recall >= 0.6, (precision, recall, worst.sum(), hidden.sum())
    assert min(gaps) < -0.2


def test_shortcut_probe_flags_the_planted_site_and_not_a_shuffled_column(planted):
    """Site B carries a burned-in tag and more Effusion: the probe flags site; a column shuffled
    across patients is not predictable (its interval covers 0.5) and is no risk."""
    df, feats, y = planted["df"], planted["features"], planted["y"]
    z = dsc.fit_reducer(feats)(feats)
    clusters = df["patient_id"].to_numpy()
    site = dsc.shortcut_row("site", df["site"].to_numpy(), z, y, LABELS, clusters, 300, 0)
    assert site["risk"] and site["label"] == "Effusion" and site["ci_low"] > 0.6
    assert site["prevalence_gap_Effusion"] > 0.1
    patients = np.unique(clusters)
    coin = dict(zip(patients, np.random.default_rng(3).permutation(np.arange(len(patients)) % 2)))
    shuffled = dsc.shortcut_row("shuffled", np.array([coin[c] for c in clusters]), z, y, LABELS, clusters, 300, 0)
    assert shuffled["ci_low"] <= 0.5 <= shuffled["ci_high"]
    assert not shuffled["risk"]


def _model_reading(films, group, reads_tag: bool):
    """An untrained DenseNet whose Effusion logit reads a channel that fires at the bottom right of
    the films (64 px films: a 2 x 2 feature map) and, if ``reads_tag``, also the channel whose top
    left fires most on the films of ``group`` against the others'."""
    import torch

    from tools.model import build_model, feature_map, input_spec, to_model_input

    torch.manual_seed(0)
    net = build_model(3, 0.0, "none").eval()
    with torch.no_grad():
        a = feature_map(net, to_model_input(torch.from_numpy(np.stack(films)), spec=input_spec(net))).numpy()
        mean = a.mean(0)                                               # (1024, 2, 2)
        others = mean.copy()
        others[:, 1, 1] = -np.inf
        base = int(np.argmax(mean[:, 1, 1] - others.reshape(len(mean), -1).max(1)))
        rest_of_map = a.copy()
        rest_of_map[:, :, 0, 0] = -np.inf
        peaked = (a[group, :, 0, 0] - rest_of_map[group].reshape(group.sum(), len(mean), -1).max(2)).mean(0) > 0
        tag = int(np.argmax(np.where(peaked, a[group, :, 0, 0].mean(0) - a[~group, :, 0, 0].mean(0), -np.inf)))
        net.classifier[1].weight.zero_()
        net.classifier[1].bias.zero_()
        j = LABELS.index("Effusion")
        net.classifier[1].weight[j, base] = float(1.0 / max(mean[base, 1, 1], 1e-6))
        if reads_tag:
            net.classifier[1].weight[j, tag] = float(3.0 / max(a[group, tag, 0, 0].mean(), 1e-6))
    return net


@pytest.mark.parametrize("reads_tag", [True, False])
def test_grad_cam_of_a_shortcut_shows_the_burned_in_tag_when_the_model_reads_it(planted, tmp_path, reads_tag):
    """Site B's films carry a white tag top-left. A model whose Effusion logit reads a channel that
    fires there (and one at the bottom right) puts far more Grad-CAM mass in the region where site-B
    films differ (which holds the tag) on site-B films than on the others; one that reads the
    bottom right alone does not."""
    from types import SimpleNamespace

    import torch

    from tools.dataset import letterbox
    from tools.splits import SplitData
    from tools.stages.discover import _shortcut_attention

    df, films, probs = planted["df"], planted["films"], planted["probs"]
    test = np.flatnonzero((df["split"] == "test").to_numpy())
    data = SplitData("test", df.iloc[test].reset_index(drop=True), list(df["image_path"].iloc[test]),
                     planted["y"][test], [letterbox(films[i], 64) for i in test], 64)
    site_b = data.df["site"].to_numpy() == "B"
    model = _model_reading(data.store, site_b, reads_tag)
    row = {"column": "site", "group": "B", "label": "Effusion"}
    run = SimpleNamespace(outdir=tmp_path, device=torch.device("cpu"))
    att = _shortcut_attention(run, model, data, probs[test], LABELS, row, data.df["site"].to_numpy(), 300, 0)
    assert att["n_group"] == att["n_rest"] == 16 and att["group"] == "B"
    assert 0 < att["region_share_of_film"] < 0.02
    assert (tmp_path / "shortcut_site.png").stat().st_size > 0
    # the region is the tag: every pixel of it lies where some jittered tag can be
    tag, size = PARAMS["site_tag"], 64
    box = int(np.ceil((tag["corner"] + tag["jitter"] + tag["width"]) * size)) + 1
    mean_b = np.mean([f for f, b in zip(data.store, site_b) if b], axis=0)
    mean_rest = np.mean([f for f, b in zip(data.store, site_b) if not b], axis=0)
    region = dsc.difference_region(mean_b, mean_rest)
    assert region.sum() >= 8 and not region[box:, :].any() and not region[:, box:].any()
    if reads_tag:
        assert att["ci95"][0] > 0 and att["p_value"] < 0.01, att
        assert att["concentration_group"] > 1.5 and att["concentration_group"] > att["concentration_rest"] + 0.5, att
    else:
        assert att["ci95"][0] <= 0 <= att["ci95"][1] and att["p_value"] > 0.05, att


def test_attention_gap_matches_direct_computation():
    rng = np.random.default_rng(5)
    maps = rng.random((6, 8, 8))
    region = np.zeros((8, 8), bool)
    region[:2, :3] = True
    dense = dsc.concentration(maps, region)
    np.testing.assert_allclose(dense, [m[:2, :3].mean() / m.mean() for m in maps])
    assert np.isnan(dsc.concentration(np.zeros((1, 8, 8)), region)[0])
    a, b = rng.random(12) + 0.3, rng.random(9)
    gap = dsc.attention_gap(a, b, 2000, 0)
    assert gap["difference"] == pytest.approx(a.mean() - b.mean())
    se = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    lo, hi = gap["ci95"]
    assert lo == pytest.approx(gap["difference"] - 1.96 * se, abs=0.06)
    assert hi == pytest.approx(gap["difference"] + 1.96 * se, abs=0.06)
    top = dsc.difference_region(np.zeros((10, 10)), np.arange(100.0).reshape(10, 10), level=0.9)
    assert top.sum() == 10 and top.ravel()[-10:].all()


def test_label_issues_rank_the_flipped_labels_first(planted):
    """On the test split, the top-k candidates per label (k = flips planted) are mostly the flipped
    rows: precision far above the 5% flip rate; and the chance test rejects."""
    df, truth, probs, y = planted["df"], planted["truth"], planted["probs"], planted["y"]
    test = (df["split"] == "test").to_numpy()
    issues = dsc.label_issues(y[test], probs[test], LABELS)
    # the chance of a contradiction comes from calibrated probabilities: temperature fitted on train
    logits, train = np.log(probs / (1 - probs)), (df["split"] == "train").to_numpy()
    calibrated = 1 / (1 + np.exp(-apply_temperature(logits, fit_temperature(logits[train], y[train], per_label=True))))
    rows = np.flatnonzero(test)
    for j, lbl in enumerate(LABELS):
        flipped = truth[f"flipped_{lbl}"].to_numpy()[test] == 1
        k = int(flipped.sum())
        top = issues[issues["label"] == lbl].nsmallest(k, "rank")["row"].to_numpy()
        precision = flipped[top].mean()
        assert precision >= 0.5, (lbl, precision, k)
        assert precision > 5 * flipped.mean()
        t = dsc.label_issue_test(y[test, j], probs[test, j], calibrated[test, j])
        assert t["count"] > t["expected"] and t["p_value"] < 0.05, (lbl, t)
    assert set(issues["row"]) <= set(range(len(rows)))


def test_label_issue_test_holds_its_level_when_labels_are_drawn_from_the_probabilities():
    """Labels drawn from calibrated probabilities: 'more contradictions than chance' is rejected at
    0.05 in at most about 5% of 300 draws (binomial allowance)."""
    rng = np.random.default_rng(1)
    p = rng.beta(0.6, 1.4, 400)
    rejected = 0
    for _ in range(300):
        y = (rng.random(400) < p).astype(float)
        rejected += dsc.label_issue_test(y, p, p)["p_value"] < 0.05
    assert rejected <= binom.ppf(0.999, 300, 0.05)


def test_poisson_binomial_tail_equals_the_binomial_when_every_rate_is_equal():
    for k in (0, 1, 5, 12, 30):
        assert dsc.poisson_binomial_tail(np.full(40, 0.2), k) == pytest.approx(binom.sf(k - 1, 40, 0.2), abs=1e-12)
    q = np.array([0.1, 0.5, 0.9])
    exact = sum(np.prod([qi if b else 1 - qi for qi, b in zip(q, bits)])
                for bits in np.ndindex(2, 2, 2) if sum(bits) >= 2)
    assert dsc.poisson_binomial_tail(q, 2) == pytest.approx(exact)


def test_prevalence_gap_and_its_test_match_scipy_with_one_film_per_patient():
    rng = np.random.default_rng(2)
    values = rng.choice(["a", "b", "c"], 300)
    y = (rng.random((300, 1)) < np.where(values == "a", 0.5, 0.2)[:, None]).astype(float)
    out = dsc.prevalence_gaps(values, y, ["L"], np.arange(300))["L"]
    prev = pd.Series(y[:, 0]).groupby(values).mean()
    assert out["gap"] == pytest.approx(prev.max() - prev.min())
    table = pd.crosstab(values, y[:, 0]).to_numpy()
    assert out["p_value"] == pytest.approx(chi2_contingency(table, correction=False)[1])
    # a patient's three films weigh as one film: the same table from 100 patients, each repeated
    rep = dsc.prevalence_gaps(np.repeat(values[:100], 3), np.repeat(y[:100], 3, axis=0), ["L"],
                              np.repeat(np.arange(100), 3))["L"]
    once = chi2_contingency(pd.crosstab(values[:100], y[:100, 0]).to_numpy(), correction=False)[1]
    assert rep["p_value"] == pytest.approx(once)


def test_over_represented_value_and_its_fisher_test():
    df = pd.DataFrame({"site": ["A"] * 30 + ["B"] * 50 + ["C"] * 20, "view": ["PA", "AP"] * 50})
    member = np.zeros(100, bool)
    member[:25] = True       # 25 of the 30 site-A films
    member[30:35] = True
    out = dsc.over_represented(member, df, ["site", "view"])
    assert (out["top_column"], out["top_value"]) == ("site", "A")
    assert out["top_share"] == pytest.approx(25 / 30) and out["overall_share"] == pytest.approx(0.3)
    assert out["top_p"] == pytest.approx(fisher_exact([[25, 5], [5, 65]])[1])


def test_property_differences_standardise_by_the_pooled_sd():
    props = pd.DataFrame({"image_path": list("abcdef"), "brightness": [10.0, 12, 14, 30, 31, 35],
                          "file_format": ["PNG"] * 6})
    member = np.array([True, True, True, False, False, False])
    (row,) = dsc.property_differences(member, props)
    a, b = np.array([10.0, 12, 14]), np.array([30.0, 31, 35])
    pooled = np.sqrt((2 * a.var(ddof=1) + 2 * b.var(ddof=1)) / 4)
    assert row["std_difference"] == pytest.approx((a.mean() - b.mean()) / pooled)
    # constant on each side and different (the device's 224 px films against 256): no overlap,
    # an infinite standardised difference and Mann-Whitney's p, which a description words as such
    sizes = pd.DataFrame({"image_path": [str(i) for i in range(30)], "original_height": [224.0] * 10 + [256.0] * 20})
    member = np.arange(30) < 10
    (row,) = dsc.property_differences(member, sizes)
    assert row["std_difference"] == -np.inf
    assert row["p_value"] == pytest.approx(mannwhitneyu([224.0] * 10, [256.0] * 20).pvalue) and row["p_value"] < 0.001
    from tools.stages.discover import _describe
    assert "original_height 224 vs 256 (no overlap, p <0.001)" in _describe({"n": 10, "gap": None}, None, [row])


def test_describable_columns_leave_out_identifiers_labels_and_label_defined_columns(planted):
    df, y = planted["df"], planted["y"]
    columns = dsc.describable_columns(df, LABELS, y)
    assert {"view", "site", "sex", "age"} <= set(columns)
    assert not {"image_path", "patient_id", "split", "num_findings", "num_findings_bin", *LABELS} & set(columns)


# ====== the command, on the trained model ======

@pytest.mark.slow
def test_discover_command_writes_consistent_files(demo, trained, tmp_path):
    root, csv = demo
    out = tmp_path / "disc"
    assert run_main("discover", "--csv", csv, "--img-root", root, "--weights", trained / "best.pt",
                    "--discover-split", "train", "--bootstrap", 100, "--precision", "fp32", "--num-workers", 0,
                    "--label-audit-folds", 3, "--outdir", out) == 0
    slices = pd.read_csv(out / "slices.csv")
    assert list(slices.columns) == ["slice_id", "label", "n", "metric", "value", "gap", "ci_low", "ci_high",
                                    "p_value", "q_value", "top_column", "top_value", "top_share", "overall_share",
                                    "description"]
    members = pd.read_csv(out / "slice_members.csv")
    test_paths = set(pd.read_csv(csv).query("split == 'test'")["image_path"])
    assert set(members["image_path"]) <= test_paths
    for r in slices.itertuples():
        assert (members["slice_id"] == r.slice_id).sum() == r.n
        if pd.notna(r.p_value):
            assert r.ci_low <= r.gap <= r.ci_high
    tested = slices["p_value"].notna()
    assert np.allclose(slices.loc[tested, "q_value"], bh_qvalues(slices.loc[tested, "p_value"]))
    probes = pd.read_csv(out / "shortcut_probes.csv")
    assert {"column", "probe_auroc", "ci_low", "ci_high", "n_groups", "risk",
            *[f"prevalence_gap_{lbl}" for lbl in LABELS]} <= set(probes.columns)
    assert "patient_id" not in set(probes["column"]) and "site" in set(probes["column"])
    issues = pd.read_csv(out / "label_issues.csv")
    assert list(issues.columns) == ["image_path", "label", "given", "prob", "margin", "rank"]
    for _, part in issues.groupby("label"):
        assert sorted(part["rank"]) == list(range(1, len(part) + 1))
        assert part.sort_values("rank")["margin"].is_monotonic_decreasing
        given_pos = part["given"] == 1
        assert (part.loc[given_pos, "prob"] < 0.5).all() and (part.loc[~given_pos, "prob"] > 0.5).all()
    assert (out / "label_issues_train.csv").is_file()
    summary = json.loads((out / "discover_summary.json").read_text())
    assert summary["split"] == "test" and summary["discover_split"] == "train"
    assert summary["label_issues"]["train_audit"]["folds"] == 3
    for risk in summary["shortcut_risks"]:   # each looked at through Grad-CAM, with its picture
        att = risk["attention"]
        assert (att["column"], att["group"], att["label"]) == (risk["column"], risk["group"], risk["label"])
        assert att["ci95"][0] <= att["difference"] <= att["ci95"][1]
        assert att["figure"] == f"shortcut_{risk['column'].replace(':', '_')}.png"
        assert (out / att["figure"]).stat().st_size > 0


@pytest.mark.slow
def test_discover_refuses_to_fit_on_the_analysed_split_and_needs_a_model(demo, trained, tmp_path, capsys):
    root, csv = demo
    base = ["discover", "--csv", csv, "--img-root", root, "--outdir", tmp_path / "x"]
    assert run_main(*base, "--weights", trained / "best.pt", "--discover-split", "test") == 2
    assert "--discover-split test is the analysed --split" in capsys.readouterr().err
    assert run_main(*base) == 2
    assert "discover needs the model's penultimate features: pass --weights" in capsys.readouterr().err
