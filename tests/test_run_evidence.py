"""run_evidence.py: prevalence against pandas counts, brightness against the films themselves,
the threshold sweep against sklearn's confusion matrix on independently computed predictions, the
best-F1 threshold in model_summary.md, INDEX.md links and --results sections, and user mistakes;
on 40 demo phantoms at 64 px and an untrained DenseNet-121."""
import re
import urllib.parse

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import confusion_matrix

from conftest import read_figure
from run_evidence import main
from tools.dataset import CXRDataset, make_loader
from tools.inference import predict
from tools.files import NOTICE, save_torch, write_json
from tools.metrics import THRESHOLDS, sigmoid, threshold_sweep
from tools.model import build_model, checkpoint_dict, prepare_model
from tools.table import resolve_paths

LABELS = ["Cardiomegaly", "Edema", "Effusion"]
SIZE = 64
SPLIT = "train"  # 28 of the 40 rows: enough for both classes of every label


def common_flags(csv, root, outdir):
    return ["--csv", str(csv), "--img-root", str(root), "--outdir", str(outdir), "--precision", "fp32",
            "--num-workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    """Demo data, an untrained checkpoint, a hand-made results folder (an eval-like metrics file and
    a valtool-like summary in a subfolder), and one run_evidence run with --weights."""
    from tools.make_demo_data import make_demo_dataset

    root = tmp_path_factory.mktemp("evidence")
    csv = make_demo_dataset(root / "data", n=40, seed=1, size=SIZE)
    torch.manual_seed(0)
    model = build_model(len(LABELS), 0.2)
    save_torch(checkpoint_dict(model, LABELS, SIZE, 0.2, 0, None), root / "best.pt")

    results = root / "other results"  # a space, so the links must be encoded
    (results / "stage").mkdir(parents=True)
    write_json(results / "metrics_test.json", {"split": "test", "macro": {"auroc": 0.734}})
    write_json(results / "stage" / "summary.json", {"headline": {"macro": {"auroc": 0.812}}})
    pd.DataFrame({"a": [1]}).to_csv(results / "stage" / "table.csv", index=False)
    cv2.imwrite(str(results / "stage" / "plot.png"), np.zeros((4, 4), np.uint8))
    (results / "notes.txt").write_text("not listed")

    out = root / "out"
    rc = main([*common_flags(csv, root / "data", out), "--weights", str(root / "best.pt"), "--split", SPLIT,
               "--results", str(results)])
    assert rc == 0
    return {"root": root, "csv": csv, "data": root / "data", "out": out, "results": results, "model": model,
            "table": pd.read_csv(csv)}


@pytest.fixture(scope="module")
def probabilities(fixture):
    """Sigmoid probabilities of the split's rows from the model that was saved as the checkpoint,
    through tools.inference.predict on films decoded from the files (no image store, no checkpoint
    loading, no run_evidence code). One batch, the shape run_evidence used, so the CPU kernels
    chosen for it are reused."""
    df = fixture["table"]
    df = df[df["split"] == SPLIT].reset_index(drop=True)
    device = torch.device("cpu")
    dataset = CXRDataset(resolve_paths(df, fixture["data"]), df[LABELS].to_numpy(np.float32), SIZE)
    model = prepare_model(fixture["model"], device)
    logits = predict(model, make_loader(dataset, 64, 0, device), device, "fp32")["logits"]
    return df, sigmoid(logits), logits


# ====== data evidence ======

def test_prevalence_matches_pandas_counts(fixture):
    table, prevalence = fixture["table"], pd.read_csv(fixture["out"] / "prevalence.csv")
    assert list(prevalence.columns) == ["split", "label", "n", "n_pos", "prevalence"]
    assert set(prevalence["split"]) == {"train", "val", "calib", "test", "all"}
    for _, row in prevalence.iterrows():
        part = table if row["split"] == "all" else table[table["split"] == row["split"]]
        n, n_pos = int(part[row["label"]].notna().sum()), int((part[row["label"]] == 1).sum())
        assert (row["n"], row["n_pos"]) == (n, n_pos)
        assert row["prevalence"] == pytest.approx(n_pos / n)
    assert len(prevalence) == 5 * len(LABELS)


def test_brightness_stats_match_the_films(fixture):
    """The demo films are square and have no black border lines, so the letterboxed content is the
    whole film at 64 px (the hidden device's 56 px films resized up): per-image statistics are plain
    means and standard deviations of those pixels."""
    from tools.dataset import letterbox, load_image

    table, stats = fixture["table"], pd.read_csv(fixture["out"] / "brightness_stats.csv")
    films = [letterbox(load_image(str(fixture["data"] / p)), 64).astype(float) for p in table["image_path"]]
    means, stds = np.array([f.mean() for f in films]), np.array([f.std() for f in films])
    assert list(stats.columns) == ["group_col", "group", "n", "mean_of_means", "std_of_means", "mean_of_stds"]
    for col in ("all", "view", "site"):  # view and site: the default group columns
        for _, row in stats[stats["group_col"] == col].iterrows():
            mask = np.ones(len(table), bool) if col == "all" else (table[col].astype(str) == row["group"]).to_numpy()
            assert row["n"] == mask.sum()
            assert row["mean_of_means"] == pytest.approx(means[mask].mean())
            assert row["std_of_means"] == pytest.approx(means[mask].std(ddof=1))
            assert row["mean_of_stds"] == pytest.approx(stds[mask].mean())
    assert set(stats.loc[stats["group_col"] == "view", "group"]) == set(table["view"])
    for name in ("brightness_by_view.png", "brightness_by_site.png", "train_montage.png"):
        read_figure(fixture["out"] / name)


# ====== model evidence ======

def test_threshold_sweep_matches_sklearn_confusion_matrix(fixture, probabilities):
    df, p, _ = probabilities
    sweep = pd.read_csv(fixture["out"] / "threshold_sweep.csv")
    assert list(sweep.columns) == ["label", "threshold", "tp", "fp", "tn", "fn", "sensitivity", "specificity",
                                   "precision", "f1"]
    for j, label in enumerate(LABELS):
        block = sweep[sweep["label"] == label]
        np.testing.assert_allclose(block["threshold"], np.arange(1, 100) / 100)
        # the grid threshold nearest the median probability: both decisions occur there
        t = THRESHOLDS[np.argmin(np.abs(THRESHOLDS - np.median(p[:, j])))]
        for threshold in (t, 0.5):
            y = df[label].to_numpy()
            decision = (p[:, j] >= threshold).astype(int)
            tn, fp, fn, tp = confusion_matrix(y, decision, labels=[0, 1]).ravel()
            row = block[np.isclose(block["threshold"], threshold)].iloc[0]
            assert (row["tp"], row["fp"], row["tn"], row["fn"]) == (tp, fp, tn, fn), (label, threshold)
            assert row["sensitivity"] == pytest.approx(tp / (tp + fn))
            assert row["specificity"] == pytest.approx(tn / (tn + fp))
            assert row["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
        assert 0 < (p[:, j] >= t).sum() < len(p)


def test_threshold_sweep_masks_unknown_labels_and_undefined_rates():
    y = np.array([[1.0], [0.0], [np.nan], [0.0]])
    p = np.array([[0.9], [0.2], [0.95], [0.6]])
    sweep = threshold_sweep(y, p, ["L"], thresholds=[0.1, 0.5, 0.95])
    assert sweep[["tp", "fp", "tn", "fn"]].to_numpy().tolist() == [[1, 2, 0, 0], [1, 1, 1, 0], [0, 0, 2, 1]]
    last = sweep.iloc[2]
    assert np.isnan(last["precision"]) and last["f1"] == 0.0 and last["sensitivity"] == 0.0


def test_predictions_from_eval_replace_the_model_pass(fixture, probabilities, tmp_path):
    """With --predictions the sweep comes from the file's logits: here the model's, negated, so a
    model pass would give a different sweep."""
    df, _, logits = probabilities
    preds = df.copy()
    for j, label in enumerate(LABELS):
        preds[f"{label}_logit"] = -logits[:, j]
    preds.to_csv(tmp_path / "predictions_train.csv", index=False)
    out = tmp_path / "from_predictions"
    rc = main([*common_flags(fixture["csv"], fixture["data"], out), "--weights", str(fixture["root"] / "best.pt"),
               "--split", SPLIT, "--predictions", str(tmp_path / "predictions_train.csv")])
    assert rc == 0
    expected = threshold_sweep(df[LABELS].to_numpy(float), sigmoid(-logits), LABELS)
    got = pd.read_csv(out / "threshold_sweep.csv")
    assert got[["tp", "fp", "tn", "fn"]].to_numpy().tolist() == expected[["tp", "fp", "tn", "fn"]].to_numpy().tolist()


def summary_rows(path) -> dict:
    """model_summary.md's table as {label: {column: cell}}."""
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    return {r[0]: dict(zip(header, r)) for r in rows}


def test_model_summary_best_threshold_is_the_sweep_argmax(fixture):
    sweep = pd.read_csv(fixture["out"] / "threshold_sweep.csv")
    rows = summary_rows(fixture["out"] / "model_summary.md")
    assert set(rows) == set(LABELS)
    for label in LABELS:
        block = sweep[sweep["label"] == label].reset_index(drop=True)
        best = block.loc[block["f1"].idxmax()]  # first maximum, as the summary's tie rule
        at_half = block[np.isclose(block["threshold"], 0.5)].iloc[0]
        assert float(rows[label]["best-F1 threshold"]) == pytest.approx(best["threshold"])
        assert float(rows[label]["F1"]) == pytest.approx(best["f1"], abs=5e-4)
        assert float(rows[label]["sensitivity"]) == pytest.approx(best["sensitivity"], abs=5e-4)
        assert float(rows[label]["F1 @0.5"]) == pytest.approx(at_half["f1"], abs=5e-4)
        assert float(rows[label]["specificity @0.5"]) == pytest.approx(at_half["specificity"], abs=5e-4)
    read_figure(fixture["out"] / "f1_threshold_sweep.png")


# ====== the index ======

def links(md_path):
    return [urllib.parse.unquote(t) for t in re.findall(r"\]\(([^)]+)\)", md_path.read_text())]


def test_index_links_every_file_written_and_they_exist(fixture):
    out = fixture["out"]
    index = out / "INDEX.md"
    assert NOTICE in index.read_text()
    targets = links(index)
    for target in targets:
        assert (out / target).resolve().is_file(), target
    written = {p.name for p in out.iterdir() if p.is_file() and not p.name.startswith(".")} - {"INDEX.md"}
    assert written == {"config.json", "prevalence.csv", "brightness_stats.csv", "brightness_by_view.png",
                       "brightness_by_site.png", "train_montage.png", "data_summary.md", "threshold_sweep.csv",
                       "f1_threshold_sweep.png", "model_summary.md"}
    assert written <= set(targets)
    for name in ("data_summary.md", "model_summary.md"):  # their embedded figures resolve too
        assert all((out / t).is_file() for t in links(out / name))


def test_results_section_lists_the_folders_files_and_headline_auroc(fixture):
    out, results = fixture["out"], fixture["results"]
    text = (out / "INDEX.md").read_text()
    section = text[text.index(f"## Results: `{results}`"):]
    listed = {(out / t).resolve() for t in links(out / "INDEX.md")}
    for name in ("metrics_test.json", "stage/summary.json", "stage/table.csv", "stage/plot.png"):
        assert (results / name).resolve() in listed, name
        assert f"[{name}]" in section
    assert "notes.txt" not in text
    assert "headline macro AUROC (metrics_test.json): 0.734" in section
    assert "headline macro AUROC (stage/summary.json): 0.812" in section


# ====== without a model; user mistakes ======

def test_without_weights_only_data_evidence(fixture, tmp_path):
    out = tmp_path / "data_only"
    rc = main([*common_flags(fixture["csv"], fixture["data"], out), "--image-size", str(SIZE), "--group-col", "sex"])
    assert rc == 0
    names = {p.name for p in out.iterdir()}
    assert {"prevalence.csv", "brightness_by_sex.png", "data_summary.md", "INDEX.md"} <= names
    assert not names & {"threshold_sweep.csv", "model_summary.md", "f1_threshold_sweep.png", "brightness_by_view.png"}
    stats = pd.read_csv(out / "brightness_stats.csv")
    assert set(stats["group_col"]) == {"all", "sex"}


@pytest.mark.parametrize("flags, message", [
    (["--group-col", "no_such_column"], "--group-col no_such_column: no such column"),
    (["--results", "missing_folder"], "--results missing_folder: not a directory"),
    (["--weights", "BEST", "--split", "holdout"], "split 'holdout' has no rows"),
])
def test_user_mistakes_exit_2_with_one_line(fixture, tmp_path, capsys, flags, message):
    flags = [str(fixture["root"] / "best.pt") if f == "BEST" else f for f in flags]
    rc = main([*common_flags(fixture["csv"], fixture["data"], tmp_path / "bad"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("run_evidence.py: error: ")
    assert message in err[0]

