"""What every subcommand does first: set up the run, load the model, load a split's rows and
pixels, and the one clean pass whose logits the later stages reuse."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tools import distributed
from tools.cache import build_store, default_cache_dir
from tools.data import CXRDataset, check_images_exist, label_matrix, read_table, resolve_paths, select_split
from tools.engine import (default_workers, make_loader, predict, prepare_model, resolve_device,
                          resolve_precision, seed_everything)
from tools.errors import UserError
from tools.io import prepare_outdir, write_config
from tools.model import load_model

log = logging.getLogger("cxr")

# Inference batch per process. On the CPU 16 is faster than 64 (tools.bench --batch-size 64 on a
# 2-core EPYC, bf16, 224 px: 49.5 against 37.7 img/s); a GPU wants larger batches to stay busy.
INFERENCE_BATCH = {"cpu": 16, "cuda": 64}


@dataclass
class Run:
    args: object
    outdir: Path
    device: torch.device
    precision: str
    skipped: dict = field(default_factory=dict)
    facts: dict = field(default_factory=dict)  # learned during the run, kept in every config.json

    @property
    def workers(self) -> int:
        return default_workers() if self.args.num_workers is None else self.args.num_workers

    @property
    def pass_workers(self) -> int:
        """Loader processes for passes over decoded pixels: reading them costs microseconds and a
        corruption well under a millisecond, so the CPU needs none (workers would only compete
        with the model for cores); a GPU consumes images fast enough to want them."""
        if self.args.num_workers is not None:
            return self.args.num_workers
        return default_workers() if self.device.type == "cuda" else 0

    @property
    def batch_size(self) -> int:
        return self.args.batch_size or INFERENCE_BATCH.get(self.device.type, INFERENCE_BATCH["cpu"])

    def config(self, **facts) -> None:
        """Write ``config.json`` (rank 0); called first, and again when facts are learned (each
        rewrite keeps the facts of the earlier ones)."""
        self.facts.update(facts)
        if distributed.is_main():
            write_config(self.outdir, self.args, device=str(self.device), precision=self.precision,
                         seed=self.args.seed, world_size=distributed.world_size(),
                         skipped_images=self.skipped, **self.facts)


def start_run(args) -> Run:
    """Output folder, seed, device (one per torchrun rank), precision, and config.json first."""
    if getattr(args, "image_size", None) is not None and args.image_size < 32:
        raise UserError(f"--image-size {args.image_size}: must be at least 32 (DenseNet-121 downsamples 32x)")
    prepare_outdir(args.outdir)  # every rank: each may write there, and mkdir races are harmless
    device = resolve_device(distributed.init(args.device))
    seed_everything(args.seed)
    run = Run(args, Path(args.outdir), device, resolve_precision(getattr(args, "precision", "fp32"), device))
    distributed.barrier()
    run.config()
    return run


def load_checkpoint_model(run: Run):
    """Model from ``--weights`` on the run's device; fills ``args.labels``/``args.image_size``
    from the checkpoint when they were omitted (a mismatch is an error)."""
    args = run.args
    if not args.weights:
        raise UserError(f"--weights is required for {args.command}: pass a best.pt written by train")
    model, ckpt = load_model(args.weights, args.labels, args.image_size)
    args.labels = list(ckpt["labels"])
    args.image_size = int(ckpt["image_size"])
    run.config(checkpoint={k: ckpt.get(k) for k in ("labels", "image_size", "arch", "dropout", "epoch",
                                                    "val_macro_auroc")})
    return prepare_model(model, run.device, compile=getattr(args, "compile", False)), ckpt


@dataclass
class SplitData:
    """One split's rows (table order), image paths, labels (NaN unknown) and decoded pixels."""
    name: str | None
    df: pd.DataFrame
    paths: list
    y: np.ndarray
    store: object

    def dataset(self, image_size: int, transform=None) -> CXRDataset:
        return CXRDataset(self.paths, self.y, image_size, transform=transform, source=self.store)

    def subset(self, keep) -> SplitData:
        """Rows ``keep`` (positions, in order), renumbered from 0; their pixels are shared, not
        decoded again."""
        keep = np.asarray(keep)
        return SplitData(self.name, self.df.iloc[keep].reset_index(drop=True), [self.paths[i] for i in keep],
                         None if self.y is None else self.y[keep], RowSubset(self.store, keep))

    @property
    def clusters(self) -> np.ndarray:
        """Bootstrap unit: patients when ``patient_id`` exists, else single images."""
        if "patient_id" in self.df.columns:
            return self.df["patient_id"].astype(str).to_numpy()
        return np.arange(len(self.df))


def read_input_table(args, require_labels: bool = True) -> pd.DataFrame:
    df = read_table(args.csv, args.labels or [], require_labels=require_labels)
    for col in getattr(args, "group_col", None) or []:
        if col not in df.columns:
            raise UserError(f"--group-col {col}: no such column in --csv {args.csv}; "
                            f"columns are: {', '.join(map(str, df.columns))}")
    return df


def cache_dir(args):
    if getattr(args, "no_cache", False):
        return None
    return Path(args.cache_dir) if getattr(args, "cache_dir", None) else default_cache_dir()


def load_split(run: Run, table: pd.DataFrame, split: str | None) -> SplitData:
    """Rows of ``split``; every image path checked up front; pixels decoded once (or read from the
    cache). Undecodable images stop the run, or with ``--skip-bad-images`` are dropped and counted."""
    args = run.args
    df = select_split(table, split, args.csv)
    paths = resolve_paths(df, args.img_root)
    check_images_exist(paths, args.csv, args.img_root)
    store = shared_store(run, paths)
    y = label_matrix(df, args.labels) if all(lbl in df.columns for lbl in args.labels) else None
    data = SplitData(split, df, paths, y, store)
    if store.bad:
        shown = ", ".join(paths[i] for i in store.bad[:3])
        if not getattr(args, "skip_bad_images", False):
            raise UserError(f"--csv {args.csv}: {len(store.bad)} image(s) cannot be decoded (first: {shown}); "
                            "replace them or pass --skip-bad-images")
        log.warning("skipping %d undecodable image(s) in split %s (first: %s)", len(store.bad), split, shown)
        run.skipped[str(split)] = {"count": len(store.bad), "paths": [paths[i] for i in store.bad]}
        run.config()
        data = data.subset(np.setdiff1d(np.arange(len(df)), store.bad))
    return data


def shared_store(run: Run, paths):
    """Decoded pixels of ``paths`` for every rank: rank 0 decodes them (or finds them cached) and,
    with a cache, the other ranks map its file; without one each rank decodes for itself."""
    args, cache = run.args, cache_dir(run.args)
    if cache is None:
        return build_store(paths, args.image_size, None, run.workers, progress=distributed.is_main())
    store = build_store(paths, args.image_size, cache, run.workers, progress=True) if distributed.is_main() else None
    return distributed.broadcast_object(store)


class RowSubset:
    """Rows ``keep`` of a store, renumbered 0..len(keep)-1."""

    def __init__(self, store, keep):
        self.store, self.keep, self.bad = store, np.asarray(keep), []

    def __len__(self):
        return len(self.keep)

    def __getitem__(self, index):
        return self.store[int(self.keep[index])]


def clean_pass(run: Run, model, data: SplitData, features: bool = False, transform=None,
               desc: str = "predict") -> dict:
    """Logits (and backbone features) of ``model`` on ``data``, in row order."""
    loader = make_loader(data.dataset(run.args.image_size, transform), run.batch_size, run.pass_workers,
                         run.device, persistent=False)
    return predict(model, loader, run.device, run.precision, features=features, progress=desc)


def logits_from_predictions(files, data: SplitData, labels) -> np.ndarray | None:
    """Logits of ``data``'s rows from predictions CSVs written by eval (matched by image_path),
    so a later stage does not run the model again. None when the files hold none of the rows."""
    if not files:
        return None
    frames = []
    for f in files:
        if not Path(f).is_file():
            raise UserError(f"--predictions {f}: file not found; pass predictions_<split>.csv written by eval")
        frames.append(pd.read_csv(f))
    preds = pd.concat(frames, ignore_index=True).drop_duplicates("image_path", keep="last").set_index("image_path")
    cols = [f"{label}_logit" for label in labels]
    missing = [c for c in cols if c not in preds.columns]
    if missing:
        raise UserError(f"--predictions: column(s) {', '.join(missing)} not found; pass files written by eval "
                        "with the same labels")
    found = data.df["image_path"].astype(str).isin(preds.index)
    if not found.any():
        return None
    if not found.all():
        raise UserError(f"--predictions: {int((~found).sum())} of {len(found)} rows of split {data.name} are not in "
                        f"the predictions (first: {data.df['image_path'][~found].iloc[0]}); pass eval's file for this split")
    return preds.loc[data.df["image_path"].astype(str), cols].to_numpy(np.float32)


def split_logits(run, model, data: SplitData, features: bool = False, desc: str = "predict") -> dict:
    """Logits of a split: from ``--predictions`` when they cover it and no features are needed,
    else one clean pass."""
    if not features:
        logits = logits_from_predictions(getattr(run.args, "predictions", None), data, run.args.labels)
        if logits is not None:
            log.info("split %s: logits read from --predictions (no model pass)", data.name)
            return {"logits": logits}
    return clean_pass(run, model, data, features=features, desc=desc)
