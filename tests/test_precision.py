"""bf16 autocast inference against fp32 on the demo data: same model, same rows, AUROC within
0.002. The model must rank (a model at chance has compressed logits that any rounding reorders):
this file makes one in seconds, a DenseNet-121 with random weights whose head is fitted by logistic
regression on its features of half of 400 phantoms at 64 px."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import SIZE, run_main
from tools.bench import fit_head
from tools.files import save_torch
from tools.inference import clean_pass
from tools.model import build_model, checkpoint_dict, prepare_model
from tools.runtime import Run
from tools.splits import Source, load_split
from tools.table import read_table

pytestmark = pytest.mark.slow  # bf16 inference is emulated, and slow, on a CPU without native bf16

LABELS = ["Cardiomegaly", "Edema", "Effusion"]


@pytest.fixture(scope="module")
def ranked_model(tmp_path_factory):
    from tools.make_demo_data import make_demo_dataset

    root = tmp_path_factory.mktemp("demo400")
    csv = make_demo_dataset(root, n=400, seed=5, size=SIZE)
    every_row = root / "every_row.csv"  # no split column: eval takes all 400 rows
    pd.read_csv(csv).drop(columns="split").to_csv(every_row, index=False)
    torch.manual_seed(0)
    model = build_model(len(LABELS), pretrained="none").eval()
    run = Run(root / "features", torch.device("cpu"), "fp32", 0)
    data = load_split(run, Source(str(every_row), str(root), read_table(every_row, LABELS)), None, LABELS, SIZE)
    features = clean_pass(run, prepare_model(model, run.device), data, features=True)["features"]
    fit_head(model, features[::2], data.y[::2])
    weights = save_torch(checkpoint_dict(model, LABELS, SIZE, 0.2, 0, None), root / "fitted_head.pt")
    return root, every_row, weights


def test_bf16_inference_auroc_is_within_0002_of_fp32(ranked_model, tmp_path):
    root, every_row, weights = ranked_model
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
