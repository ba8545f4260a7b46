"""``python -m tools.bench`` (``make bench``): what the suite's design choices buy, measured as
ratios on this machine in one run.

Every number is a ratio of two measurements taken in the same run, on images the bench makes
itself in a temporary folder, so no absolute time is asserted anywhere but in item 7, whose
target is the time of the analyses on a table the size of ChestX-ray14 (under 60 s). Warm-up passes are not
counted. The two sides of each ratio are measured interleaved (A, B, A, B), in pieces of about
one batch or a few passes, so that load from other jobs hits both; a ratio is the median over
repeats of the two sides' times in the same repeat. Other jobs' share of the cores is measured
during each item (from /proc/stat) and a warning names the items it may have disturbed.

Two synthetic image sets:

- the demo phantoms (``tools.make_demo_data``) at 256 px, ``--n-images`` of them, for the model
  measurements (items 1, 3, 5);
- ``--n-films`` 8-bit PNG films of ``--film-size`` px (1024 = ChestX-ray14's size), the same
  phantoms upscaled, for the measurements where decoding matters (items 2, 4, 6).

Items:

1. ``predict`` as the suite runs it (cached uint8 pixels, precision auto, channels_last,
   inference_mode, its default inference batch) against a plain loop (decode the PNG each time,
   resize, normalise in float, fp32 NCHW model under ``no_grad``, ``--batch-size``): ratio of
   images/s; where the two batch sizes differ, also the suite at ``--batch-size``; the suite at
   fp32 and at bf16 side by side where the hardware has native bf16 (else the bf16 row says it is
   not supported here); and the logit and AUROC difference between the two precisions on the
   same images.
2. Time the model waits for data, as a fraction of model time, with a cold cache (the store is
   built first) and a warm cache (the store is on disk and reused).
3. Calibrate-style MC-Dropout (clean pass with features + 30 head samples) against a clean pass.
4. The stress command's 13 passes against 13 x one clean pass that decodes the PNGs each time,
   and against 13 x one clean pass on the cached store.
5. Passes of the model over the test split in ``main.py valtool``, counted by wrapping ``predict``.
6. On the films: cache build rate, cached read rate and plain decode rate.
7. Analyses at scale: what eval, calibrate and selective compute from a predictions table the size
   of ChestX-ray14 (``--scale-rows`` films of patients with about 3.7 films each, its 14 findings
   at their prevalence, synthetic scores, group columns view, sex and age) with
   ``--scale-resamples`` patient resamples, against a per-resample loop (scikit-learn with row
   weights, the suite's unweighted calibration and risk-coverage functions on the resampled rows)
   over ``--reference-resamples`` of the same resamples, extrapolated to all of them and stated as
   such; the suite's values on those resamples are checked against the loop's; and the three
   stages writing their files and figures from the same table. ``--analyses`` runs this item only.
8. Other CPU runtimes (``--backends`` runs this item only, and it runs only when asked): fp32
   inference through ``torch.compile`` and ONNX Runtime (when installed) against PyTorch eager,
   with the largest logit difference and the rule for adopting one (``BACKEND_MARGIN``,
   ``BACKEND_TOLERANCE``).

``--gpu`` (CUDA only) instead measures eval images/s at batch 256 in bf16 + channels_last, with
and without ``torch.compile``, and the warm-cache data-wait fraction.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from tools.errors import UserError
from tools.table import DEFAULT_LABELS

LABELS = list(DEFAULT_LABELS)
MC_SAMPLES = 30
VALTOOL_TTA, VALTOOL_MC, VALTOOL_BOOTSTRAP = 2, 5, 50
GPU_BATCH = 256
SCALE = {"scale_rows": 112_120, "scale_resamples": 1000, "reference_resamples": 10}
FULL = {"n_images": 192, "image_size": 224, "n_films": 96, "film_size": 1024, "repeats": 3, **SCALE}
QUICK = {"n_images": 16, "image_size": 64, "n_films": 8, "film_size": 256, "repeats": 2,
         "scale_rows": 3000, "scale_resamples": 100, "reference_resamples": 2}
GPU = {"n_images": 4096, "image_size": 224, "n_films": 0, "film_size": 1024, "repeats": 5, **SCALE}


# ====== measuring ======

def median(values) -> float:
    return float(statistics.median(values))


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a timer stops when the work has finished (CUDA is async)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(result, seconds) of ``fn()``, measured with ``perf_counter`` around a device sync."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def interleaved(sides: dict, repeats: int, device: torch.device) -> dict:
    """{name: [seconds per repeat]} for the callables in ``sides``, run A, B, A, B, ..."""
    times = {name: [] for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            times[name].append(timed(fn, device)[1])
    return times


def in_chunks(sides: dict, n_chunks: int, repeats: int, device: torch.device) -> dict:
    """{name: [seconds per repeat]}: each repeat runs every side on chunk 0, then every side on
    chunk 1, ... (``fn(k)`` does side's work on chunk k) and sums each side's times. Interleaving
    at the grain of a chunk rather than a whole pass makes both sides see the same load from
    other jobs, which on a shared machine changes over tens of seconds."""
    times = {name: [] for name in sides}
    for _ in range(repeats):
        totals = dict.fromkeys(sides, 0.0)
        for k in range(n_chunks):
            for name, fn in sides.items():
                totals[name] += timed(lambda: fn(k), device)[1]
        for name, total in totals.items():
            times[name].append(total)
    return times


def paired_ratio(numerator: list, denominator: list) -> float:
    """Median over repeats of numerator / denominator, each pair measured in the same repeat."""
    return median(a / b for a, b in zip(numerator, denominator))


class TimedLoader:
    """A loader that records, per batch, ``waits``: seconds from asking for the batch to getting
    it (the model waiting for data; the first includes starting the loader's workers), and
    ``steps``: seconds from getting it to asking for the next one (the model step, including the
    copy of its outputs back to the host; on CUDA the step is synchronised before it is stopped)."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.dataset, self.device = loader, loader.dataset, device
        self.waits, self.steps = [], []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        start = time.perf_counter()
        batches = iter(self.loader)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            arrived = time.perf_counter()
            self.waits.append(arrived - start)
            yield batch
            synchronize(self.device)
            start = time.perf_counter()
            self.steps.append(start - arrived)


@contextlib.contextmanager
def patched_predict(wrap):
    """Within the block, model passes run through ``wrap(predict)``: every pass of the suite goes
    through ``tools.inference.clean_pass``, which calls that module's ``predict``."""
    from unittest import mock

    from tools import inference

    with mock.patch.object(inference, "predict", wrap(inference.predict)):
        yield


def timing_predict(record: list):
    """``patched_predict`` wrapper: each pass's TimedLoader is appended to ``record``."""
    def wrap(original):
        def predict(model, loader, device, *args, **kwargs):
            loader = TimedLoader(loader, device)
            record.append(loader)
            return original(model, loader, device, *args, **kwargs)
        return predict
    return wrap


def counting_predict(split_paths, counts: dict):
    """``patched_predict`` wrapper: counts passes whose rows are exactly ``split_paths``
    (``counts["split"]``) and any other pass (``counts["other"]``)."""
    wanted = sorted(os.path.abspath(p) for p in split_paths)

    def wrap(original):
        def predict(model, loader, *args, **kwargs):
            rows = sorted(os.path.abspath(p) for p in loader.dataset.paths)
            counts["split" if rows == wanted else "other"] += 1
            return original(model, loader, *args, **kwargs)
        return predict
    return wrap


# ====== the machine ======

def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(device: torch.device, precision: str) -> dict:
    from tools.runtime import cpu_has_bf16

    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "device": str(device), "precision": precision, "cpu_native_bf16": cpu_has_bf16(),
            "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds used by every process on the machine, by this process and its finished
    children such as loader workers), or None where /proc/stat is missing."""
    import resource

    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    jiffies = [int(f) for f in fields]
    idle = jiffies[3] + (jiffies[4] if len(jiffies) > 4 else 0)  # idle + iowait
    busy = (sum(jiffies[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is already in user
    own = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    return busy, own


class OtherLoad:
    """Share of the machine's cores that other jobs used while a block ran:
    (all busy CPU time - this process's) / (wall time x cores). Other jobs' thread pools contend
    with the model's, and a pass can then take several times longer at random."""

    def __enter__(self):
        self.start, self.wall = cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        end, wall = cpu_seconds(), time.perf_counter() - self.wall
        self.fraction = None
        if self.start and end and wall > 0:
            used = (end[0] - self.start[0]) - (end[1] - self.start[1])
            self.fraction = max(0.0, used) / (wall * (os.cpu_count() or 1))
        return False


def busy_warning(items: dict, idle_share: float | None, limit: float = 0.2) -> str | None:
    """A line naming the items during which other jobs used more than ``limit`` of the cores."""
    busy = {k: v["other_jobs_cpu_share"] for k, v in items.items() if (v.get("other_jobs_cpu_share") or 0) > limit}
    if idle_share is not None and idle_share > limit:
        busy = {"before the start": idle_share, **busy}
    if not busy:
        return None
    shown = ", ".join(f"{k} {v:.0%}" for k, v in busy.items())
    return (f"other jobs used the cores ({shown} of all cores): their thread pools contend with the model's, "
            "so those ratios may be off; rerun on an idle machine")


# ====== the images ======

def make_films(demo_csv: Path, out_dir: Path, n: int, size: int) -> Path:
    """:func:`write_films` in a fresh (spawned) process. Upscaling to 1024 px starts OpenCV's
    thread pool, and a loader worker forked from a process whose pool has started hangs when
    ``tools.dataset.worker_init`` calls ``cv2.setNumThreads``; the bench's own process must not
    start it before the suite forks its workers."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(write_films, demo_csv, out_dir, n, size).result()


def write_films(demo_csv: Path, out_dir: Path, n: int, size: int) -> Path:
    """``n`` 8-bit PNG films of ``size`` x ``size`` px: the demo phantoms upscaled (cycling through
    them when ``n`` exceeds their number), with the demo table's labels. Returns the CSV path."""
    import cv2
    import pandas as pd

    from tools.files import write_csv

    demo = pd.read_csv(demo_csv)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        row = demo.iloc[i % len(demo)].to_dict()
        image = cv2.imread(str(demo_csv.parent / row["image_path"]), cv2.IMREAD_GRAYSCALE)
        film = cv2.resize(image, (size, size), interpolation=cv2.INTER_CUBIC)
        row["image_path"] = f"images/film_{i:05d}.png"
        if not cv2.imwrite(str(out_dir / row["image_path"]), film):
            raise UserError(f"--out: cannot write {out_dir / row['image_path']}; check free space in the temp folder")
        rows.append(row)
    return write_csv(out_dir / "films.csv", pd.DataFrame(rows).drop(columns=["split"]))


def chunk_rows(n: int, size: int) -> list[np.ndarray]:
    """Row indices 0..n-1 in consecutive chunks of ``size`` (the last one may be shorter)."""
    return [np.arange(i, min(i + size, n)) for i in range(0, n, size)]


class Bench:
    """What the items share: the device, the precision, the options and the temp folder."""

    def __init__(self, opts, tmp: Path, device: torch.device, precision: str):
        self.opts, self.tmp, self.device, self.precision = opts, tmp, device, precision

    def run(self, cache: str, batch_size=None):
        from tools.runtime import Run

        return Run(self.tmp / "out", self.device, self.precision, self.opts.seed, batch_size=batch_size,
                   cache_dir=self.tmp / "cache" / cache)

    def split(self, csv, cache: str, batch_size=None):
        """(run, SplitData, seconds to build or open the store) for all of ``csv``'s rows."""
        from tools.splits import Source, load_split
        from tools.table import read_table

        run = self.run(cache, batch_size)
        source = Source(str(csv), str(Path(csv).parent), read_table(csv, LABELS))
        data, seconds = timed(lambda: load_split(run, source, None, LABELS, self.opts.image_size), self.device)
        return run, data, seconds


# ====== the model ======

def bench_model(seed: int) -> torch.nn.Module:
    """DenseNet-121 with the suite's head, random weights (the speed does not depend on them)."""
    from tools.model import build_model

    torch.manual_seed(seed)
    return build_model(len(LABELS), dropout=0.2, pretrained="none").eval()


def fit_head(model, features: np.ndarray, y: np.ndarray) -> None:
    """Set the head to per-label logistic regressions on ``features``, so that logits rank the
    images and the bf16-vs-fp32 AUROC comparison means something."""
    from sklearn.linear_model import LogisticRegression

    from tools.model import head

    linear = next(m for m in head(model) if isinstance(m, torch.nn.Linear))
    scale = features.std(0).mean() + 1e-6
    with torch.no_grad():
        for j in range(y.shape[1]):
            known = ~np.isnan(y[:, j])
            if len(np.unique(y[known, j])) < 2:
                continue
            fit = LogisticRegression(C=1.0, max_iter=2000).fit(features[known] / scale, y[known, j])
            linear.weight[j] = torch.as_tensor(fit.coef_[0] / scale, dtype=linear.weight.dtype)
            linear.bias[j] = float(fit.intercept_[0])


def plain_predict(model, paths, image_size: int, batch_size: int, device: torch.device) -> np.ndarray:
    """What a straightforward eval loop does: decode each PNG with OpenCV, resize, normalise in
    float32 on the host, fp32 NCHW model under ``no_grad``. Returns logits (N, L)."""
    import cv2

    from tools.dataset import letterbox
    from tools.model import IMAGENET_MEAN, IMAGENET_STD

    mean = np.array(IMAGENET_MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.array(IMAGENET_STD, np.float32).reshape(1, 3, 1, 1)
    out = []
    with torch.no_grad():
        for start in range(0, len(paths), batch_size):
            images = [letterbox(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE), image_size)
                      for p in paths[start:start + batch_size]]
            x = np.repeat(np.stack(images).astype(np.float32)[:, None] / 255.0, 3, axis=1)
            x = torch.from_numpy((x - mean) / std).to(device)
            out.append(model(x).float().cpu().numpy())
    return np.concatenate(out)


# ====== the items ======

def target(value: float, op: str, bound: float) -> dict:
    met = value >= bound if op == ">=" else value <= bound
    return {"target": f"{op} {bound:g}", "met": bool(met)}


def item_predict(b: Bench, csv: Path) -> tuple[dict, torch.nn.Module]:
    """1. The suite's predict against a plain fp32 loop on the same images, interleaved by chunks
    of whole batches of both; also the suite at the plain loop's batch size where that differs."""
    from tools.inference import clean_pass
    from tools.metrics import compute_metrics, sigmoid
    from tools.model import prepare_model

    run, data, build_s = b.split(csv, "demo")
    base = bench_model(b.opts.seed)
    plain = copy.deepcopy(base).to(b.device).eval()
    fast = prepare_model(base, b.device)
    # ====== warm-up (not counted); its features fit the head of both models ======
    warm = clean_pass(run, fast, data, features=True, desc="warm-up")
    fit_rows, held_out = np.arange(0, len(data.paths), 2), np.arange(1, len(data.paths), 2)
    fit_head(fast, warm["features"][fit_rows], data.y[fit_rows])
    plain.classifier.load_state_dict(fast.classifier.state_dict())
    # a chunk holds whole batches of both sides, so neither runs a cut-short batch inside it
    parts = [data.subset(rows) for rows in chunk_rows(len(data.paths), math.lcm(run.inference_batch, b.opts.batch_size))]
    out = {"fast": [None] * len(parts), "plain": [None] * len(parts)}
    sides = {
        "predict": lambda k: out["fast"].__setitem__(k, clean_pass(run, fast, parts[k], desc="predict")["logits"]),
        "plain": lambda k: out["plain"].__setitem__(k, plain_predict(plain, parts[k].paths, b.opts.image_size,
                                                                     b.opts.batch_size, b.device)),
    }
    if run.inference_batch != b.opts.batch_size:
        small = b.run("demo", batch_size=b.opts.batch_size)  # the suite at the plain loop's batch size
        sides["predict_small_batch"] = lambda k: clean_pass(small, fast, parts[k],
                                                            desc=f"predict b{b.opts.batch_size}")
    other = "bf16" if b.precision == "fp32" else "fp32"  # the precision auto did not choose, where supported
    if precision_support(b.device)[other] is None:
        at_other = replace(run, precision=other)
        sides[f"predict_{other}"] = lambda k: clean_pass(at_other, fast, parts[k], desc=f"predict {other}")
    for fn in sides.values():  # every batch shape once: the first and the last chunk
        fn(0), fn(len(parts) - 1)
    times = in_chunks(sides, len(parts), b.opts.repeats, b.device)
    n = len(data.paths)
    logits = {k: np.concatenate(v) for k, v in out.items()}
    ratio = paired_ratio(times["plain"], times["predict"])
    diff = np.abs(logits["fast"] - logits["plain"])
    auroc = {k: compute_metrics(data.y[held_out], sigmoid(v[held_out]), LABELS)["macro"]["auroc"]
             for k, v in logits.items()}
    sanity = {"max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
              "macro_auroc_suite": auroc["fast"], "macro_auroc_plain_fp32": auroc["plain"],
              "auroc_diff": abs(auroc["fast"] - auroc["plain"]),
              "decisions_agree": float(((logits["fast"] >= 0) == (logits["plain"] >= 0)).mean()),
              "head": "fitted on the even rows' features; AUROC on the odd rows; only the difference matters"}
    result = {"name": "predict vs plain loop", "images": n, "image_size": b.opts.image_size, "precision": b.precision,
              "suite": f"cached uint8, {b.precision}, channels_last, inference_mode, batch {run.inference_batch}",
              "plain": f"cv2 PNG decode each time, float normalise, fp32 NCHW, no_grad, batch {b.opts.batch_size}",
              "predict_img_s": n / median(times["predict"]), "plain_img_s": n / median(times["plain"]),
              "ratio": ratio, **target(ratio, ">=", 2.5), "sanity": sanity, "chunks": len(parts),
              "timings": {"predict_s": times["predict"], "plain_s": times["plain"], "store_build_s": build_s}}
    if "predict_small_batch" in times:
        result["predict_at_plain_batch_img_s"] = n / median(times["predict_small_batch"])
        result["ratio_at_plain_batch"] = paired_ratio(times["plain"], times["predict_small_batch"])
        result["timings"][f"predict_batch{b.opts.batch_size}_s"] = times["predict_small_batch"]
    result["precisions"] = {}
    for precision, why_not in precision_support(b.device).items():
        side = "predict" if precision == b.precision else f"predict_{precision}"
        if side not in times:
            result["precisions"][precision] = {"supported": False, "note": f"not supported here: {why_not}"}
            continue
        result["precisions"][precision] = {"supported": True, "img_s": n / median(times[side]),
                                           "ratio_vs_plain_fp32": paired_ratio(times["plain"], times[side])}
        result["timings"][f"predict_{precision}_s"] = times[side]
    return result, fast


def precision_support(device: torch.device) -> dict:
    """{"fp32": None, "bf16": None or why this device lacks native bf16}: the precisions the
    model passes are measured at side by side."""
    from tools.runtime import cpu_has_bf16

    if device.type == "cuda":
        bf16 = None if torch.cuda.is_bf16_supported() else "this GPU has no bf16"
    else:
        bf16 = None if cpu_has_bf16() else "this CPU has neither AVX-512 BF16 nor AMX"
    return {"fp32": None, "bf16": bf16}


def data_wait(b: Bench, csv: Path, model, cache: str, batch_size=None) -> dict:
    """One load_split + clean pass with the loader timed; the store's build/open time counts as
    waiting, since the model cannot start before it."""
    from tools.inference import clean_pass

    record = []
    run, data, store_s = b.split(csv, cache, batch_size)
    with patched_predict(timing_predict(record)):
        clean_pass(run, model, data, desc="timed pass")
    loader = record[-1]
    model_s, loader_s = sum(loader.steps), sum(loader.waits)
    return {"images": len(data.paths), "store_s": store_s, "loader_wait_s": loader_s,
            "first_batch_wait_s": loader.waits[0],
            "model_s": model_s, "fraction": (store_s + loader_s) / model_s}


def item_data_wait(b: Bench, csv: Path, model) -> dict:
    """2. Data wait / model time, cold cache (new cache folder each time) and warm cache."""
    data_wait(b, csv, model, "films-warm")  # builds the warm store and warms the model up
    runs = {"cold": [], "warm": []}
    for r in range(b.opts.repeats):
        runs["cold"].append(data_wait(b, csv, model, f"films-cold-{r}"))
        runs["warm"].append(data_wait(b, csv, model, "films-warm"))
    cold, warm = (median(x["fraction"] for x in runs[k]) for k in ("cold", "warm"))
    timings = {f"{k}_{f}": [x[f] for x in runs[k]] for k in runs for f in ("store_s", "loader_wait_s", "model_s")}
    return {"name": "data wait / model time", "images": runs["warm"][0]["images"],
            "source": f"{b.opts.n_films} PNG films of {b.opts.film_size} px",
            "cold_fraction": cold, "warm_fraction": warm, "ratio": warm, **target(warm, "<=", 0.10),
            "warm_loader_only_fraction": median(x["loader_wait_s"] / x["model_s"] for x in runs["warm"]),
            "definition": "(store build or open + time waiting for batches) / time in model steps",
            "timings": timings}


def item_mc_dropout(b: Bench, csv: Path, model) -> dict:
    """3. Clean pass with features + 30 MC-Dropout head samples against a clean pass alone,
    interleaved by chunks of one inference batch (the head sampled per chunk)."""
    from tools.inference import clean_pass, mc_dropout_logits

    run, data, _ = b.split(csv, "demo")
    parts = [data.subset(rows) for rows in chunk_rows(len(data.paths), run.inference_batch)]
    mc = []

    def with_mc(k):
        feats = clean_pass(run, model, parts[k], features=True, desc="clean+features")["features"]
        mc.append(timed(lambda: mc_dropout_logits(model, feats, MC_SAMPLES, b.opts.seed, b.device), b.device)[1])

    sides = {"mc": with_mc, "clean": lambda k: clean_pass(run, model, parts[k], desc="clean")}
    with_mc(len(parts) - 1)
    mc.clear()
    times = in_chunks(sides, len(parts), b.opts.repeats, b.device)
    ratio = paired_ratio(times["mc"], times["clean"])
    return {"name": f"MC-Dropout x{MC_SAMPLES} vs none", "images": len(data.paths), "ratio": ratio,
            **target(ratio, "<=", 1.1), "chunks": len(parts),
            "timings": {"clean_features_mc_s": times["mc"], "clean_s": times["clean"], "mc_sampling_s": mc}}


def item_stress(b: Bench, csv: Path, model) -> dict:
    """4. The stress passes against 13 x a naive clean pass (PNG decode each time) and 13 x a
    clean pass on the store. The stress passes run in groups (the clean pass, then each
    corruption's three severities), each group followed by one naive and one cached pass; each
    group is compared with the passes next to it in time:
    ratio = sum of group times / sum of (passes in group x the naive pass after it)."""
    from dataclasses import replace

    from tools.corruptions import FAMILIES
    from tools.inference import Corrupt, clean_pass, corrupted_logits

    run, data, _ = b.split(csv, "films-warm")
    naive = replace(data, store=None)
    clean_pass(run, model, naive, desc="warm-up")
    for name in FAMILIES["default"]:  # first calls import albumentations and build its transforms
        for severity in (1, 2, 3):
            Corrupt(name, severity, b.opts.seed)(data.store[0], 0)
    groups = [(1, lambda: clean_pass(run, model, data, desc="clean"))]
    groups += [(3, lambda name=name: corrupted_logits(run, model, data, [name])) for name in FAMILIES["default"]]
    stress_s, naive_s, cached_s = [], [], []
    for _, group in groups:
        stress_s.append(timed(group, b.device)[1])
        naive_s.append(timed(lambda: clean_pass(run, model, naive, desc="naive"), b.device)[1])
        cached_s.append(timed(lambda: clean_pass(run, model, data, desc="cached"), b.device)[1])
    passes = [p for p, _ in groups]
    total = sum(stress_s)
    vs_naive = total / sum(p * t for p, t in zip(passes, naive_s))
    vs_cached = total / sum(p * t for p, t in zip(passes, cached_s))
    return {"name": f"stress {sum(passes)} passes vs {sum(passes)} x clean", "images": len(data.paths),
            "source": f"{b.opts.n_films} PNG films of {b.opts.film_size} px", "passes": sum(passes),
            "ratio": vs_naive, **target(vs_naive, "<=", 1.0), "ratio_vs_cached_clean": vs_cached,
            "timings": {"stress_s_per_group": stress_s, "passes_per_group": passes, "stress_total_s": total,
                        "naive_clean_s": naive_s, "cached_clean_s": cached_s}}


def item_valtool_passes(b: Bench, csv: Path, model) -> dict:
    """5. valtool in-process; passes of the model over the test split, counted."""
    from tools.corruptions import FAMILIES
    from tools.files import read_json, save_torch
    from tools.model import checkpoint_dict
    from tools.runtime import Run
    from tools.table import read_table, resolve_paths, select_split
    from tools.model_files import ModelRequest
    from tools.valtool import ValtoolOptions, run_valtool

    weights, out = b.tmp / "bench.pt", b.tmp / "valtool"
    save_torch(checkpoint_dict(model, LABELS, b.opts.image_size, 0.2, 0, None), weights)
    test_paths = resolve_paths(select_split(read_table(csv, LABELS), "test", csv), csv.parent)
    counts = {"split": 0, "other": 0}
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out, b.device, b.precision, b.opts.seed, cache_dir=b.tmp / "cache" / "valtool", command="valtool")
    opts = ValtoolOptions(model=ModelRequest(str(weights)), csv=str(csv), img_root=str(csv.parent), tta_samples=VALTOOL_TTA,
                          mc_samples=VALTOOL_MC, bootstrap=VALTOOL_BOOTSTRAP)
    captured = io.StringIO()
    with patched_predict(counting_predict(test_paths, counts)), \
            contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
        (_, seconds) = timed(lambda: run_valtool(run, opts), b.device)
    reported = read_json(out / "summary.json")["model_passes_over_split"]
    stress_passes = 1 + 3 * len(FAMILIES["default"])  # the clean pass and valtool's corruptions at 3 severities
    bound = stress_passes + VALTOOL_TTA + 1
    return {"name": "valtool passes over the test split", "images": len(test_paths),
            "counted": counts["split"], "other_passes": counts["other"], "summary_json": reported,
            "expected": stress_passes + VALTOOL_TTA, "ratio": counts["split"] / bound,
            **target(counts["split"], "<=", bound), "matches_summary": counts["split"] == reported,
            "flags": {"tta_samples": VALTOOL_TTA, "mc_samples": VALTOOL_MC, "bootstrap": VALTOOL_BOOTSTRAP},
            "timings": {"valtool_s": seconds}}


def read_all(store, times: int) -> None:
    for _ in range(times):
        for i in range(len(store)):
            store[i]


def item_film_io(b: Bench, csv: Path) -> dict:
    """6. Building the store from the films, reading it back, and decoding the PNGs plainly."""
    import pandas as pd

    from tools.cache import build_store
    from tools.dataset import letterbox, load_image
    from tools.runtime import default_workers

    paths = [str(csv.parent / p) for p in pd.read_csv(csv)["image_path"]]
    size, workers, reads = b.opts.image_size, default_workers(), 5
    stores = []

    def build():
        stores.append(build_store(paths, size, b.tmp / "cache" / f"films-build-{len(stores)}", workers,
                                  progress=False))

    def decode():
        for p in paths:
            letterbox(load_image(p), size)

    build()
    times = interleaved({"build": build, "read": lambda: read_all(stores[0], reads), "decode": decode},
                        b.opts.repeats, b.device)
    n = len(paths)
    rates = {"build_img_s": n / median(times["build"]), "read_img_s": n * reads / median(times["read"]),
             "decode_img_s": n / median(times["decode"])}
    return {"name": "film cache build / read / decode", "images": n, "film_size": b.opts.film_size,
            "build_workers": workers, **rates, "ratio": rates["read_img_s"] / rates["decode_img_s"],
            "target": "info", "met": None,
            "timings": {"build_s": times["build"], f"read_x{reads}_s": times["read"], "decode_s": times["decode"]}}


# ====== the analyses at scale ======

# ChestX-ray14 (Wang et al., CVPR 2017): 112,120 frontal films of 30,805 patients; films per finding.
CXR14_FINDINGS = {"Atelectasis": 11559, "Cardiomegaly": 2776, "Consolidation": 4667, "Edema": 2303,
                  "Effusion": 13317, "Emphysema": 2516, "Fibrosis": 1686, "Hernia": 227, "Infiltration": 19894,
                  "Mass": 5782, "Nodule": 6331, "Pleural_Thickening": 3385, "Pneumonia": 1431, "Pneumothorax": 5302}
CXR14_FILMS, CXR14_PATIENTS = 112_120, 30_805
SCALE_GROUP_COLS = ("view", "sex", "age")
SCALE_PARTS = ("eval", "calibrate", "selective")


def scale_table(rows: int, seed: int) -> dict:
    """A synthetic predictions table shaped like ChestX-ray14: ``rows`` films, patients drawn so a
    patient has about 3.7 of them, the 14 findings at their ChestX-ray14 prevalence, logits that
    separate positives from negatives (AUROC about 0.87), and the group columns view (PA/AP),
    sex and age (numeric, sliced into quartiles)."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    labels = list(CXR14_FINDINGS)
    prevalence = np.array([CXR14_FINDINGS[lbl] / CXR14_FILMS for lbl in labels])
    patient = rng.integers(0, max(1, round(rows * CXR14_PATIENTS / CXR14_FILMS)), rows)
    y = (rng.random((rows, len(labels))) < prevalence).astype(float)
    logits = np.log(prevalence / (1 - prevalence)) + 1.6 * (y - prevalence) + rng.normal(0, 1, y.shape)
    df = pd.DataFrame({"image_path": [f"images/{i:06d}.png" for i in range(rows)],
                       "patient_id": [f"p{i:05d}" for i in patient],
                       "view": np.where(rng.random(rows) < 0.4, "AP", "PA"),
                       "sex": np.where(rng.random(rows) < 0.56, "M", "F"), "age": rng.integers(1, 95, rows)})
    return {"labels": labels, "df": df, "y": y, "logits": logits, "probs": 1 / (1 + np.exp(-logits)),
            "clusters": df["patient_id"].to_numpy()}


class ScaleAnalyses:
    """The numbers eval, calibrate and selective compute from a predictions table (metrics,
    slices with gaps, calibration, risk-coverage, all with patient-bootstrap intervals), without
    their files and figures; one method per command. ``test``: the table analysed; ``calib``: the
    table the temperature is fitted on."""

    def __init__(self, test: dict, calib: dict, n_boot: int, seed: int):
        self.test, self.calib, self.n_boot, self.seed = test, calib, n_boot, seed

    def eval(self) -> dict:
        from tools.findings import slice_tests
        from tools.metrics import Ranked, metrics_with_ci
        from tools.slicing import group_metrics

        t = self.test
        ranked = Ranked(t["y"], t["probs"])
        out = {"metrics": metrics_with_ci(t["y"], t["probs"], t["labels"], t["clusters"], self.n_boot, self.seed, "test",
                                          ranked)}
        for col in SCALE_GROUP_COLS:
            out[col] = group_metrics(t["df"], t["y"], t["probs"], t["labels"], col, t["clusters"], 30, self.n_boot,
                                     self.seed, ranked)
            out[f"{col}_tests"] = slice_tests(out[col], t["labels"])
        return out

    def temperature(self):
        from tools.calibration import fit_temperature
        from tools.stages.calibrate import TemperatureFit

        c = self.calib
        return TemperatureFit(fit_temperature(c["logits"], c["y"]), "calib", c["logits"], c["y"], c["clusters"])

    def calibrate(self) -> dict:
        from tools.calibration import apply_temperature, calibration_report
        from tools.metrics import sigmoid
        from tools.splits import SplitData
        from tools.stages.calibrate import calibration_intervals

        t, fit = self.test, self.temperature()
        cal = sigmoid(apply_temperature(t["logits"], fit.temperature))
        before, after = calibration_report(t["probs"], t["y"], t["labels"]), calibration_report(cal, t["y"], t["labels"])
        data = SplitData("test", t["df"], [], t["y"], None)
        change = after["ece"] - before["ece"]
        return {"before": before, "after": after,
                **calibration_intervals(data, t["probs"], cal, t["labels"], fit, change, self.n_boot, self.seed)}

    def selective(self) -> dict:
        from tools.metrics import bootstrap_resamples
        from tools.selective import known_decisions, risk_coverage, same_ranking, selective_resamples, summary_of_curve
        from tools.stages.selective import confidence_signals, selective_intervals

        t = self.test
        resamples = bootstrap_resamples(t["clusters"], self.n_boot, self.seed)
        rows = np.nonzero(~np.isnan(t["y"]))[0]
        summaries, boot, ranked = {}, {}, {}
        for name, confidence in confidence_signals(t["logits"], self.temperature().temperature).items():
            conf, correct = known_decisions(confidence, t["probs"], t["y"])
            summaries[name] = summary_of_curve(risk_coverage(conf, correct), correct)
            twin = next((other for other, c in ranked.items() if same_ranking(c, conf)), None)
            boot[name] = boot[twin] if twin else selective_resamples(conf, correct, rows, resamples)
            ranked[name] = conf
            summaries[name]["per_label"] = {
                lbl: summary_of_curve(risk_coverage(*known_decisions(confidence[:, j], t["probs"][:, j], t["y"][:, j])),
                                      known_decisions(confidence[:, j], t["probs"][:, j], t["y"][:, j])[1])
                for j, lbl in enumerate(t["labels"])}
        return {"signals": summaries, "comparisons": selective_intervals(summaries, boot)}


def sklearn_reference(y, p, w) -> list[float]:
    """AUROC, AUPRC, F1@0.5, sens@95spec, sens@0.5 and spec@0.5 of one label with scikit-learn,
    rows weighted by ``w`` (rows of weight 0 left out, NaN labels masked)."""
    from sklearn.metrics import average_precision_score, f1_score, recall_score, roc_auc_score, roc_curve

    keep = ~np.isnan(y) & (w > 0)
    y, p, w = y[keep], p[keep], w[keep]
    f1 = float(f1_score(y, p >= 0.5, sample_weight=w, zero_division=np.nan)) if len(y) else float("nan")
    if len(np.unique(y)) < 2:
        return [np.nan, np.nan, f1, np.nan, np.nan, np.nan]
    fpr, tpr, _ = roc_curve(y, p, sample_weight=w, drop_intermediate=False)
    return [roc_auc_score(y, p, sample_weight=w), average_precision_score(y, p, sample_weight=w), f1,
            float(tpr[fpr <= 0.05 + 1e-12].max()), recall_score(y, p >= 0.5, sample_weight=w),
            recall_score(1 - y, p < 0.5, sample_weight=w)]


class ReferenceLoop:
    """The same numbers as :class:`ScaleAnalyses`, one resample at a time: scikit-learn with row
    weights for AUROC, AUPRC, F1, the sensitivities and the specificity (every label, the micro
    average, every group and every rest), the suite's unweighted ECE, NLL, Brier, temperature fit
    and risk-coverage summary on the resample's rows repeated by their multiplicity. Each method
    returns, per resample, the values that the suite's resamples can be checked against."""

    def __init__(self, test: dict, calib: dict, weights: np.ndarray, calib_weights: np.ndarray):
        self.test, self.calib, self.weights, self.calib_weights = test, calib, weights, calib_weights

    def _metrics(self, y, p, w, micro=True) -> list[float]:
        out = [v for j in range(y.shape[1]) for v in sklearn_reference(y[:, j], p[:, j], w)]
        if micro:
            rows, cols = np.nonzero(~np.isnan(y))
            out += sklearn_reference(y[rows, cols], p[rows, cols], w[rows])
        return out

    def eval(self) -> list:
        from tools.slicing import group_values

        t, out = self.test, []
        for w in self.weights:
            values = self._metrics(t["y"], t["probs"], w)
            out.append(values)
            for col in SCALE_GROUP_COLS:
                groups, _ = group_values(t["df"][col])
                for value in np.unique(groups):
                    m = groups == value
                    self._metrics(t["y"][m], t["probs"][m], w[m])
                    self._metrics(t["y"][~m], t["probs"][~m], w[~m], micro=False)
        return out

    def calibrate(self) -> list:
        from tools.calibration import apply_temperature, ece, fit_temperature, nll
        from tools.calibration import brier as brier_score
        from tools.metrics import sigmoid

        t, c, out = self.test, self.calib, []
        temperature = fit_temperature(c["logits"], c["y"])
        cal = sigmoid(apply_temperature(t["logits"], temperature))
        for w, wc in zip(self.weights, self.calib_weights):
            rows = np.repeat(np.arange(len(w)), w.astype(int))
            out.append([f(p[rows], t["y"][rows]) for p in (t["probs"], cal) for f in (ece, nll, brier_score)])
            fit_rows = np.repeat(np.arange(len(wc)), wc.astype(int))
            fit_temperature(c["logits"][fit_rows], c["y"][fit_rows])
        return out

    def selective(self) -> list:
        from tools.calibration import fit_temperature
        from tools.selective import known_decisions, selective_summary
        from tools.stages.selective import confidence_signals

        t, out = self.test, []
        signals = confidence_signals(t["logits"], fit_temperature(self.calib["logits"], self.calib["y"]))
        decisions = {name: known_decisions(conf, t["probs"], t["y"]) for name, conf in signals.items()}
        rows = np.nonzero(~np.isnan(t["y"]))[0]
        for w in self.weights:
            values = []
            for conf, correct in decisions.values():
                keep = np.repeat(np.arange(len(rows)), w[rows].astype(int))
                s = selective_summary(conf[keep], correct[keep])
                values += [s["aurc"], s["e_aurc"]]
            out.append(values)
        return out


def suite_resample_values(test: dict, calib: dict, resamples) -> dict:
    """The suite's values on ``resamples`` for the numbers :class:`ReferenceLoop` returns: the
    whole table's metrics (per label, then micro), ECE/NLL/Brier before and after temperature
    scaling, AURC and E-AURC per signal; each (resamples, values)."""
    from tools.calibration import apply_temperature, calibration_resamples, fit_temperature
    from tools.metrics import METRICS, scores, sigmoid
    from tools.selective import known_decisions, selective_resamples
    from tools.stages.selective import confidence_signals

    boot = scores(test["y"], test["probs"], resamples)["boot"]
    blocks = [*boot["per_class"], boot["micro"]]
    temperature = fit_temperature(calib["logits"], calib["y"])
    cal = sigmoid(apply_temperature(test["logits"], temperature))
    calibration = [calibration_resamples(p, test["y"], resamples) for p in (test["probs"], cal)]
    rows = np.nonzero(~np.isnan(test["y"]))[0]
    selective = []
    for conf in confidence_signals(test["logits"], temperature).values():
        s = selective_resamples(*known_decisions(conf, test["probs"], test["y"]), rows, resamples)
        selective += [s["aurc"], s["e_aurc"]]
    return {"eval": np.column_stack([b[m] for b in blocks for m in METRICS]),
            "calibrate": np.column_stack([c[k] for c in calibration for k in ("ece", "nll", "brier")]),
            "selective": np.column_stack(selective)}


def write_stages(tmp: Path, test: dict, calib: dict, n_boot: int, seed: int) -> dict:
    """Seconds (wall) of the eval, calibrate and selective stages writing their files and figures
    from the predictions, as the commands do after reading the CSV."""
    from tools.metrics import sigmoid
    from tools.runtime import Run
    from tools.splits import SplitData
    from tools.stages.calibrate import write_calibration
    from tools.stages.evaluate import write_evaluation
    from tools.stages.selective import confidence_signals, write_selective

    data = SplitData("test", test["df"], list(test["df"]["image_path"]), test["y"], None)
    run = Run(tmp / "stages", seed=seed)
    fit = ScaleAnalyses(test, calib, n_boot, seed).temperature()
    steps = {"eval": lambda: write_evaluation(run.stage("eval"), data, test["logits"], test["labels"], SCALE_GROUP_COLS,
                                              30, n_boot),
             "calibrate": lambda: write_calibration(run.stage("calibrate"), data, test["logits"], test["labels"], fit,
                                                    None, None, None, n_boot),
             "selective": lambda: write_selective(run.stage("selective"), data, sigmoid(test["logits"]), test["labels"],
                                                  confidence_signals(test["logits"], fit.temperature), "maxprob", n_boot)}
    seconds = {}
    with contextlib.redirect_stdout(io.StringIO()):
        for name, step in steps.items():
            seconds[name] = timed(step, torch.device("cpu"))[1]
    return seconds


def item_analyses(b: Bench) -> dict:
    """7. The analyses of eval, calibrate and selective on a ChestX-ray14-sized predictions table
    (``--scale-rows`` x 14 labels, 3 group columns, ``--scale-resamples`` patient resamples) against
    a per-resample scikit-learn loop over ``--reference-resamples`` of the same resamples,
    extrapolated to all of them. Interleaved command by command (the suite's, then the loop's);
    the kept bootstrap draws are dropped first, so one draw per split is counted, as in one
    valtool run. Sanity: the suite's values on the loop's resamples against the loop's. Then the
    three stages writing their files from the same table (draws dropped again)."""
    from tools.metrics import bootstrap_resamples, forget_draws

    n_boot, n_ref, seed = b.opts.scale_resamples, b.opts.reference_resamples, b.opts.seed
    small, small_calib = scale_table(400, seed + 2), scale_table(100, seed + 3)
    warm_loop = ReferenceLoop(small, small_calib, bootstrap_resamples(small["clusters"], 1, seed).weights(),
                              bootstrap_resamples(small_calib["clusters"], 1, seed).weights())
    for part in SCALE_PARTS:  # warm-up (not counted): imports and first calls
        getattr(ScaleAnalyses(small, small_calib, 20, seed), part)()
        getattr(warm_loop, part)()
    test, calib = scale_table(b.opts.scale_rows, seed), scale_table(max(100, b.opts.scale_rows // 10), seed + 1)
    suite = ScaleAnalyses(test, calib, n_boot, seed)
    res = bootstrap_resamples(test["clusters"], n_boot, seed)
    first = res.head(n_ref)
    calib_first = bootstrap_resamples(calib["clusters"], n_boot, seed + 1).head(n_ref)
    loop = ReferenceLoop(test, calib, first.weights(), calib_first.weights())
    forget_draws()
    wall, cpu, ref, ref_values = {}, {}, {}, {}
    for part in SCALE_PARTS:
        start_cpu = time.process_time()
        wall[part] = timed(getattr(suite, part), b.device)[1]
        cpu[part] = time.process_time() - start_cpu
        ref_values[part], ref[part] = timed(getattr(loop, part), b.device)
    checked = suite_resample_values(test, calib, first)
    diff = {part: float(np.nanmax(np.abs(checked[part] - np.asarray(ref_values[part], float)), initial=0.0))
            for part in SCALE_PARTS}
    nan_agree = all(np.array_equal(np.isnan(checked[p]), np.isnan(np.asarray(ref_values[p], float))) for p in SCALE_PARTS)
    suite_s = sum(wall.values())
    reference_s = sum(ref.values()) * n_boot / n_ref
    forget_draws()
    files = write_stages(b.tmp, test, calib, n_boot, seed)
    return {"name": "analyses at scale vs per-resample scikit-learn loop", "rows": len(test["y"]),
            "labels": len(test["labels"]), "patients": int(len(np.unique(test["clusters"]))),
            "group_cols": list(SCALE_GROUP_COLS), "resamples": n_boot, "reference_resamples": n_ref,
            "suite_s": suite_s, "reference_s_extrapolated": reference_s, "ratio": reference_s / suite_s,
            "target": "<= 60 s (suite)", "met": bool(suite_s <= 60.0),
            "suite_cpu_s": sum(cpu.values()), "stages_with_files_s": sum(files.values()),
            "sanity": {"max_abs_diff": diff, "undefined_agree": nan_agree,
                       "note": "suite's resampled values against the loop's on the same resamples"},
            "timings": {**{f"suite_{k}_s": v for k, v in wall.items()}, **{f"suite_{k}_cpu_s": v for k, v in cpu.items()},
                        **{f"reference_{k}_s_per_resample": v / n_ref for k, v in ref.items()},
                        **{f"stage_{k}_with_files_s": v for k, v in files.items()}}}


# ====== other CPU runtimes ======

BACKEND_MARGIN = 1.3       # a runtime is worth adopting only when it is at least this much faster
BACKEND_TOLERANCE = 1e-4   # ... and its logits stay within this of eager fp32 (absolute)


def onnx_session(model: torch.nn.Module, example: torch.Tensor, path: Path):
    """An ONNX Runtime CPU session of ``model`` exported to ``path`` (batch size dynamic), or the
    reason there is none (onnxruntime or onnx not installed)."""
    import warnings

    try:
        import onnx  # noqa: F401 - the exporter writes through it
        import onnxruntime
    except ImportError as exc:
        return None, f"{exc.name} is not installed (pip install -r requirements-bench.txt to measure ONNX Runtime)"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        # the TorchScript-based exporter: it needs only the onnx package, not onnxscript
        torch.onnx.export(model, (example,), str(path), input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    # ONNX Runtime's threads otherwise busy-wait after each run, taking the cores from whatever
    # runs next (here: the eager side of the comparison)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]), None


def item_backends(b: Bench) -> dict:
    """8. fp32 CPU inference of DenseNet-121 through other runtimes against PyTorch eager as the
    suite runs it (channels_last, inference_mode), one batch of the suite's inference size at
    ``--image-size``, interleaved batch by batch: ``torch.compile`` (inductor, the model's
    features, as ``--compile`` does) and ONNX Runtime (the model exported with
    ``torch.onnx.export``; only where onnxruntime is installed). Per runtime: images/s, the ratio
    against eager, the largest logit difference, its one-off warm-up (export or compilation), and
    whether it meets the adoption rule (``BACKEND_MARGIN`` faster and within ``BACKEND_TOLERANCE``)."""
    from tools.model import prepare_model
    from tools.runtime import Run

    batch = Run(b.tmp / "out", b.device, "fp32", b.opts.seed).inference_batch
    torch.manual_seed(b.opts.seed)
    x = torch.randn(batch, 3, b.opts.image_size, b.opts.image_size)
    base = bench_model(b.opts.seed)
    eager = prepare_model(copy.deepcopy(base), b.device)
    x_last = x.contiguous(memory_format=torch.channels_last)

    def run_eager():
        with torch.inference_mode():
            return eager(x_last).float().numpy()

    reference = run_eager()
    sides, results, warm_s = {"eager": run_eager}, {}, {}
    if b.opts.compile_backend:
        compiled = prepare_model(copy.deepcopy(base), b.device)
        compiled.features = torch.compile(compiled.features)

        def run_compiled():
            with torch.inference_mode():
                return compiled(x_last).float().numpy()

        results["torch.compile"], warm_s["torch.compile"] = timed(run_compiled, b.device)
        sides["torch.compile"] = run_compiled
    else:
        results["torch.compile"] = "not measured (--no-compile-backend)"
    start = time.perf_counter()
    session, why_not = onnx_session(base, x, b.tmp / "densenet121.onnx")
    if session is None:
        results["onnxruntime"] = why_not
    else:
        x_np = x.numpy()
        sides["onnxruntime"] = lambda: session.run(None, {"x": x_np})[0]
        results["onnxruntime"] = sides["onnxruntime"]()
        warm_s["onnxruntime"] = time.perf_counter() - start
    times = interleaved(sides, max(b.opts.repeats, 3), b.device)
    backends = {}
    for name, out in results.items():
        if isinstance(out, str):
            backends[name] = {"measured": False, "note": out}
            continue
        ratio = paired_ratio(times["eager"], times[name])
        diff = float(np.abs(out - reference).max())
        backends[name] = {"measured": True, "img_s": batch / median(times[name]), "ratio_vs_eager": ratio,
                          "max_abs_logit_diff": diff, "warm_up_s": warm_s[name],
                          "adopt": bool(ratio >= BACKEND_MARGIN and diff <= BACKEND_TOLERANCE)}
    measured = [v["ratio_vs_eager"] for v in backends.values() if v["measured"]]
    best = max(measured, default=1.0)
    return {"name": "fp32 CPU runtimes vs PyTorch eager", "batch": batch, "image_size": b.opts.image_size,
            "eager_img_s": batch / median(times["eager"]), "backends": backends, "ratio": best,
            "target": f">= {BACKEND_MARGIN:g} to adopt, |dlogit| <= {BACKEND_TOLERANCE:g}",
            "met": any(v.get("adopt") for v in backends.values()),
            "timings": {f"{k}_s": v for k, v in times.items()}}


# ====== the GPU mode ======

def gpu_bench(b: Bench, csv: Path) -> dict:
    """Eval images/s at batch 256, bf16 + channels_last, eager and with torch.compile, and the
    warm-cache data-wait fraction. The compiled module is ``model.features``, as
    ``prepare_model(compile=True)`` does: ``backbone_features`` unwraps a compiled whole model and
    would run it eagerly. Eager and compiled passes alternate by swapping ``model.features``."""
    from tools.inference import clean_pass
    from tools.model import prepare_model

    run, data, _ = b.split(csv, "gpu", batch_size=GPU_BATCH)
    model = prepare_model(bench_model(b.opts.seed), b.device)
    eager = model.features
    clean_pass(run, model, data, desc="warm-up")
    n = len(data.paths)
    result = {"name": "gpu eval", "images": n, "batch": GPU_BATCH, "precision": b.precision,
              "loader_workers": run.pass_workers}
    try:
        model.features = torch.compile(eager)
        for _ in range(2):  # compiles for the full and the last, smaller batch
            clean_pass(run, model, data, desc="compile warm-up")
    except Exception as exc:  # noqa: BLE001 - report why compile failed and keep the eager numbers
        result["compile_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    compiled = model.features
    sides = {"eager": lambda: clean_pass(run, model, data, desc="eager")}
    if "compile_error" not in result:
        def compiled_pass():
            model.features = compiled
            try:
                clean_pass(run, model, data, desc="compiled")
            finally:
                model.features = eager
        sides["compiled"] = compiled_pass
    model.features = eager
    times = interleaved(sides, b.opts.repeats, b.device)
    result.update({f"{k}_img_s": n / median(v) for k, v in times.items()})
    if "compiled" in times:
        result["compile_speedup"] = result["compiled_img_s"] / result["eager_img_s"]
    waits = [data_wait(b, csv, model, "gpu", GPU_BATCH) for _ in range(b.opts.repeats)]
    warm = median(w["fraction"] for w in waits)
    result.update(warm_wait_fraction=warm, ratio=warm,
                  warm_wait_fraction_after_first_batch=median(
                      (w["loader_wait_s"] - w["first_batch_wait_s"]) / w["model_s"] for w in waits),
                  **target(warm, "<=", 0.10),
                  timings={**{f"{k}_s": v for k, v in times.items()},
                           "warm_model_s": [w["model_s"] for w in waits],
                           "warm_loader_wait_s": [w["loader_wait_s"] for w in waits]})
    return result


# ====== the table ======

def table_rows(items: dict) -> list[list]:
    """One printed row per measured ratio: item, what, A, B, ratio, target, met."""
    failed = [[key, f"failed: {item['error']}", "", "", "", "", False]
              for key, item in items.items() if "error" in item]
    items = {key: item for key, item in items.items() if "error" not in item}
    rows = []
    p = items.get("predict")
    if p:
        s = p["sanity"]
        rows.append(["1", f"predict ({p['precision']}, cached) vs plain fp32 loop, {p['image_size']} px",
                     f"{p['predict_img_s']:.2f} img/s", f"{p['plain_img_s']:.2f} img/s", f"{p['ratio']:.2f}x",
                     p["target"] + "x", p["met"]])
        if "ratio_at_plain_batch" in p:
            rows.append(["1b", f"same, the suite at --batch-size {p['plain'].rsplit(' ', 1)[1]}",
                         f"{p['predict_at_plain_batch_img_s']:.2f} img/s", f"{p['plain_img_s']:.2f} img/s",
                         f"{p['ratio_at_plain_batch']:.2f}x", "", None])
        for precision, at in p.get("precisions", {}).items():
            if at["supported"]:
                rows.append([f"1 {precision}", f"predict at {precision} vs plain fp32 loop", f"{at['img_s']:.2f} img/s",
                             f"{p['plain_img_s']:.2f} img/s", f"{at['ratio_vs_plain_fp32']:.2f}x", "", None])
            else:
                rows.append([f"1 {precision}", f"predict at {precision}: {at['note']}", "", "", "", "", None])
        rows.append(["1c", "sanity: suite vs fp32 logits", f"max |dlogit| {s['max_abs_logit_diff']:.3g}",
                     f"AUROC {s['macro_auroc_suite']:.3f} vs {s['macro_auroc_plain_fp32']:.3f}",
                     f"agree {s['decisions_agree']:.3f}", "", None])
    d = items.get("data_wait")
    if d:
        rows.append(["2", "data wait / model time, warm cache", "", "", f"{d['warm_fraction']:.1%}",
                     "<= 10%", d["met"]])
        rows.append(["2b", "data wait / model time, cold cache (store built)", "", "", f"{d['cold_fraction']:.1%}",
                     "", None])
    m = items.get("mc_dropout")
    if m:
        rows.append(["3", f"clean+MC-Dropout x{MC_SAMPLES} vs clean", f"{median(m['timings']['clean_features_mc_s']):.2f} s",
                     f"{median(m['timings']['clean_s']):.2f} s", f"{m['ratio']:.3f}x", m["target"] + "x", m["met"]])
    st = items.get("stress")
    if st:
        t = st["timings"]
        rows.append(["4", f"stress {st['passes']} passes vs {st['passes']} x naive clean (PNG decode)",
                     f"{t['stress_total_s']:.1f} s", f"{t['stress_total_s'] / st['ratio']:.1f} s",
                     f"{st['ratio']:.3f}x", st["target"] + "x", st["met"]])
        rows.append(["4b", f"stress vs {st['passes']} x cached clean (cost of corrupting)",
                     f"{t['stress_total_s']:.1f} s", f"{t['stress_total_s'] / st['ratio_vs_cached_clean']:.1f} s",
                     f"{st['ratio_vs_cached_clean']:.3f}x", "", None])
    v = items.get("valtool_passes")
    if v:
        rows.append(["5", "valtool passes over test split (counted / summary.json)",
                     f"{v['counted']} / {v['summary_json']}", f"expected {v['expected']}", "",
                     v["target"], v["met"] and v["matches_summary"]])
    f = items.get("film_io")
    if f:
        rows.append(["6", f"{f['film_size']} px films: cache build / plain decode", f"{f['build_img_s']:.1f} img/s",
                     f"{f['decode_img_s']:.1f} img/s", f"{f['build_img_s'] / f['decode_img_s']:.2f}x", "", None])
        rows.append(["6b", "cached read / plain decode", f"{f['read_img_s']:.0f} img/s",
                     f"{f['decode_img_s']:.1f} img/s", f"{f['ratio']:.0f}x", "", None])
    a = items.get("analyses")
    if a:
        t = a["timings"]
        rows.append(["7", f"analyses {a['rows']:,} x {a['labels']}, {len(a['group_cols'])} group cols, {a['resamples']} "
                          f"resamples vs sklearn loop ({a['reference_resamples']} resamples x"
                          f"{a['resamples'] / a['reference_resamples']:g})",
                     f"{a['suite_s']:.1f} s", f"{a['reference_s_extrapolated']:.0f} s", f"{a['ratio']:.0f}x",
                     a["target"], a["met"]])
        rows.append(["7b", "suite, s per command: eval / calibrate / selective; CPU s",
                     " / ".join(f"{t[f'suite_{k}_s']:.1f}" for k in SCALE_PARTS),
                     f"CPU {a['suite_cpu_s']:.1f} s", "", "", None])
        worst = max(a["sanity"]["max_abs_diff"].values())
        rows.append(["7c", "sanity: suite vs loop on the loop's resamples", f"max |diff| {worst:.2g}",
                     f"undefined agree: {a['sanity']['undefined_agree']}", "", "", None])
        rows.append(["7d", "the three stages writing their files and figures, s",
                     " / ".join(f"{t[f'stage_{k}_with_files_s']:.1f}" for k in SCALE_PARTS),
                     f"{a['stages_with_files_s']:.1f} s", "", "", None])
    bk = items.get("backends")
    if bk:
        rows.append(["8", f"fp32 CPU, batch {bk['batch']} at {bk['image_size']} px: PyTorch eager (the suite)",
                     f"{bk['eager_img_s']:.1f} img/s", "", "", "", None])
        for name, v in bk["backends"].items():
            if not v["measured"]:
                rows.append(["8", f"{name}: {v['note']}", "", "", "", "", None])
                continue
            rows.append(["8", f"{name} vs eager (max |dlogit| {v['max_abs_logit_diff']:.1g}, warm-up {v['warm_up_s']:.0f} s)",
                         f"{v['img_s']:.1f} img/s", f"{bk['eager_img_s']:.1f} img/s", f"{v['ratio_vs_eager']:.2f}x",
                         f">= {BACKEND_MARGIN:g}x to adopt", v["adopt"]])
    g = items.get("gpu")
    if g:
        rows.append(["G", f"eval batch {g['batch']} {g['precision']}+channels_last, eager", f"{g['eager_img_s']:.0f} img/s",
                     "", "", "", None])
        if "compiled_img_s" in g:
            rows.append(["G", "with torch.compile (features)", f"{g['compiled_img_s']:.0f} img/s", "",
                         f"{g['compile_speedup']:.2f}x", "", None])
        rows.append(["G", "data wait / model time, warm cache", "", "", f"{g['warm_wait_fraction']:.1%}",
                     "<= 10%", g["met"]])
    return [[*r[:-1], "" if r[-1] is None else ("yes" if r[-1] else "NO")] for r in rows + failed]


def format_table(items: dict) -> str:
    from tabulate import tabulate

    return tabulate(table_rows(items), headers=["#", "measurement", "A", "B", "ratio", "target", "met"])


# ====== the command ======

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    size = parser.add_argument_group("sizes (defaults: full run; --quick and --gpu choose their own)")
    size.add_argument("--n-images", type=int, default=None, help=f"demo phantoms (full {FULL['n_images']})")
    size.add_argument("--image-size", type=int, default=None, help=f"model input px (full {FULL['image_size']})")
    size.add_argument("--n-films", type=int, default=None, help=f"PNG films for items 2, 4, 6 (full {FULL['n_films']})")
    size.add_argument("--film-size", type=int, default=None, help=f"film side in px (full {FULL['film_size']})")
    size.add_argument("--repeats", type=int, default=None, help=f"timed repeats per side (full {FULL['repeats']})")
    scale = parser.add_argument_group("analyses at scale (item 7)")
    scale.add_argument("--analyses", action="store_true",
                       help="run only item 7: eval, calibrate and selective on a ChestX-ray14-sized predictions table")
    scale.add_argument("--scale-rows", type=int, default=None, help=f"films of the table (full {SCALE['scale_rows']})")
    scale.add_argument("--scale-resamples", type=int, default=None,
                       help=f"patient resamples of the analyses (full {SCALE['scale_resamples']})")
    scale.add_argument("--reference-resamples", type=int, default=None,
                       help=f"resamples the per-resample scikit-learn loop runs, extrapolated to all "
                            f"(full {SCALE['reference_resamples']})")
    runtimes = parser.add_argument_group("other CPU runtimes (item 8)")
    runtimes.add_argument("--backends", action="store_true",
                          help="run only item 8: fp32 CPU inference through torch.compile and ONNX Runtime vs eager")
    runtimes.add_argument("--no-compile-backend", dest="compile_backend", action="store_false",
                          help="item 8 without torch.compile (its compilation takes a minute or more on a CPU)")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size of the plain loop (item 1)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of about a minute")
    parser.add_argument("--gpu", action="store_true",
                        help="CUDA only: eval img/s at batch 256 with/without torch.compile, warm data wait")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/bench/bench.json", help="where the JSON goes")
    return parser


def resolve_options(opts) -> argparse.Namespace:
    """Fill sizes from the mode's defaults and check them."""
    defaults = GPU if opts.gpu else QUICK if opts.quick else FULL
    for key, value in defaults.items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)
    for flag, value, low in (("--n-images", opts.n_images, 8), ("--image-size", opts.image_size, 32),
                             ("--repeats", opts.repeats, 1), ("--batch-size", opts.batch_size, 1),
                             ("--film-size", opts.film_size, 32), ("--scale-rows", opts.scale_rows, 100),
                             ("--scale-resamples", opts.scale_resamples, 10),
                             ("--reference-resamples", opts.reference_resamples, 1)):
        if value < low:
            raise UserError(f"{flag} {value}: must be at least {low}")
    if not opts.gpu and opts.n_films < 1:
        raise UserError(f"--n-films {opts.n_films}: must be at least 1")
    if opts.reference_resamples > opts.scale_resamples:
        raise UserError(f"--reference-resamples {opts.reference_resamples}: at most --scale-resamples "
                        f"({opts.scale_resamples})")
    if opts.gpu and opts.backends:
        raise UserError("--backends measures CPU runtimes: run it without --gpu")
    if opts.gpu and not opts.analyses and not torch.cuda.is_available():
        raise UserError("--gpu: no CUDA device is available here; run `python -m tools.bench` without --gpu "
                        "for the CPU measurements, or run --gpu on a GPU machine")
    return opts


def run_item(step) -> dict:
    """The item's result, or ``{"error": ...}`` with the traceback on stderr, so one failing item
    does not throw away the others' minutes of measurements."""
    import traceback

    try:
        return step()
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - recorded in the JSON and the exit status
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}".splitlines()[0], "ratio": None, "met": None}


def run_bench(opts, tmp: Path, out: Path) -> dict:
    """Make the images, run every item, return the JSON document. The document is also written
    to ``out`` after each item (``"complete": false``), so a run that is stopped keeps the items
    already measured."""
    from tools.files import write_json

    from tools.runtime import resolve_device, resolve_precision
    from tools.make_demo_data import make_demo_dataset

    device = resolve_device("cuda" if opts.gpu and not (opts.analyses or opts.backends) else "cpu")
    bench = Bench(opts, tmp, device, resolve_precision("auto", device))
    doc = {"machine": machine_info(device, bench.precision), "options": vars(opts), "items": {}}
    with OtherLoad() as idle:  # one quiet second: is anything else running?
        time.sleep(1.0)
    doc["machine"]["other_jobs_cpu_share_at_start"] = idle.fraction
    workers = (os.cpu_count() or 1) if opts.gpu else 1
    steps = [("analyses", lambda: item_analyses(bench))] if opts.analyses else None
    if opts.backends:
        steps = [("backends", lambda: item_backends(bench))]
    if steps is None:
        demo_csv = Path(make_demo_dataset(tmp / "demo", n=opts.n_images, seed=opts.seed, size=256, workers=workers))
        steps = [("gpu", lambda: gpu_bench(bench, demo_csv))] if opts.gpu else None
    if steps is None:
        films_csv = make_films(demo_csv, tmp / "films", opts.n_films, opts.film_size)
        state = {}

        def predict_item():
            result, state["model"] = item_predict(bench, demo_csv)
            return result

        steps = [("predict", predict_item),
                 ("data_wait", lambda: item_data_wait(bench, films_csv, state["model"])),
                 ("mc_dropout", lambda: item_mc_dropout(bench, demo_csv, state["model"])),
                 ("stress", lambda: item_stress(bench, films_csv, state["model"])),
                 ("film_io", lambda: item_film_io(bench, films_csv)),
                 # last: valtool's case studies start OpenCV's thread pool in this process, after
                 # which a forked loader worker hangs in worker_init (see make_films)
                 ("valtool_passes", lambda: item_valtool_passes(bench, demo_csv, state["model"])),
                 ("analyses", lambda: item_analyses(bench))]
    for key, step in steps:
        start = time.perf_counter()
        with OtherLoad() as load:
            item = run_item(step)
        item.update(item_wall_s=time.perf_counter() - start, other_jobs_cpu_share=load.fraction)
        doc["items"][key] = item
        write_json(out, {**doc, "complete": False})
        said = f"FAILED: {item['error']}" if "error" in item else f"ratio {item['ratio']:.3g} ({item['target']})"
        print(f"[bench] {key}: {said} in {item['item_wall_s']:.0f} s", flush=True)
    doc["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    doc["warning"] = busy_warning(doc["items"], doc["machine"]["other_jobs_cpu_share_at_start"])
    doc["complete"] = True
    return doc


def stop_on_sigterm() -> None:
    """SIGTERM raises KeyboardInterrupt, so the temporary images are removed on the way out."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    with contextlib.suppress(ValueError):  # only the main thread may set handlers
        signal.signal(signal.SIGTERM, handler)


def main(argv=None) -> int:
    from tools.files import write_json

    try:
        opts = resolve_options(build_parser().parse_args(argv))
        out = Path(opts.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="cxr-bench-") as tmp:
            doc = run_bench(opts, Path(tmp), out)
    except UserError as exc:
        print(f"python -m tools.bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"python -m tools.bench: stopped; the items measured so far are in {opts.out}", file=sys.stderr)
        return 130
    doc["wall_s"] = time.perf_counter() - start
    write_json(out, doc)
    m = doc["machine"]
    print(f"\n{m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
          f"{m['device']}, {m['precision']}; {doc['wall_s']:.0f} s")
    print(format_table(doc["items"]))
    failed = [k for k, v in doc["items"].items() if "error" in v]
    if doc["warning"]:
        print(f"warning: {doc['warning']}")
    print(f"-> {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    stop_on_sigterm()
    sys.exit(main())
