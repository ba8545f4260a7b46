"""The train stage: the recipe (BCE with per-label pos_weight, AdamW, cosine schedule), epoch
bookkeeping, checkpoints and resume. Files are written by rank 0 only, each atomically.

Each epoch is saved in an order that a kill at any instant can be resumed from: ``last.pt`` first
(it carries the log rows and which epoch is best), then ``best.pt``, then ``train_log.csv`` and
its figure. ``--resume`` restores ``best.pt`` from ``last.pt`` when the kill fell between the two,
and rewrites the log from the rows, so a resumed run ends with the same files as one that was
never interrupted.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import torch

from tools import distributed, figures
from tools.dataset import SeededAugment, make_loader
from tools.errors import UserError
from tools.files import save_torch, write_csv
from tools.inference import clean_pass
from tools.metrics import compute_metrics, sigmoid
from tools.model import build_model, checkpoint_dict, load_weights, prepare_model, read_checkpoint
from tools.runtime import Run, seed_everything
from tools.splits import Source, load_split
from tools.table import auto_split
from tools.training import masked_bce, pos_weights, train_one_epoch

log = logging.getLogger("cxr")

TRAIN_BATCH = 16
# Keys of last.pt that only resuming needs; best.pt is last.pt without them.
RESUME_KEYS = ("optimizer", "scheduler", "rng_state", "best_val_macro_auroc", "best_epoch", "log_rows")


@dataclass
class Recipe:
    epochs: int = 10
    lr: float = 1e-4
    weight_decay: float = 1e-2
    dropout: float = 0.2
    pretrained: str = "imagenet"
    batch_size: int = TRAIN_BATCH


def split_table(run: Run, source: Source, fractions=None) -> Source:
    """The table with its splits: made by patient with ``fractions`` (and written to
    ``splits.csv``), else the table's own ``split`` column."""
    table = source.table
    if fractions:
        table = auto_split(table, fractions, run.seed)
        if distributed.is_main():
            write_csv(run.outdir / "splits.csv", table)
            log.info("wrote %s (use it as --csv for the later commands)", run.outdir / "splits.csv")
    elif "split" not in table.columns:
        raise UserError(f"--csv {source.csv}: no split column; add one (train/val/test) or pass --auto-split 0.7 0.1 0.2")
    return replace(source, table=table)


def data_record(run: Run, source: Source, fractions=None) -> dict:
    """What the checkpoint records of its data, so that a later check of a new site can find the
    films the model was validated on: the table (``splits.csv`` when train made the splits), the
    folder its image paths start from (absolute paths) and the validation split's name."""
    csv = run.outdir / "splits.csv" if fractions else Path(source.csv)
    return {"csv": str(csv.resolve()), "img_root": str(Path(source.img_root).resolve()), "val_split": "val"}


def _validate(run, model, val, labels, pos_weight) -> dict:
    logits = clean_pass(run, model, val, desc="val")["logits"]
    loss = masked_bce(torch.from_numpy(logits), torch.from_numpy(val.y), pos_weight).item()
    return {"val_loss": loss, "metrics": compute_metrics(val.y, sigmoid(logits), labels, "val")}


def _resume_state(run, model, optimizer, scheduler, labels, image_size) -> tuple[int, float, int | None, list]:
    """(next epoch, best val macro AUROC, its epoch, log rows) from ``last.pt``; the files a kill may have left
    behind (best.pt, train_log.csv) are brought in line with it first."""
    path = run.outdir / "last.pt"
    if not path.is_file():
        raise UserError(f"--resume: {path} not found; run train without --resume first (same --outdir)")
    ckpt = read_checkpoint(path)
    if list(ckpt["labels"]) != list(labels) or int(ckpt["image_size"]) != image_size:
        raise UserError(f"--resume: {path} was trained with labels {' '.join(ckpt['labels'])} at "
                        f"{ckpt['image_size']} px; pass the same --labels and --image-size")
    if "log_rows" not in ckpt:
        raise UserError(f"--resume: {path} holds no log rows (written by an older version); train again "
                        "without --resume")
    load_weights(model, ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["rng_state"])
    rows = list(ckpt["log_rows"])
    if distributed.is_main():
        _restore_best(run, ckpt)
        _write_log(run, rows, labels)
    best = ckpt.get("best_val_macro_auroc")
    log.info("resuming after epoch %d (best val macro AUROC %s)", ckpt["epoch"], best)
    return int(ckpt["epoch"]) + 1, -math.inf if best is None else float(best), ckpt["best_epoch"], rows


def _restore_best(run, last: dict) -> None:
    """Rewrite best.pt from last.pt when last.pt's epoch was the best and best.pt does not hold it
    (the run was killed between the two writes)."""
    if last.get("best_epoch") != last["epoch"]:
        return
    path = run.outdir / "best.pt"
    if path.is_file() and read_checkpoint(path).get("epoch") == last["epoch"]:
        return
    save_torch({k: v for k, v in last.items() if k not in RESUME_KEYS}, path)
    log.info("restored %s from epoch %d of last.pt", path, last["epoch"])


def train(run: Run, source: Source, labels, image_size: int, recipe: Recipe, fractions=None,
          resume: bool = False) -> None:
    # ====== data ======
    source = split_table(run, source, fractions)
    train_data = load_split(run, source, "train", labels, image_size)
    val_data = load_split(run, source, "val", labels, image_size)
    pos_weight = pos_weights(train_data.y)

    # ====== model and optimiser ======
    seed_everything(run.seed)  # the same initial weights whether or not the image cache was warm
    model = prepare_model(build_model(len(labels), recipe.dropout, recipe.pretrained), run.device,
                          compile=run.compile)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, recipe.epochs))
    start_epoch, best, best_epoch, rows = 1, -math.inf, None, []
    if resume:
        start_epoch, best, best_epoch, rows = _resume_state(run, model, optimizer, scheduler, labels, image_size)
    net = model
    if distributed.world_size() > 1:
        ids = [run.device.index] if run.device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    augment = SeededAugment(run.seed, stream=0)
    train_set = train_data.dataset(transform=augment)
    record = data_record(run, source, fractions)

    # ====== epochs ======
    for epoch in range(start_epoch, recipe.epochs + 1):
        augment.draw = epoch
        loader = make_loader(train_set, recipe.batch_size, run.pass_workers, run.device, shuffle=True,
                             seed=run.seed + epoch, persistent=False)
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        stats = train_one_epoch(net, loader, optimizer, run.device, run.precision, pos_weight,
                                progress=f"epoch {epoch}/{recipe.epochs}")
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        val = _validate(run, model, val_data, labels, pos_weight)
        auroc = val["metrics"]["macro"]["auroc"]
        row = {"epoch": epoch, "train_loss": stats["train_loss"], "val_loss": val["val_loss"],
               "val_macro_auroc": auroc,
               **{f"val_auroc_{lbl}": val["metrics"]["per_class"][lbl]["auroc"] for lbl in labels},
               "lr": lr, "seconds": stats["seconds"],
               "train_images_per_s": stats["images"] / max(stats["seconds"], 1e-9)}
        rows.append(row)
        improved = not math.isnan(auroc) and auroc > best
        if improved:
            best, best_epoch = auroc, epoch
        if distributed.is_main():
            meta = dict(labels=labels, image_size=image_size, dropout=recipe.dropout, epoch=epoch,
                        val_macro_auroc=None if math.isnan(auroc) else auroc, data=record)
            _save_epoch(run, model, optimizer, scheduler, meta, best, best_epoch, improved, rows)
        log.info("epoch %d: train_loss %.4f val_loss %.4f val macro AUROC %.4f%s (%.0f img/s)", epoch,
                 row["train_loss"], row["val_loss"], auroc, " (best)" if improved else "",
                 row["train_images_per_s"])
        distributed.barrier()


def _save_epoch(run, model, optimizer, scheduler, meta, best, best_epoch, improved, rows) -> None:
    """last.pt (with the log rows), best.pt when the epoch improved, then the log and its figure:
    see the module docstring for why in this order."""
    save_torch(checkpoint_dict(model, **meta, optimizer=optimizer.state_dict(),
                               scheduler=scheduler.state_dict(), rng_state=torch.get_rng_state(),
                               best_val_macro_auroc=None if math.isinf(best) else best,
                               best_epoch=best_epoch, log_rows=rows),
               run.outdir / "last.pt")
    if improved:
        save_torch(checkpoint_dict(model, **meta), run.outdir / "best.pt")
    _write_log(run, rows, meta["labels"])


def _write_log(run, rows, labels) -> None:
    log_frame = pd.DataFrame(rows)
    write_csv(run.outdir / "train_log.csv", log_frame)
    figures.training_curves(log_frame, labels, run.outdir / "training_curves.png")
