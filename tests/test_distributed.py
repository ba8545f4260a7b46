"""Under torchrun (2 CPU processes, gloo) training runs and writes once, and sharded evaluation
gives the same rows and the same metrics as one process."""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT, SIZE, run_main

pytestmark = pytest.mark.slow  # torchrun training and the trained model

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _torchrun(*argv, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*TORCHRUN, str(ROOT / "main.py"), *map(str, argv)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built in")
def test_torchrun_train_and_sharded_eval_match_one_process(demo, trained, tmp_path):
    root, csv = demo
    # ====== training: one small epoch on 2 processes, files written once by rank 0 ======
    out = tmp_path / "ddp_train"
    proc = _torchrun("train", "--csv", csv, "--img-root", root, "--image-size", SIZE, "--epochs", 1,
                     "--pretrained", "none", "--precision", "fp32", "--batch-size", 8, "--num-workers", 0,
                     "--outdir", out)
    assert proc.stderr.count("train done") == 1
    log = pd.read_csv(out / "train_log.csv")
    assert list(log["epoch"]) == [1] and np.isfinite(log["train_loss"]).all()
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert ckpt["labels"] == ["Cardiomegaly", "Edema", "Effusion"]
    assert json.loads((out / "config.json").read_text())["world_size"] == 2

    # ====== eval: sharded over 2 processes vs one process, same checkpoint ======
    common = ["--csv", csv, "--img-root", root, "--weights", trained / "best.pt", "--precision", "fp32",
              "--bootstrap", 100, "--group-col", "view", "--num-workers", 0, "--batch-size", 7]
    _torchrun("eval", *common, "--outdir", tmp_path / "ddp_eval")
    assert run_main("eval", *common, "--outdir", tmp_path / "one_eval") == 0
    a = pd.read_csv(tmp_path / "ddp_eval" / "predictions_test.csv")
    b = pd.read_csv(tmp_path / "one_eval" / "predictions_test.csv")
    assert list(a["image_path"]) == list(b["image_path"])  # same rows, same order, no padding duplicates
    logits = [c for c in a.columns if c.endswith("_logit")]
    assert np.allclose(a[logits], b[logits], atol=1e-5)
    ma = json.loads((tmp_path / "ddp_eval" / "metrics_test.json").read_text())
    mb = json.loads((tmp_path / "one_eval" / "metrics_test.json").read_text())
    assert ma["n"] == mb["n"]
    for label, block in mb["per_class"].items():
        for metric in ("auroc", "auprc", "f1@0.5", "sens@95spec"):
            assert ma["per_class"][label][metric] == pytest.approx(block[metric], abs=1e-9)
    ga = json.loads((tmp_path / "ddp_eval" / "group_metrics_view.json").read_text())
    gb = json.loads((tmp_path / "one_eval" / "group_metrics_view.json").read_text())
    assert ga["groups"].keys() == gb["groups"].keys()
    for group, block in gb["groups"].items():
        assert ga["groups"][group]["n"] == block["n"]
        for label, metrics in block["per_class"].items():
            assert ga["groups"][group]["per_class"][label]["auroc"] == pytest.approx(metrics["auroc"], abs=1e-9)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built in")
def test_torchrun_compare_of_a_model_file_and_predictions_matches_one_process(demo, trained, tmp_path):
    """compare under torchrun: the model side's pass sharded, the table written once, equal to one
    process's (a CheXNet-layout copy of the trained model against eval's predictions)."""
    from tools.export_model import export

    root, csv = demo
    export(trained / "best.pt", "chexnet", tmp_path / "model.pth.tar")
    base = ["--csv", csv, "--img-root", root, "--precision", "fp32", "--num-workers", 0]
    assert run_main("eval", *base, "--weights", trained / "best.pt", "--bootstrap", 0, "--outdir", tmp_path / "ev") == 0
    common = [*base, "--a", tmp_path / "ev" / "predictions_test.csv", "--b", tmp_path / "model.pth.tar",
              "--image-size", SIZE, "--group-col", "view", "--bootstrap", 100, "--batch-size", 7]
    proc = _torchrun("compare", *common, "--outdir", tmp_path / "ddp")
    assert proc.stderr.count("compare done") == 1
    assert run_main("compare", *common, "--outdir", tmp_path / "one") == 0
    a, b = (pd.read_csv(tmp_path / d / "compare.csv") for d in ("ddp", "one"))
    pd.testing.assert_frame_equal(a, b, atol=1e-9)
    assert np.nanmax(np.abs(b["diff"])) < 1e-5  # the same model on both sides


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built in")
def test_torchrun_discover_matches_one_process(demo, trained, tmp_path):
    """discover under torchrun: both feature passes sharded, the analyses and files once on rank 0,
    the same slices, probes and label issues as one process."""
    root, csv = demo
    common = ["--csv", csv, "--img-root", root, "--weights", trained / "best.pt", "--discover-split", "train",
              "--bootstrap", 50, "--precision", "fp32", "--num-workers", 0, "--batch-size", 7]
    proc = _torchrun("discover", *common, "--outdir", tmp_path / "ddp")
    assert proc.stderr.count("discover done") == 1
    assert run_main("discover", *common, "--outdir", tmp_path / "one") == 0
    for name in ("slices.csv", "slice_members.csv", "shortcut_probes.csv", "label_issues.csv"):
        a, b = pd.read_csv(tmp_path / "ddp" / name), pd.read_csv(tmp_path / "one" / name)
        assert list(a.columns) == list(b.columns) and len(a) == len(b), name
        numeric = a.select_dtypes("number").columns
        assert np.allclose(a[numeric].to_numpy(float), b[numeric].to_numpy(float), atol=1e-4, equal_nan=True), name
        text = [c for c in a.columns if c not in numeric and c != "description"]
        assert a[text].astype(str).equals(b[text].astype(str)), name


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built in")
def test_torchrun_new_site_against_a_reference_matches_one_process(demo, trained, tmp_path):
    """valtool --image-dir --reference under torchrun: the folder's and the reference's passes
    sharded, drift/ analysed and written once on rank 0, the same as one process's."""
    from tools.make_demo_data import make_site

    root, csv = demo
    folder = make_site(tmp_path / "site", "exposure", n=30, seed=2, size=SIZE)
    common = ["--image-dir", folder, "--weights", trained / "best.pt", "--reference", csv, "--reference-split", "test",
              "--img-root", root, "--precision", "fp32", "--num-workers", 0, "--batch-size", 7, "--bootstrap", 50,
              "--drift-permutations", 50, "--tta-samples", 0, "--mc-samples", 0, "--corruptions", "jpeg"]
    proc = _torchrun("valtool", *common, "--outdir", tmp_path / "ddp")
    assert proc.stderr.count("valtool done") == 1
    assert run_main("valtool", *common, "--outdir", tmp_path / "one") == 0
    a, b = (json.loads((tmp_path / d / "drift" / "drift_summary.json").read_text()) for d in ("ddp", "one"))
    assert a["n_new"] == b["n_new"] == 30 and a["n_reference"] == b["n_reference"]
    assert a["drift_detected"] == b["drift_detected"]
    for key in ("domain_auroc", "domain_p_value", "mmd", "mmd_p_value"):
        assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-6), key
    for name in ("property_drift.csv", "prediction_drift.csv", "ood_scores.csv"):
        a, b = (pd.read_csv(tmp_path / d / "drift" / name) for d in ("ddp", "one"))
        assert list(a.columns) == list(b.columns) and len(a) == len(b), name
        numeric = a.select_dtypes("number").columns
        assert np.allclose(a[numeric].to_numpy(float), b[numeric].to_numpy(float), atol=1e-4, equal_nan=True), name
