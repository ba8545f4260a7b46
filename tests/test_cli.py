"""End to end, as a user runs it: train, eval, stress, calibrate, selective, valtool on the tiny
demo set; every number checked against an independent computation on the files written."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import average_precision_score, log_loss, roc_auc_score

from conftest import SIZE, read_figure, run_main
from tools.calibration import fit_temperature
from tools.metrics import sigmoid

LABELS = ["Cardiomegaly", "Edema", "Effusion"]


def expected_calibration_error(p, y, bins=15):
    """Pooled ECE over equal-width bins of [0, 1]: the pair-weighted mean |mean p - positive rate|."""
    which = np.minimum((p * bins).astype(int), bins - 1)
    return sum(abs(p[which == b].mean() - y[which == b].mean()) * (which == b).mean()
               for b in np.unique(which))


def _common(demo, trained, out, *extra):
    root, csv = demo
    return ["--csv", csv, "--img-root", root, "--weights", trained / "best.pt", "--outdir", out,
            "--precision", "fp32", "--num-workers", 0, *extra]


@pytest.fixture(scope="module")
def evaluated(demo, trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    assert run_main("eval", *_common(demo, trained, out, "--group-col", "view", "site", "age",
                                     "--bootstrap", 200, "--min-group-size", 10)) == 0
    return out


# ====== train ======

@pytest.mark.slow
def test_train_writes_log_checkpoints_and_config(demo, trained):
    log = pd.read_csv(trained / "train_log.csv")
    config = json.loads((trained / "config.json").read_text())
    assert list(log["epoch"]) == [1, 2]
    assert np.isfinite(log[["train_loss", "val_loss"]]).all(axis=None)
    per_label = log[[f"val_auroc_{lbl}" for lbl in LABELS]]
    assert log["val_macro_auroc"].tolist() == pytest.approx(per_label.mean(axis=1).tolist())
    lr = config["args"]["lr"]
    assert log["lr"].tolist() == pytest.approx([lr, lr / 2])  # cosine over 2 epochs, as each epoch started
    n_train = int((pd.read_csv(demo[1])["split"] == "train").sum())
    assert (log["train_images_per_s"] * log["seconds"]).tolist() == pytest.approx([n_train] * 2)
    best = torch.load(trained / "best.pt", weights_only=True)
    assert {"model", "labels", "image_size", "arch", "dropout", "epoch", "val_macro_auroc"} <= set(best)
    assert best["labels"] == LABELS and best["image_size"] == SIZE and best["arch"] == "densenet121"
    assert best["val_macro_auroc"] == pytest.approx(log["val_macro_auroc"].max())
    assert best["epoch"] == int(log.loc[log["val_macro_auroc"].idxmax(), "epoch"])
    last = torch.load(trained / "last.pt", weights_only=True)
    assert last["epoch"] == 2
    # what --resume continues from: the optimiser after every batch of both epochs, the schedule at its end
    batches = 2 * math.ceil(n_train / 16)
    assert all(state["step"] == batches for state in last["optimizer"]["state"].values())
    assert last["scheduler"]["last_epoch"] == 2 and last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0)
    assert config["seed"] == 1337 and config["versions"]["torch"] == torch.__version__
    assert config["args"]["epochs"] == 2 and config["precision"] == "fp32"
    curves = read_figure(trained / "training_curves.png")
    height, width, _ = curves.shape
    assert 300 < height < width / 2  # two panels side by side: loss and validation AUROC


# ====== eval ======

@pytest.mark.slow
def test_eval_metrics_equal_sklearn_on_written_predictions(demo, evaluated):
    metrics = json.loads((evaluated / "metrics_test.json").read_text())
    preds = pd.read_csv(evaluated / "predictions_test.csv")
    source = pd.read_csv(demo[1])
    assert set(source.columns) <= set(preds.columns)  # metadata carried over
    assert len(preds) == metrics["n"] == (source["split"] == "test").sum()
    aurocs = []
    for label in LABELS:
        y, p = preds[label].to_numpy(float), preds[f"{label}_prob"].to_numpy(float)
        assert np.allclose(p, sigmoid(preds[f"{label}_logit"]), atol=1e-6)
        block = metrics["per_class"][label]
        if len(np.unique(y)) == 2:
            assert block["auroc"] == pytest.approx(roc_auc_score(y, p), abs=1e-9)
            assert block["auprc"] == pytest.approx(average_precision_score(y, p), abs=1e-9)
            aurocs.append(block["auroc"])
            lo, hi = block["ci95"]["auroc"]
            assert lo <= block["auroc"] <= hi
        assert block["n_pos"] == int(y.sum())
    assert metrics["macro"]["auroc"] == pytest.approx(np.mean(aurocs))


@pytest.mark.slow
def test_eval_group_metrics_partition_rows_and_match_sklearn(evaluated):
    preds = pd.read_csv(evaluated / "predictions_test.csv")
    result = json.loads((evaluated / "group_metrics_view.json").read_text())
    assert result["group_col"] == "view"
    assert sum(g["n"] for g in result["groups"].values()) == len(preds)
    for value, block in result["groups"].items():
        rows = preds[preds["view"] == value]
        assert block["n"] == len(rows)
        assert block["small"] == (len(rows) < 10)
        y, p = rows["Effusion"], rows["Effusion_prob"]
        if y.nunique() == 2:
            assert block["per_class"]["Effusion"]["auroc"] == pytest.approx(roc_auc_score(y, p), abs=1e-9)
            rest = preds[preds["view"] != value]
            if rest["Effusion"].nunique() == 2:
                gap = roc_auc_score(y, p) - roc_auc_score(rest["Effusion"], rest["Effusion_prob"])
                assert block["gap_to_rest"]["per_class"]["Effusion"]["auroc"] == pytest.approx(gap, abs=1e-9)
    table = pd.read_csv(evaluated / "group_metrics_view.csv")
    assert sorted(table["group"]) == sorted(result["groups"])


@pytest.mark.slow
def test_eval_bins_numeric_columns_and_writes_edges(evaluated):
    result = json.loads((evaluated / "group_metrics_age.json").read_text())
    edges = result["bin_edges"]
    assert edges == sorted(edges) and len(edges) >= 3
    assert all(name.startswith("[") for name in result["groups"])


@pytest.mark.slow
def test_eval_takes_labels_from_checkpoint_and_is_deterministic(demo, trained, evaluated, tmp_path):
    assert run_main("eval", *_common(demo, trained, tmp_path, "--bootstrap", 0)) == 0
    again = pd.read_csv(tmp_path / "predictions_test.csv")
    first = pd.read_csv(evaluated / "predictions_test.csv")
    pd.testing.assert_frame_equal(again, first)


# ====== stress ======

@pytest.mark.slow
def test_stress_summary_matches_per_corruption_files_and_clean_eval(demo, trained, evaluated, tmp_path):
    assert run_main("stress", *_common(demo, trained, tmp_path, "--group-col", "view")) == 0
    summary = pd.read_csv(tmp_path / "stress_summary.csv")
    assert len(summary) == 13
    assert list(summary.columns[:9]) == ["corruption", "severity", "param", "macro_auroc", "macro_auprc",
                                        "macro_f1@0.5", "macro_sens@95spec", "delta_auroc", "delta_auprc"]
    clean = summary[summary["corruption"] == "clean"].iloc[0]
    eval_metrics = json.loads((evaluated / "metrics_test.json").read_text())
    assert clean["severity"] == 0
    assert clean["macro_auroc"] == pytest.approx(eval_metrics["macro"]["auroc"], abs=1e-9)
    row = summary[(summary["corruption"] == "jpeg") & (summary["severity"] == 3)].iloc[0]
    assert row["param"] == 30
    sev = json.loads((tmp_path / "jpeg_sev3.json").read_text())
    assert sev["macro"]["auroc"] == pytest.approx(row["macro_auroc"])
    assert row["delta_auroc"] == pytest.approx(row["macro_auroc"] - clean["macro_auroc"])
    by_view = pd.read_csv(tmp_path / "stress_by_view.csv")
    assert set(by_view["corruption"]) == set(summary["corruption"])


@pytest.mark.slow
def test_stress_results_do_not_depend_on_batch_size(demo, trained, tmp_path):
    outs = []
    for batch in (5, 32):
        out = tmp_path / f"b{batch}"
        assert run_main("stress", *_common(demo, trained, out, "--corruptions", "gaussian_noise",
                                           "--batch-size", batch)) == 0
        outs.append(pd.read_csv(out / "stress_summary.csv"))
    pd.testing.assert_frame_equal(outs[0], outs[1], atol=1e-5)


# ====== calibrate ======

@pytest.mark.slow
def test_calibrate_fits_temperature_on_val_logits(demo, trained, evaluated, tmp_path):
    val_out = tmp_path / "val"
    assert run_main("eval", *_common(demo, trained, val_out, "--split", "val", "--bootstrap", 0)) == 0
    out = tmp_path / "cal"
    assert run_main("calibrate", *_common(demo, trained, out, "--mc-samples", 10, "--tta-samples", 2, "--calib-split", "val",
                                          "--predictions", val_out / "predictions_val.csv",
                                          evaluated / "predictions_test.csv")) == 0
    summary = json.loads((out / "calibration_summary.json").read_text())
    val = pd.read_csv(val_out / "predictions_val.csv")
    expected = fit_temperature(val[[f"{lbl}_logit" for lbl in LABELS]].to_numpy(), val[LABELS].to_numpy(float))
    assert summary["temperature"] == pytest.approx(expected, rel=1e-6)
    assert summary["auroc_before"] == pytest.approx(summary["auroc_after"], abs=1e-12)
    preds = pd.read_csv(out / "predictions_calibrated_test.csv")
    test = pd.read_csv(evaluated / "predictions_test.csv")
    z = test["Edema_logit"].to_numpy()
    assert np.allclose(preds["Edema_prob"], sigmoid(z / expected), atol=1e-6)
    assert np.allclose(preds["Edema_prob_uncal"], test["Edema_prob"], atol=1e-6)
    y = preds[LABELS].to_numpy(float)
    known = ~np.isnan(y)
    for when, suffix in (("before", "_prob_uncal"), ("after", "_prob")):
        p = preds[[f"{lbl}{suffix}" for lbl in LABELS]].to_numpy()
        assert summary[f"nll_{when}"] == pytest.approx(log_loss(y[known], p[known], labels=[0, 1]), rel=1e-6)
        assert summary[f"ece_{when}"] == pytest.approx(expected_calibration_error(p[known], y[known]), abs=1e-9)
    assert summary["mc_dropout"]["samples"] == 10 and summary["tta"]["samples"] == 2
    for block, name in ((summary["mc_dropout"], "mc"), (summary["tta"], "tta")):
        stds = preds[[f"{lbl}_{name}_std" for lbl in LABELS]].to_numpy()
        assert block["mean_std"] == pytest.approx(stds.mean()) and block["max_std"] == pytest.approx(stds.max())


# ====== selective ======

@pytest.mark.slow
def test_selective_full_coverage_risk_is_the_error_rate(demo, trained, evaluated, tmp_path):
    assert run_main("selective", *_common(demo, trained, tmp_path, "--mc-samples", 5, "--tta-samples", 0,
                                          "--confidence", "maxprob")) == 0
    preds = pd.read_csv(evaluated / "predictions_test.csv")
    y = preds[LABELS].to_numpy(float)
    p = preds[[f"{lbl}_prob" for lbl in LABELS]].to_numpy()
    known = ~np.isnan(y)
    wrong = (p[known] >= 0.5) != y[known]
    error_rate = wrong.mean()
    curve = pd.read_csv(tmp_path / "risk_coverage_test.csv")
    assert list(curve.columns) == ["coverage", "risk", "threshold", "n_kept"]
    assert curve["coverage"].iloc[-1] == pytest.approx(1.0)
    assert curve["risk"].iloc[-1] == pytest.approx(error_rate)
    assert curve["n_kept"].iloc[-1] == known.sum()
    summary = json.loads((tmp_path / "selective_summary.json").read_text())
    assert summary["risk_at_full_coverage"] == pytest.approx(error_rate)
    # AURC: the mean risk over coverages k/n; errors(k) exact at each row, linear in k between rows
    k = np.arange(1, wrong.size + 1)
    errors = np.interp(k, [0, *curve["n_kept"]], [0, *(curve["risk"] * curve["n_kept"])])
    assert summary["aurc"] == pytest.approx(np.mean(errors / k))
    # the oracle keeps every right decision before any wrong one
    assert summary["oracle_aurc"] == pytest.approx(np.mean(np.maximum(k - (~wrong).sum(), 0) / k))
    assert summary["e_aurc"] == pytest.approx(summary["aurc"] - summary["oracle_aurc"])
    assert set(summary["coverage_at_risk"]) == {"0.01", "0.02", "0.05", "0.10"}


@pytest.mark.parametrize("module, folder", [("make_case_studies", "outputs/case_studies"),
                                            ("run_evidence", "outputs/taxonomy_evidence")])
def test_scripts_beside_main_name_their_own_output_folder(module, folder):
    parser = __import__(module).build_parser()
    assert parser.get_default("outdir") == folder
    assert f"output folder (default {folder})" in " ".join(parser.format_help().split())
