"""The mistakes real users make: each gives exit status 2 and one clear line on stderr naming
the file, column, row or flag, never a traceback; checkpoints are never unpickled; runs killed
mid-way resume and finish exactly as an uninterrupted run."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import ROOT, SIZE, run_main, train_argv

pytestmark = pytest.mark.slow  # every test trains, or needs the trained model


@pytest.fixture(scope="module")
def bad(demo, trained, tmp_path_factory):
    """Broken variants of the demo inputs, made once."""
    root, csv = demo
    d = tmp_path_factory.mktemp("bad")
    table = pd.read_csv(csv)
    files = {"csv": csv, "root": root, "weights": trained / "best.pt"}
    (d / "empty.csv").write_text("")
    files["empty"] = d / "empty.csv"
    t = table.copy()
    t.loc[3, "Edema"] = 2
    t.to_csv(d / "badlabel.csv", index=False)
    files["badlabel"] = d / "badlabel.csv"
    t = table.copy()
    t.loc[t.index[t["split"] == "test"][-1], "image_path"] = "images/nowhere.png"
    t.to_csv(d / "missing.csv", index=False)
    files["missing"] = d / "missing.csv"
    # a truncated PNG and a text file named .png, in the test split
    broken_root = d / "broken"
    shutil.copytree(root, broken_root)
    test_rows = table.index[table["split"] == "test"]
    first, second = (broken_root / table.loc[i, "image_path"] for i in test_rows[:2])
    first.write_bytes(first.read_bytes()[:60])
    second.write_text("not an image")
    files["broken_root"] = broken_root
    t = table.copy()
    t.loc[t["split"] == "test", "Cardiomegaly"] = 0
    t.to_csv(d / "oneclass.csv", index=False)
    files["oneclass"] = d / "oneclass.csv"
    ckpt = torch.load(trained / "best.pt", weights_only=True)
    for name, change in {"labels": {"labels": ["Cardiomegaly", "Edema", "Atelectasis"]},
                         "arch": {"arch": "resnet50"}}.items():
        torch.save({**ckpt, **change}, d / f"{name}.pt")
        files[f"ckpt_{name}"] = d / f"{name}.pt"
    (d / "a_file").write_text("x")
    files["a_file"] = d / "a_file"
    files["dir"] = d
    return files


def _eval(f, out, *extra, csv=None, root=None, weights=None):
    return ["eval", "--csv", csv or f["csv"], "--img-root", root or f["root"], "--weights", weights or f["weights"],
            "--outdir", out, "--bootstrap", 0, "--precision", "fp32", "--num-workers", 0, *extra]


CASES = {
    "csv not found": (lambda f, o: _eval(f, o, csv=f["dir"] / "nope.csv"), ["nope.csv", "file not found"]),
    "empty csv": (lambda f, o: _eval(f, o, csv=f["empty"]), ["empty.csv", "empty"]),
    "label column missing": (lambda f, o: ["train", "--csv", f["csv"], "--img-root", f["root"], "--labels",
                                           "Cardiomegaly", "Pneumonia", "--outdir", o],
                             ["Pneumonia", "not found", "columns are: image_path"]),
    "bad label value": (lambda f, o: _eval(f, o, csv=f["badlabel"]), ["badlabel.csv", "column Edema, row 5", "'2'"]),
    "image missing": (lambda f, o: _eval(f, o, "--split", "test", csv=f["missing"]),
                      ["1 of", "not found", "nowhere.png"]),
    "undecodable images": (lambda f, o: _eval(f, o, root=f["broken_root"]),
                           ["2 image(s) cannot be decoded", "--skip-bad-images"]),
    "weights missing": (lambda f, o: _eval(f, o, weights=f["dir"] / "none.pt"), ["--weights", "none.pt", "not found"]),
    "checkpoint labels differ": (lambda f, o: _eval(f, o, "--labels", "Cardiomegaly", "Edema", "Effusion",
                                                    weights=f["ckpt_labels"]), ["Atelectasis", "--labels"]),
    "checkpoint architecture": (lambda f, o: _eval(f, o, weights=f["ckpt_arch"]), ["resnet50", "densenet121"]),
    "checkpoint image size": (lambda f, o: _eval(f, o, "--image-size", 96), ["trained at --image-size 64", "96"]),
    "group column missing": (lambda f, o: _eval(f, o, "--group-col", "scanner"), ["--group-col scanner", "no such column"]),
    "split without rows": (lambda f, o: _eval(f, o, "--split", "holdout"), ["'holdout' has no rows", "train"]),
    "outdir is a file": (lambda f, o: _eval(f, f["a_file"]), ["a_file is a file"]),
    "outdir not writable": (lambda f, o: _eval(f, "/sys/cxr_suite_out"), ["/sys/cxr_suite_out", "not writable"]),
    "image size below 32": (lambda f, o: ["train", "--csv", f["csv"], "--img-root", f["root"], "--image-size", 16,
                                          "--outdir", o], ["--image-size 16", "at least 32"]),
    "auto-split not summing to 1": (lambda f, o: ["train", "--csv", f["csv"], "--img-root", f["root"], "--auto-split",
                                                  0.5, 0.2, 0.2, "--image-size", SIZE, "--outdir", o],
                                    ["--auto-split", "sum to 1"]),
    "crafted pickle as weights": (lambda f, o: _eval(f, o, weights=f["dir"] / "evil.pt"), ["evil.pt", "refused"]),
}


class _Evil:
    """Unpickling this would run ``touch`` on a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("case", list(CASES))
def test_user_mistake_gives_one_line_and_exit_2(case, bad, tmp_path, capsys):
    if case == "crafted pickle as weights":
        torch.save({"model": _Evil(tmp_path / "pwned")}, bad["dir"] / "evil.pt")
    build, expected = CASES[case]
    rc = run_main(*build(bad, tmp_path / "out"))
    err = capsys.readouterr().err
    assert rc == 2, err
    last = err.strip().splitlines()[-1]
    print(f"\nmatrix | {case} | {last}")  # pytest -s shows the user-facing message of each case
    assert last.startswith("main.py ") and ": error: " in last
    for text in expected:
        assert text in last, (text, last)
    assert "Traceback" not in err
    assert not (tmp_path / "pwned").exists()


def test_debug_flag_shows_the_traceback(bad, tmp_path):
    with pytest.raises(Exception, match="file not found"):
        run_main(*_eval(bad, tmp_path, "--debug", csv=bad["dir"] / "nope.csv"))


def test_skip_bad_images_drops_and_records_them(bad, tmp_path, capsys):
    assert run_main(*_eval(bad, tmp_path, "--skip-bad-images", root=bad["broken_root"])) == 0
    assert "skipping 2 undecodable image(s)" in capsys.readouterr().err
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["skipped_images"]["test"]["count"] == 2
    assert config["checkpoint"]["image_size"] == SIZE  # written before the skip, kept by the rewrite
    metrics = json.loads((tmp_path / "metrics_test.json").read_text())
    table = pd.read_csv(bad["csv"])
    assert metrics["n"] == (table["split"] == "test").sum() - 2


def test_one_class_split_gives_null_metrics_and_a_warning(bad, tmp_path, capsys):
    assert run_main(*_eval(bad, tmp_path, csv=bad["oneclass"])) == 0
    assert "Cardiomegaly has one class only" in capsys.readouterr().err
    text = (tmp_path / "metrics_test.json").read_text()
    metrics = json.loads(text)
    assert metrics["per_class"]["Cardiomegaly"]["auroc"] is None
    assert metrics["per_class"]["Cardiomegaly"]["n_pos"] == 0
    # no positive: F1 is 0 when the model calls any image positive, undefined (null) when none
    called = (pd.read_csv(tmp_path / "predictions_test.csv")["Cardiomegaly_prob"] >= 0.5).any()
    assert metrics["per_class"]["Cardiomegaly"]["f1@0.5"] == (0.0 if called else None)
    assert "NaN" not in text
    defined = [metrics["per_class"][lbl]["auroc"] for lbl in ("Edema", "Effusion")]
    assert metrics["macro"]["auroc"] == pytest.approx(sum(defined) / 2)


# ====== interrupted training ======

TINY = 32  # px of the films the interrupted runs train on


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(demo, output folder of its uninterrupted 2-epoch run) for 60 films at 32 px: the tests below
    train a dozen times, each at a tenth of the ``trained`` run's cost. Its validation split has
    both classes of every label, so epoch 1 always improves on nothing and writes best.pt."""
    from tools.make_demo_data import make_demo_dataset

    root = tmp_path_factory.mktemp("tiny")
    demo = (root, Path(make_demo_dataset(root, n=60, seed=5, size=TINY)))
    full = tmp_path_factory.mktemp("tiny_full")
    assert run_main(*train_argv(demo, full, size=TINY)) == 0
    return demo, full


def test_killed_training_resumes_to_the_same_result(tiny, tmp_path):
    """SIGKILL once epoch 1 is saved, then --resume: the log and best.pt equal those of the
    uninterrupted run with the same arguments."""
    demo, full = tiny
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *map(str, train_argv(demo, killed, size=TINY))],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "last.pt").exists():
        time.sleep(0.02)  # epoch 2 takes far longer than this: the kill falls inside it or epoch 1's saves
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(killed / "last.pt", weights_only=True)["epoch"] == 1
    assert run_main(*train_argv(demo, killed, size=TINY), "--resume") == 0
    _same_result(full, killed)


class Killed(BaseException):
    """Stands for SIGKILL: nothing of the run handles it."""


def _same_result(full, resumed):
    a, b = pd.read_csv(full / "train_log.csv"), pd.read_csv(resumed / "train_log.csv")
    cols = ["epoch", "train_loss", "val_loss", "val_macro_auroc"]
    pd.testing.assert_frame_equal(a[cols], b[cols], rtol=1e-5)
    best_a = torch.load(full / "best.pt", weights_only=True)
    best_b = torch.load(resumed / "best.pt", weights_only=True)
    assert best_a["epoch"] == best_b["epoch"]
    for key, value in best_a["model"].items():
        assert torch.allclose(value.float(), best_b["model"][key].float(), atol=1e-5), key


def test_training_killed_at_each_step_of_a_save_resumes_to_the_same_result(tiny, tmp_path, capsys):
    """A kill before each file write of each epoch's save (last.pt, best.pt, train_log.csv,
    training_curves.png; a write itself is atomic, so a kill inside one equals a kill before it),
    then --resume: the log and best.pt equal the uninterrupted run's. Before the first last.pt
    exists there is nothing to resume, and --resume says so."""
    import tools.stages.train as stage

    demo, full = tiny
    steps_seen = []
    for step in range(1, 10):
        out = tmp_path / f"step{step}"
        calls = []

        def wrap(write):
            def killing(*args, **kwargs):
                calls.append(write.__name__)
                if len(calls) == step:
                    raise Killed
                return write(*args, **kwargs)
            return killing

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(stage, "save_torch", wrap(stage.save_torch))
            patch.setattr(stage, "write_csv", wrap(stage.write_csv))
            patch.setattr(stage.figures, "training_curves", wrap(stage.figures.training_curves))
            try:
                run_main(*train_argv(demo, out, size=TINY))
            except Killed:
                steps_seen.append(calls[-1])
            else:
                break  # every step of both epochs has been interrupted once
        if not (out / "last.pt").exists():
            assert step == 1
            capsys.readouterr()
            assert run_main(*train_argv(demo, out, size=TINY), "--resume") == 2
            assert "last.pt not found; run train without --resume first" in capsys.readouterr().err
            continue
        assert run_main(*train_argv(demo, out, size=TINY), "--resume") == 0
        _same_result(full, out)
    # epoch 1 always improves (4 writes); epoch 2 writes best.pt only when it improves
    assert steps_seen[:4] == ["save_torch", "save_torch", "write_csv", "training_curves"]
    assert len(steps_seen) in (7, 8) and steps_seen[4] == "save_torch" and steps_seen[-1] == "training_curves"


def test_ctrl_c_stops_cleanly_with_one_line(tiny, tmp_path):
    demo, out = tiny[0], tmp_path / "int"
    # A shell starts background jobs with SIGINT ignored and children inherit that; this run gets
    # the default disposition so the test holds however the suite itself was started.
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *map(str, train_argv(demo, out, epochs=20, size=TINY))],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "last.pt").exists():
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in err
    assert "interrupted" in err.strip().splitlines()[-1]
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] >= 1
