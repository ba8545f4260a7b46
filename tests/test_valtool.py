"""main.py valtool end to end on the tiny demo set: a labelled run writes what eval writes on its
own and counts its passes; an unlabelled folder gets the probabilities eval gives the same films."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import run_main
from tools.dataset import SeededAugment, letterbox, load_image
from tools.inference import mc_dropout_logits
from tools.metrics import sigmoid
from tools.model import to_model_input
from tools.model_files import load_model

pytestmark = pytest.mark.slow  # every test needs the trained model and a valtool run

LABELS = ["Cardiomegaly", "Edema", "Effusion"]
FLAGS = ["--precision", "fp32", "--num-workers", 0, "--bootstrap", 50]
SPREAD = ["--tta-samples", 2, "--mc-samples", 3]
SEED = 1337  # main.py's default --seed, which draws the dropout masks and the TTA augmentations


def model_input(films):
    return to_model_input(torch.from_numpy(np.stack(films)))


def spread_samples(weights, paths, mc_samples, tta_samples):
    """(MC-Dropout, TTA) probabilities of the checkpoint on the films, (samples, N, L) each, computed
    here: the head sampled with ``mc_dropout_logits`` on the pooled features of torchvision's own
    forward, and one forward pass of the whole model per TTA draw."""
    model, checkpoint = load_model(weights)
    model.eval()
    films = [letterbox(load_image(p), checkpoint.image_size) for p in paths]
    with torch.no_grad():
        head, model.classifier = model.classifier, torch.nn.Identity()
        features = model(model_input(films)).numpy()
        model.classifier = head
        tta = [model(model_input([SeededAugment(SEED, stream=1, draw=t)(film, i) for i, film in enumerate(films)]))
               for t in range(tta_samples)]
    return sigmoid(mc_dropout_logits(model, features, mc_samples, SEED)), sigmoid(torch.stack(tta).numpy())


@pytest.fixture(scope="module")
def labelled(demo, trained, tmp_path_factory):
    root, csv = demo
    out = tmp_path_factory.mktemp("valtool")
    assert run_main("valtool", "--csv", csv, "--img-root", root, "--weights", trained / "best.pt", "--outdir", out,
                    "--group-col", "view", *FLAGS, *SPREAD) == 0
    return out


def test_labelled_run_writes_what_eval_writes(demo, trained, labelled, tmp_path):
    root, csv = demo
    assert run_main("eval", "--csv", csv, "--img-root", root, "--weights", trained / "best.pt", "--outdir", tmp_path,
                    "--group-col", "view", *FLAGS) == 0
    for name in ("metrics_test.json", "group_metrics_view.json"):
        assert json.loads((labelled / "eval" / name).read_text()) == json.loads((tmp_path / name).read_text()), name
    pd.testing.assert_frame_equal(pd.read_csv(labelled / "eval" / "predictions_test.csv"),
                                  pd.read_csv(tmp_path / "predictions_test.csv"))


def test_labelled_summary_counts_passes_and_matches_the_stage_files(demo, labelled):
    summary = json.loads((labelled / "summary.json").read_text())
    n_test = int((pd.read_csv(demo[1])["split"] == "test").sum())
    assert summary["mode"] == "labelled" and summary["n"] == n_test
    assert summary["model_passes_over_split"] == 1 + 12 + 2  # clean, 4 corruptions x 3, TTA draws
    stress = pd.read_csv(labelled / "stress" / "stress_summary.csv")
    assert len(stress) == 13
    clean = json.loads((labelled / "eval" / "metrics_test.json").read_text())
    assert stress.loc[stress["corruption"] == "clean", "macro_auroc"].item() == pytest.approx(clean["macro"]["auroc"])
    calibration = json.loads((labelled / "calibrate" / "calibration_summary.json").read_text())
    assert calibration["mc_dropout"]["samples"] == 3 and calibration["tta"]["samples"] == 2
    assert "not for clinical use" in (labelled / "report.html").read_text()


def test_unlabelled_folder_gets_the_probabilities_eval_gives(demo, trained, labelled, tmp_path):
    root, csv = demo
    table = pd.read_csv(csv)
    folder = tmp_path / "films"
    folder.mkdir()
    for path in table.loc[table["split"] == "test", "image_path"]:
        shutil.copy(root / path, folder)
    out = tmp_path / "out"
    assert run_main("valtool", "--image-dir", folder, "--weights", trained / "best.pt", "--outdir", out,
                    *FLAGS, *SPREAD) == 0
    preds = pd.read_csv(out / "predictions" / "predictions_images.csv")
    reference = pd.read_csv(labelled / "eval" / "predictions_test.csv")
    reference.index = reference["image_path"].str.rsplit("/", n=1).str[-1]
    names = preds["image_path"].str.rsplit("/", n=1).str[-1]
    assert sorted(names) == sorted(reference.index)
    mc, tta = spread_samples(trained / "best.pt", preds["image_path"], mc_samples=3, tta_samples=2)
    for j, label in enumerate(LABELS):
        np.testing.assert_allclose(preds[f"{label}_prob"], reference.loc[names, f"{label}_prob"], atol=1e-5)
        for name, samples in (("mc", mc), ("tta", tta)):
            np.testing.assert_allclose(preds[f"{label}_{name}_mean"], samples[:, :, j].mean(0), atol=1e-5)
            np.testing.assert_allclose(preds[f"{label}_{name}_std"], samples[:, :, j].std(0), atol=1e-5)
            assert (preds[f"{label}_{name}_std"] > 0).all()  # the draws differ for every film
    shifts = pd.read_csv(out / "stress" / "prediction_shifts.csv")
    assert len(shifts) == 12
    assert (shifts[[f"max_abs_shift_{lbl}" for lbl in LABELS]].to_numpy()
            >= shifts[[f"mean_abs_shift_{lbl}" for lbl in LABELS]].to_numpy()).all()
    quality = pd.read_csv(out / "quality" / "image_quality.csv")
    assert len(quality) == len(preds) and not quality["flag_undecodable"].any()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "unlabelled" and summary["n"] == len(preds)
    assert summary["model_passes_over_split"] == 1 + 12 + 2
    mean = {lbl: float(preds[f"{lbl}_prob"].mean()) for lbl in LABELS}
    assert summary["mean_probability"] == pytest.approx(mean)
    # without --reference: the training CSV and validation split the checkpoint records
    reference = summary["drift"]["reference"]
    assert reference["origin"] == "the checkpoint" and reference["split"] == "val"
    assert reference["csv"] == str(csv.resolve()) and (out / "drift" / "estimated_performance.json").is_file()
