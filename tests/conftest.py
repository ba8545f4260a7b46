"""Shared fixtures: a tiny demo data set (64 px) and a model trained on it for one short run.

The decoded-image cache goes to a temporary folder so tests never touch ~/.cache, and what the tests
and the processes they start leave in temporary folders is removed when the session ends."""
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# One scratch folder for the session, removed at exit: the decode cache, and the temporary files of
# the processes the tests start (torchrun keeps a log folder per launch under TMPDIR).
SCRATCH = Path(tempfile.mkdtemp(prefix="cxr-tests-"))
atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)
os.environ.setdefault("CXR_CACHE_DIR", str(SCRATCH / "cache"))
(SCRATCH / "tmp").mkdir()
os.environ["TMPDIR"] = str(SCRATCH / "tmp")
os.environ.setdefault("MPLBACKEND", "Agg")
# Under pytest-xdist (make test runs a worker per core) each worker takes its share of the cores:
# thread pools as wide as the machine, one per worker on the same cores, slow torch several-fold.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // WORKERS))

# Under `--dist loadfile` pytest-xdist hands out whole files, those with the most tests first. These
# files have few tests but take the longest (torchrun, training killed and resumed, emulated bf16,
# the bench: 176, 85, 63 and 53 s of a 685 s run on 2 cores), so they came last and left one worker
# running alone for a minute at the end. They are handed out first.
LONGEST_FILES = ("tests/test_distributed.py", "tests/test_robustness.py", "tests/test_precision.py",
                 "tests/test_bench.py")


def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class LongestFilesFirst(LoadFileScheduling):
        def _assign_work_unit(self, node):
            for scope in reversed(LONGEST_FILES):
                if scope in self.workqueue:
                    self.workqueue.move_to_end(scope, last=False)
            super()._assign_work_unit(node)

    return LongestFilesFirst(config, log)


SIZE = 64


def run_main(*argv):
    """main.py's main() in-process; returns its exit code."""
    from main import main

    return main([str(a) for a in argv])


def read_figure(path):
    """A PNG the suite wrote, decoded by OpenCV (BGR); it must decode and must not be one flat colour."""
    import cv2

    image = cv2.imread(str(path))
    assert image is not None, f"{path} does not decode"
    assert image.std() > 5, f"{path} is blank"
    return image


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """(root, csv) of 120 phantoms at 64 px, patient-grouped splits."""
    from tools.make_demo_data import make_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    csv = make_demo_dataset(root, n=120, seed=5, size=SIZE)
    return root, Path(csv)


def train_argv(demo, out, epochs=2, size=SIZE):
    """main.py arguments of the ``trained`` run (a resumed run must use the very same ones)."""
    root, csv = demo
    return ["train", "--csv", csv, "--img-root", root, "--image-size", size, "--epochs", epochs, "--pretrained",
            "none", "--precision", "fp32", "--batch-size", 16, "--num-workers", 0, "--outdir", out]


@pytest.fixture(scope="session")
def trained(demo, tmp_path_factory):
    """Output folder of a 2-epoch training run on the demo set (fp32, no pretrained weights).
    Seconds of training: a test that uses it, directly or through another fixture, is marked slow."""
    out = tmp_path_factory.mktemp("train")
    assert run_main(*train_argv(demo, out)) == 0
    return out
