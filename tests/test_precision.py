"""bf16 autocast inference against fp32 on the demo data: same model, same rows, AUROC within
0.002. The model must rank (a model at chance has compressed logits that any rounding reorders),
so this file trains its own: 400 phantoms at 64 px, 5 epochs."""
import json

import numpy as np
import pandas as pd
import pytest

from conftest import SIZE, run_main

pytestmark = pytest.mark.slow  # trains its own model on 400 phantoms

LABELS = ["Cardiomegaly", "Edema", "Effusion"]


@pytest.fixture(scope="module")
def ranked_model(tmp_path_factory):
    from tools.make_demo_data import make_demo_dataset

    root = tmp_path_factory.mktemp("demo400")
    csv = make_demo_dataset(root, n=400, seed=5, size=SIZE)
    table = pd.read_csv(csv)
    table["split"] = table["split"].replace({"calib": "train"})  # no temperature here: train on those films too
    table.to_csv(csv, index=False)
    out = tmp_path_factory.mktemp("train400")
    assert run_main("train", "--csv", csv, "--img-root", root, "--image-size", SIZE, "--epochs", 5, "--lr", "1e-3",
                    "--pretrained", "none", "--precision", "fp32", "--outdir", out, "--num-workers", 0) == 0
    return root, csv, out / "best.pt"


def test_bf16_inference_auroc_is_within_0002_of_fp32(ranked_model, tmp_path):
    root, csv, weights = ranked_model
    every_row = tmp_path / "every_row.csv"  # no split column: eval takes all 400 rows
    pd.read_csv(csv).drop(columns="split").to_csv(every_row, index=False)
    metrics, logits = {}, {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        assert run_main("eval", "--csv", every_row, "--img-root", root, "--weights", weights, "--outdir", out,
                        "--precision", precision, "--num-workers", 0, "--bootstrap", 10) == 0
        assert json.loads((out / "config.json").read_text())["precision"] == precision
        metrics[precision] = json.loads((out / "metrics_test.json").read_text())["macro"]["auroc"]
        preds = pd.read_csv(out / "predictions_test.csv")
        logits[precision] = preds[[f"{lbl}_logit" for lbl in LABELS]].to_numpy()
    assert len(logits["fp32"]) == 400
    assert metrics["fp32"] > 0.7  # a model that ranks, or the comparison means nothing
    assert not np.array_equal(logits["fp32"], logits["bf16"])  # bf16 really ran
    assert abs(metrics["bf16"] - metrics["fp32"]) <= 0.002
