"""Auditing a model the suite did not train, end to end through main.py: a vendor's predictions
alone (images absent), A-versus-B comparison with a planted difference, and other layouts of a
trained model giving exactly its numbers."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.optimize import minimize_scalar
from sklearn.metrics import roc_auc_score

from conftest import SIZE, read_figure, run_main
from tools.files import save_torch
from tools.model import build_model, checkpoint_dict
from tools.model_files import CHESTXRAY14

LABELS = ["Cardiomegaly", "Edema", "Effusion"]
CLIP = 1e-7


def _logit(p):
    p = np.clip(p, CLIP, 1 - CLIP)
    return np.log(p) - np.log1p(-p)


@pytest.fixture(scope="module")
def vendor(demo, tmp_path_factory):
    """The demo table five times over (new patients) with its images out of reach, and two
    vendors' predictions for every row: A is informative on Cardiomegaly and Edema and noise on
    Effusion; B is A except on Effusion, where it is informative (the planted improvement). A has
    exact 0 and 1 values."""
    root, csv = demo
    d = tmp_path_factory.mktemp("vendor")
    copies = []
    for k in range(5):  # no such files: predictions need no images
        copy = pd.read_csv(csv)
        copy["image_path"] = f"archive/{k}/" + copy["image_path"]
        copy["patient_id"] = copy["patient_id"].astype(str) + f"-{k}"
        copies.append(copy)
    table = pd.concat(copies, ignore_index=True)
    table.to_csv(d / "labels.csv", index=False)
    rng = np.random.default_rng(11)
    y = table[LABELS].to_numpy(float)
    signal = np.where(np.isnan(y), 0.0, 2 * np.nan_to_num(y) - 1)
    a = 1 / (1 + np.exp(-(1.5 * signal + rng.normal(0, 1, y.shape))))
    a[:, 2] = rng.uniform(0, 1, len(a))
    first_test = np.flatnonzero((table["split"] == "test").to_numpy())[:2]
    a[first_test, 0] = [0.0, 1.0]
    b = a.copy()
    b[:, 2] = 1 / (1 + np.exp(-(2.5 * signal[:, 2] + rng.normal(0, 1, len(a)))))
    pa = pd.DataFrame({"image_path": table["image_path"], **{f"{lbl}_prob": a[:, j] for j, lbl in enumerate(LABELS)}})
    pb = pd.DataFrame({"image_path": table["image_path"], **{f"{lbl}_logit": _logit(b[:, j]) for j, lbl in enumerate(LABELS)}})
    pa.to_csv(d / "a.csv", index=False)
    pb.to_csv(d / "b.csv", index=False)
    return {"dir": d, "csv": d / "labels.csv", "root": root, "table": table, "a": a, "b": b, "y": y}


def _run(v, command, out, *extra):
    return run_main(command, "--csv", v["csv"], "--img-root", v["root"], "--outdir", out, *extra)


def test_eval_on_predictions_alone_matches_sklearn(vendor, tmp_path):
    out = tmp_path / "eval"
    assert _run(vendor, "eval", out, "--predictions", vendor["dir"] / "a.csv", "--bootstrap", 0,
                "--group-col", "view") == 0
    test = (vendor["table"]["split"] == "test").to_numpy()
    metrics = json.loads((out / "metrics_test.json").read_text())
    for j, label in enumerate(LABELS):
        known = test & ~np.isnan(vendor["y"][:, j])
        expected = roc_auc_score(vendor["y"][known, j], vendor["a"][known, j])
        assert metrics["per_class"][label]["auroc"] == pytest.approx(expected, abs=1e-12)
    preds = pd.read_csv(out / "predictions_test.csv")
    np.testing.assert_allclose(preds["Cardiomegaly_logit"], _logit(vendor["a"][test, 0]), rtol=1e-6)
    config = json.loads((out / "config.json").read_text())
    assert config["model_layout"] == "predictions" and config["pred_format"] == "prob"
    # the exact 0 and 1 became logit(1e-7) and logit(1 - 1e-7)
    assert preds["Cardiomegaly_logit"].iloc[:2].tolist() == pytest.approx([np.log(CLIP / (1 - CLIP)),
                                                                          np.log((1 - CLIP) / CLIP)])


@pytest.mark.parametrize("change,expected", [
    ("drop", ["2 of", "rows of split test have no prediction", "first: archive/"]),
    ("extra", ["1 of", "predicted images are not rows of --csv", "archive/elsewhere.png"]),
    ("value", ["column Edema_prob, row 4", "1.5", "not a probability in [0, 1]"]),
    ("twice", ["has two predictions", "row 2", "row "]),
])
def test_prediction_mismatches_are_named(vendor, tmp_path, capsys, change, expected):
    preds = pd.read_csv(vendor["dir"] / "a.csv")
    if change == "drop":
        test_rows = preds.index[vendor["table"]["split"] == "test"]
        preds = preds.drop(test_rows[:2])
    elif change == "extra":
        preds.loc[len(preds)] = ["archive/elsewhere.png", 0.1, 0.2, 0.3]
    elif change == "value":
        preds.loc[2, "Edema_prob"] = 1.5
    else:
        preds = pd.concat([preds, preds.iloc[:1]], ignore_index=True)
    preds.to_csv(tmp_path / "p.csv", index=False)
    rc = _run(vendor, "eval", tmp_path / "out", "--predictions", tmp_path / "p.csv", "--bootstrap", 0)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("main.py eval: error: --predictions")
    for text in expected:
        assert text in err[-1], (text, err[-1])


def test_commands_that_need_the_model_say_so(vendor, tmp_path, capsys):
    assert _run(vendor, "stress", tmp_path / "s", "--predictions", vendor["dir"] / "a.csv") == 2
    assert "stress needs the model: pass --weights" in capsys.readouterr().err
    assert _run(vendor, "selective", tmp_path / "m", "--predictions", vendor["dir"] / "a.csv",
                "--confidence", "mc_std") == 2
    assert "--confidence mc_std needs the model" in capsys.readouterr().err
    assert _run(vendor, "eval", tmp_path / "l", "--predictions", vendor["dir"] / "a.csv", "--labels", "Edema",
                "Hernia") == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--labels Hernia" in last and "the predictions have Cardiomegaly Edema Effusion" in last
    assert _run(vendor, "eval", tmp_path / "n") == 2
    assert "pass --weights (a model file) or --predictions CSV" in capsys.readouterr().err


def test_calibrate_and_selective_on_predictions(vendor, tmp_path):
    out = tmp_path / "cal"
    assert _run(vendor, "calibrate", out, "--predictions", vendor["dir"] / "b.csv") == 0
    summary = json.loads((out / "calibration_summary.json").read_text())
    assert summary["fit_split"] == "calib"  # the demo sets a split aside for the temperature
    val = (vendor["table"]["split"] == "calib").to_numpy()
    z, y = _logit(vendor["b"][val]).ravel(), vendor["y"][val].ravel()
    z, y = z[~np.isnan(y)], y[~np.isnan(y)]

    def nll(log_t):  # binary NLL of sigmoid(z / T), computed here from its definition
        q = np.clip(1 / (1 + np.exp(-z / np.exp(log_t))), 1e-12, 1 - 1e-12)
        return -np.mean(y * np.log(q) + (1 - y) * np.log(1 - q))

    best = np.exp(minimize_scalar(nll, bounds=(np.log(0.01), np.log(100)), method="bounded",
                                  options={"xatol": 1e-8}).x)
    assert summary["temperature"] == pytest.approx(best, rel=1e-3)
    assert "needs the model" in summary["mc_dropout"]["not_run"] and "needs the model" in summary["tta"]["not_run"]
    out = tmp_path / "sel"
    assert _run(vendor, "selective", out, "--predictions", vendor["dir"] / "b.csv", "--confidence", "all") == 0
    selective = json.loads((out / "selective_summary.json").read_text())
    assert set(selective["signals"]) == {"maxprob", "calibrated"}


def test_compare_finds_the_planted_improvement(vendor, tmp_path):
    out = tmp_path / "cmp"
    assert _run(vendor, "compare", out, "--a", vendor["dir"] / "a.csv", "--b", vendor["dir"] / "b.csv",
                "--group-col", "view", "--bootstrap", 300) == 0
    table = pd.read_csv(out / "compare.csv")
    assert list(table.columns) == ["scope", "group_col", "group", "label", "metric", "a", "b", "diff", "ci_low",
                                   "ci_high", "p_value", "p_holm"]
    row = table[(table["scope"] == "label") & (table["label"] == "Effusion") & (table["metric"] == "auroc")].iloc[0]
    assert row["diff"] > 0.2 and row["ci_low"] > 0 and row["p_holm"] < 0.05
    same = table[table["label"] == "Cardiomegaly"]
    assert (same["diff"] == 0).all() and (same["p_value"] == 1).all()
    assert set(table.loc[table["scope"] == "group", "group"]) == set(vendor["table"]["view"].astype(str))
    result = json.loads((out / "compare.json").read_text())
    test = (vendor["table"]["split"] == "test").to_numpy()
    y, a, b = vendor["y"][test], vendor["a"][test] >= 0.5, vendor["b"][test] >= 0.5
    known = ~np.isnan(y)
    changed = known & (a != b)
    assert result["decisions"]["changed"] == int(changed.sum())
    assert result["decisions"]["fixed"] == int((changed & (b == (y == 1))).sum())
    assert result["a"]["layout"] == "predictions (prob)" and result["b"]["layout"] == "predictions (logit)"
    assert result["n"] == int(test.sum()) and len(result["rows"]) == len(table)
    read_figure(out / "compare_auroc.png")


def test_valtool_on_predictions_marks_what_needs_the_model(vendor, tmp_path):
    out = tmp_path / "vt"
    assert _run(vendor, "valtool", out, "--predictions", vendor["dir"] / "a.csv", "--bootstrap", 50,
                "--compare-with", vendor["dir"] / "b.csv") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["not_run"]) == {"stress", "mc_dropout", "tta", "case_studies", "discover"}
    assert all(why.startswith("needs the model: not run") for why in summary["not_run"].values())
    evaluated = json.loads((out / "eval" / "metrics_test.json").read_text())
    assert summary["headline"]["macro"]["auroc"] == evaluated["macro"]["auroc"]
    assert summary["compare"]["a"]["file"].endswith("b.csv")
    report = (out / "report.html").read_text()
    assert "needs the model: not run" in report and "Compared with a reference model" in report
    assert not (out / "stress").exists()
    assert not any("not found" in p for p in summary["data_checks"]["problems"])  # no image is looked for


# ====== other layouts of a trained model ======

@pytest.fixture(scope="module")
def layouts(trained, tmp_path_factory):
    """The trained demo model written as a torchvision state_dict with its outputs named by
    --model-labels, as a CheXNet model.pth.tar (14 outputs) and as TorchScript."""
    d = tmp_path_factory.mktemp("layouts")
    ckpt = torch.load(trained / "best.pt", weights_only=True)
    state = {k: v for k, v in ckpt["model"].items() if not k.startswith("classifier")}
    weight, bias = ckpt["model"]["classifier.1.weight"], ckpt["model"]["classifier.1.bias"]
    torch.save({**state, "classifier.weight": weight, "classifier.bias": bias}, d / "tv.pth")
    wide_w, wide_b = torch.zeros(14, 1024), torch.zeros(14)
    for j, label in enumerate(ckpt["labels"]):
        wide_w[CHESTXRAY14.index(label)], wide_b[CHESTXRAY14.index(label)] = weight[j], bias[j]
    chexnet = {f"module.densenet121.{k}": v for k, v in state.items()}
    chexnet.update({"module.densenet121.classifier.0.weight": wide_w, "module.densenet121.classifier.0.bias": wide_b})
    torch.save({"state_dict": chexnet, "epoch": 1}, d / "model.pth.tar")
    net = build_model(len(ckpt["labels"]), 0.0)
    net.load_state_dict(ckpt["model"])
    from tools.model import to_model_input

    example = to_model_input(torch.zeros(1, SIZE, SIZE, dtype=torch.uint8))
    torch.jit.save(torch.jit.trace(net.eval(), example), d / "model.ts")
    save_torch(checkpoint_dict(net, ckpt["labels"], SIZE, 0.2, 0, None), d / "copy.pt")
    return {"dir": d, "labels": list(ckpt["labels"])}


LAYOUT_FLAGS = {
    "torchvision": ["--weights", "tv.pth", "--model-labels", *LABELS, "--image-size", SIZE],
    "chexnet": ["--weights", "model.pth.tar", "--image-size", SIZE],
    "torchscript": ["--weights", "model.ts", "--model-labels", *LABELS, "--input-norm", "imagenet",
                    "--image-size", SIZE],
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUT_FLAGS))
def test_every_layout_gives_the_trained_models_numbers(demo, trained, layouts, layout, tmp_path):
    root, csv = demo
    common = ["--csv", csv, "--img-root", root, "--precision", "fp32", "--num-workers", 0]
    assert run_main("eval", *common, "--bootstrap", 0, "--weights", trained / "best.pt", "--outdir", tmp_path / "ours") == 0
    flags = [layouts["dir"] / f if i > 0 and LAYOUT_FLAGS[layout][i - 1] == "--weights" else f
             for i, f in enumerate(LAYOUT_FLAGS[layout])]
    assert run_main("eval", *common, "--bootstrap", 0, *flags, "--outdir", tmp_path / layout) == 0
    ours, theirs = (pd.read_csv(tmp_path / d / "predictions_test.csv") for d in ("ours", layout))
    for label in LABELS:
        np.testing.assert_allclose(theirs[f"{label}_logit"], ours[f"{label}_logit"], atol=1e-5)
    config = json.loads((tmp_path / layout / "config.json").read_text())
    assert config["model_layout"] == layout and config["input_norm"] == "imagenet" and config["image_size"] == SIZE
    # MC head sampling needs the penultimate features: every DenseNet-121 layout has them, TorchScript not
    assert run_main("calibrate", *common, *flags, "--mc-samples", 4, "--tta-samples", 0,
                    "--outdir", tmp_path / f"{layout}_cal") == 0
    mc = json.loads((tmp_path / f"{layout}_cal" / "calibration_summary.json").read_text())["mc_dropout"]
    if layout == "torchscript":
        assert mc["samples"] == 0 and "TorchScript" in mc["not_run"]
    else:
        assert mc["samples"] == 4 and mc["mean_std"] > 0


@pytest.mark.slow
def test_compare_of_a_model_with_its_own_copy_finds_no_difference(demo, trained, layouts, tmp_path):
    root, csv = demo
    out = tmp_path / "cmp"
    assert run_main("compare", "--csv", csv, "--img-root", root, "--a", trained / "best.pt",
                    "--b", layouts["dir"] / "model.pth.tar", "--image-size", SIZE, "--bootstrap", 50,
                    "--precision", "fp32", "--num-workers", 0, "--outdir", out) == 0
    table = pd.read_csv(out / "compare.csv")
    assert np.nanmax(np.abs(table["diff"])) < 1e-6
    result = json.loads((out / "compare.json").read_text())
    assert result["a"]["layout"] == "suite" and result["b"]["layout"] == "chexnet"
    assert result["decisions"]["changed"] == 0
