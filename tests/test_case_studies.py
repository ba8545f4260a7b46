"""make_case_studies.py: which study each case picks, the nearest-case fallbacks, the re-run
probabilities under corruption, and the figures, on a 12-image fixture with chosen probabilities."""
import json

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from make_case_studies import main
from tools.corruptions import apply_corruption
from tools.dataset import letterbox, load_image
from tools.model import to_model_input
from tools.errors import UserError
from tools.files import save_torch
from tools.predictions import read_predictions
from tools.stages.case_studies import pick_case
from tools.model import build_model, checkpoint_dict
from tools.model_files import load_model

LABELS = ["Cardiomegaly", "Edema", "Effusion"]
SIZE = 64

# (view, Effusion truth, Effusion_prob); None = unknown. Expected picks are marked.
ROWS = [
    ("PA", 1, 0.70),
    ("PA", 1, 0.92),    # clean_pa: highest-probability PA true positive
    ("AP", 1, 0.97),    # higher, but AP; nearest clean case when there is no view column
    ("PA", 0, 0.99),    # false positive
    ("AP", 1, 0.30),
    ("AP", 1, 0.08),    # ap_miss: lowest-probability AP false negative
    ("PA", 1, 0.02),    # a PA miss, lower still; nearest miss when there is no view column
    ("AP", 0, 0.01),    # true negative
    ("AP", None, 0.005),  # unknown label: never a case
    ("PA", 0, 0.40),
    ("PA", 0, 0.20),
    ("AP", 0, 0.60),
]


def film(index: int) -> np.ndarray:
    """A small non-square film with structure (so blur and JPEG change it), different per index."""
    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[0:72, 0:60]
    image = 120 + 50 * np.sin(xx / (3.0 + index % 4)) * np.cos(yy / 5.0) + rng.normal(0, 20, yy.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def predictions_frame(view_column=True) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for i, (view, effusion, prob) in enumerate(ROWS):
        row = {"image_path": f"img/{i:02d}.png", "split": "test", "patient_id": f"p{i}",
               "Cardiomegaly": int(rng.integers(2)), "Edema": int(rng.integers(2)),
               "Effusion": np.nan if effusion is None else effusion}
        if view_column:
            row["view"] = view
        for label in LABELS:
            p = prob if label == "Effusion" else float(rng.uniform(0.05, 0.95))
            row[f"{label}_logit"] = float(np.log(p / (1 - p)))
            row[f"{label}_prob"] = p
        rows.append(row)
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("cases")
    (root / "img").mkdir()
    for i in range(len(ROWS)):
        assert cv2.imwrite(str(root / f"img/{i:02d}.png"), film(i))
    preds = predictions_frame()
    input_columns = [c for c in preds.columns if not c.endswith(("_logit", "_prob"))]
    preds[input_columns].to_csv(root / "input.csv", index=False)
    preds.to_csv(root / "predictions_test.csv", index=False)
    predictions_frame(view_column=False).to_csv(root / "predictions_noview.csv", index=False)
    torch.manual_seed(0)
    model = build_model(len(LABELS), 0.0, "none")
    with torch.no_grad():  # some positive evidence for Effusion, so the Grad-CAM panels are not empty
        model.classifier[1].weight[LABELS.index("Effusion")].add_(0.01)
    save_torch(checkpoint_dict(model, LABELS, SIZE, 0.0, 0, None), root / "best.pt")
    return root


def run_cli(root, preds, outdir, *extra):
    return main(["--csv", str(root / "input.csv"), "--img-root", str(root), "--weights", str(root / "best.pt"),
                 "--preds", str(root / preds), "--outdir", str(outdir), "--device", "cpu", *extra])


def reference_probs(root, images) -> np.ndarray:
    """Probabilities of the checkpoint on letterboxed films, through the model's own forward."""
    model, _ = load_model(root / "best.pt")
    with torch.no_grad():
        return torch.sigmoid(model.eval()(to_model_input(torch.from_numpy(np.stack(images))))).numpy()


def assert_valid_png(path):
    image = cv2.imread(str(path))
    assert image is not None, path
    assert image.shape[0] > 150 and image.shape[1] > 300
    assert image.std() > 5  # not blank


def test_exact_cases_and_rerun_probabilities(fixture, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(fixture, "predictions_test.csv", out) == 0
    summary = json.loads((out / "case_studies.json").read_text())
    cases = summary["cases"]
    assert summary["label"] == "Effusion" and summary["labels"] == LABELS

    assert cases["clean_pa"]["image_path"] == "img/01.png"
    assert cases["corrupted"]["image_path"] == "img/01.png"
    assert cases["ap_miss"]["image_path"] == "img/05.png"
    for kind, view in (("clean_pa", "PA"), ("corrupted", "PA"), ("ap_miss", "AP")):
        assert cases[kind]["exact"] is True and cases[kind]["nearest"] is False
        assert cases[kind]["view"] == view and cases[kind]["truth"] == 1
    assert cases["clean_pa"]["predictions_csv_prob"] == pytest.approx(0.92)
    assert "nearest case" not in capsys.readouterr().out

    # Clean and corrupted probabilities are the model re-run on the letterboxed film.
    clean = letterbox(load_image(fixture / "img/01.png"), SIZE)
    films = [clean, apply_corruption(clean, "gaussian_blur", 3, 1337, index=1),
             apply_corruption(clean, "jpeg", 3, 1337, index=1)]
    expected = reference_probs(fixture, films)
    probs = cases["corrupted"]["probabilities"]
    np.testing.assert_allclose([probs["clean"][lbl] for lbl in LABELS], expected[0], atol=1e-5)
    np.testing.assert_allclose([probs["corrupted"]["gaussian_blur_sev3"][lbl] for lbl in LABELS], expected[1], atol=1e-5)
    np.testing.assert_allclose([probs["corrupted"]["jpeg_sev3"][lbl] for lbl in LABELS], expected[2], atol=1e-5)
    drops = cases["corrupted"]["confidence_drop"]
    assert drops["gaussian_blur_sev3"] == pytest.approx(expected[0, 2] - expected[1, 2], abs=1e-5)
    assert drops["jpeg_sev3"] == pytest.approx(expected[0, 2] - expected[2, 2], abs=1e-5)
    assert cases["clean_pa"]["probabilities"]["clean"] == probs["clean"]

    for name in ("case_clean_pa.png", "case_corrupted.png", "case_ap_miss.png"):
        assert_valid_png(out / name)
    # three rows (clean, blur, JPEG) make the corrupted figure taller than a one-row case
    assert cv2.imread(str(out / "case_corrupted.png")).shape[0] > 2 * cv2.imread(str(out / "case_clean_pa.png")).shape[0]
    config = json.loads((out / "config.json").read_text())
    assert config["args"]["preds"] == str(fixture / "predictions_test.csv") and config["args"]["label"] == "Effusion"
    assert config["checkpoint"]["labels"] == LABELS


def test_without_view_column_nearest_cases_are_said_and_flagged(fixture, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(fixture, "predictions_noview.csv", out) == 0
    cases = json.loads((out / "case_studies.json").read_text())["cases"]
    # nearest: highest-probability true positive of any view; lowest-probability miss of any view.
    assert cases["clean_pa"]["image_path"] == "img/02.png"
    assert cases["ap_miss"]["image_path"] == "img/06.png"
    for kind in ("clean_pa", "corrupted", "ap_miss"):
        assert cases[kind]["exact"] is False and cases[kind]["nearest"] is True
        assert cases[kind]["view"] is None
        assert cases[kind]["why_nearest"] == "no view column in --preds"
    stdout = capsys.readouterr().out
    assert "clean_pa: no view column in --preds; nearest case:" in stdout
    assert "ap_miss: no view column in --preds; nearest case:" in stdout
    for name in ("case_clean_pa.png", "case_corrupted.png", "case_ap_miss.png"):
        assert_valid_png(out / name)


def picked(df, kind):
    pick = pick_case(df, "Effusion", kind)
    return df["image_path"].iloc[pick.row], pick


def test_nearest_ap_case_when_the_model_misses_no_ap_study():
    df = predictions_frame()
    df.loc[df["image_path"].isin(["img/04.png", "img/05.png"]), "Effusion_prob"] = [0.80, 0.55]
    path, pick = picked(df, "ap_miss")
    # the AP positive with the lowest probability, although the model calls it positive
    assert path == "img/05.png" and not pick.exact
    assert pick.rule == "AP study, Effusion present, model positive (p >= 0.5)"
    assert pick.reason == "no AP study, Effusion present, model negative (p < 0.5)"


def test_nearest_clean_case_when_no_pa_positive_is_detected():
    df = predictions_frame()
    df.loc[df["view"] == "PA", "Effusion_prob"] = 0.1
    path, pick = picked(df, "clean_pa")
    assert path == "img/02.png" and not pick.exact
    assert pick.reason == "no PA study, Effusion present, model positive (p >= 0.5)"


def test_views_are_matched_case_insensitively_and_ties_go_to_the_first_row():
    df = predictions_frame()
    df["view"] = df["view"].str.lower().str.pad(4)
    df.loc[0, "Effusion_prob"] = 0.92
    path, pick = picked(df, "clean_pa")
    assert path == "img/00.png" and pick.exact


def test_no_positive_at_all_falls_back_to_any_study():
    df = predictions_frame()
    df["Effusion"] = 0
    assert picked(df, "clean_pa")[0] == "img/03.png"    # highest probability overall
    assert picked(df, "ap_miss")[0] == "img/08.png"     # lowest probability overall


def test_predictions_csv_is_validated(tmp_path):
    df = predictions_frame()
    df.drop(columns=["Edema_prob"]).to_csv(tmp_path / "a.csv", index=False)
    with pytest.raises(UserError, match=r"--preds .*a\.csv: column\(s\) Edema_prob not found"):
        read_predictions(tmp_path / "a.csv", LABELS, "Effusion")
    bad = df.astype({"Effusion": object})
    bad.loc[3, "Effusion"] = "yes"
    bad.to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(UserError, match="column Effusion, row 5: value 'yes'"):
        read_predictions(tmp_path / "b.csv", LABELS, "Effusion")
    df.loc[0, "Cardiomegaly_prob"] = 1.5
    df.to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(UserError, match="column Cardiomegaly_prob, row 2: value 1.5"):
        read_predictions(tmp_path / "c.csv", LABELS, "Effusion")


def test_unknown_label_is_a_user_error(fixture, tmp_path, capsys):
    assert run_cli(fixture, "predictions_test.csv", tmp_path / "out", "--label", "Hernia") == 2
    err = capsys.readouterr().err
    assert err.startswith("make_case_studies.py: error: --label Hernia: not one of the checkpoint's labels")
