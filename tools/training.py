"""``main.py train``: the recipe (BCE with per-label pos_weight, AdamW, cosine schedule), epoch
bookkeeping, checkpoints and resume. Files are written by rank 0 only, each atomically."""
from __future__ import annotations

import logging
import math

import pandas as pd
import torch

from tools import distributed, pipeline, plots
from tools.data import SeededAugment, auto_split
from tools.engine import make_loader, masked_bce, pos_weights, prepare_model, seed_everything, train_one_epoch
from tools.errors import UserError
from tools.io import save_torch, write_csv
from tools.metrics import compute_metrics, sigmoid
from tools.model import build_model, checkpoint_dict, load_weights, read_checkpoint

log = logging.getLogger("cxr")

TRAIN_BATCH = 16


def _splits(run, args) -> pd.DataFrame:
    table = pipeline.read_input_table(args)
    if args.auto_split:
        table = auto_split(table, args.auto_split, args.seed)
        if distributed.is_main():
            write_csv(run.outdir / "splits.csv", table)
            log.info("wrote %s (use it as --csv for the later commands)", run.outdir / "splits.csv")
    elif "split" not in table.columns:
        raise UserError(f"--csv {args.csv}: no split column; add one (train/val/test) or pass --auto-split 0.7 0.1 0.2")
    return table


def _validate(run, model, val, pos_weight) -> dict:
    logits = pipeline.clean_pass(run, model, val, desc="val")["logits"]
    loss = masked_bce(torch.from_numpy(logits), torch.from_numpy(val.y), pos_weight).item()
    metrics = compute_metrics(val.y, sigmoid(logits), run.args.labels, "val")
    return {"val_loss": loss, "metrics": metrics}


def _resume_state(run, model, optimizer, scheduler) -> tuple[int, float, list]:
    args = run.args
    path = run.outdir / "last.pt"
    if not path.is_file():
        raise UserError(f"--resume: {path} not found; run train without --resume first (same --outdir)")
    ckpt = read_checkpoint(path)
    if list(ckpt["labels"]) != list(args.labels) or int(ckpt["image_size"]) != args.image_size:
        raise UserError(f"--resume: {path} was trained with labels {' '.join(ckpt['labels'])} at "
                        f"{ckpt['image_size']} px; pass the same --labels and --image-size")
    load_weights(model, ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if "rng_state" in ckpt:
        torch.set_rng_state(ckpt["rng_state"])
    rows = []
    log_path = run.outdir / "train_log.csv"
    if log_path.is_file():
        rows = pd.read_csv(log_path).query(f"epoch <= {ckpt['epoch']}").to_dict("records")
    best = ckpt.get("best_val_macro_auroc")
    log.info("resuming after epoch %d (best val macro AUROC %s)", ckpt["epoch"], best)
    return int(ckpt["epoch"]) + 1, -math.inf if best is None else float(best), rows


def train(args) -> None:
    # ====== data ======
    run = pipeline.start_run(args)
    args.batch_size = args.batch_size or TRAIN_BATCH
    table = _splits(run, args)
    train_data = pipeline.load_split(run, table, "train")
    val_data = pipeline.load_split(run, table, "val")
    pos_weight = pos_weights(train_data.y)

    # ====== model and optimiser ======
    seed_everything(args.seed)  # the same initial weights whether or not the image cache was warm
    model = prepare_model(build_model(len(args.labels), args.dropout, args.pretrained), run.device,
                          compile=args.compile)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, args.epochs))
    start_epoch, best, rows = 1, -math.inf, []
    if args.resume:
        start_epoch, best, rows = _resume_state(run, model, optimizer, scheduler)
    net = model
    if distributed.world_size() > 1:
        ids = [run.device.index] if run.device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    augment = SeededAugment(args.seed, stream=0)
    train_set = train_data.dataset(args.image_size, transform=augment)

    # ====== epochs ======
    for epoch in range(start_epoch, args.epochs + 1):
        augment.draw = epoch
        loader = make_loader(train_set, args.batch_size, run.workers, run.device, shuffle=True,
                             seed=args.seed + epoch, persistent=False)
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        stats = train_one_epoch(net, loader, optimizer, run.device, run.precision, pos_weight,
                                progress=f"epoch {epoch}/{args.epochs}")
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        val = _validate(run, model, val_data, pos_weight)
        auroc = val["metrics"]["macro"]["auroc"]
        row = {"epoch": epoch, "train_loss": stats["train_loss"], "val_loss": val["val_loss"],
               "val_macro_auroc": auroc,
               **{f"val_auroc_{lbl}": val["metrics"]["per_class"][lbl]["auroc"] for lbl in args.labels},
               "lr": lr, "seconds": stats["seconds"],
               "train_images_per_s": stats["images"] / max(stats["seconds"], 1e-9)}
        rows.append(row)
        improved = not math.isnan(auroc) and auroc > best
        if improved:
            best = auroc
        if distributed.is_main():
            _save_epoch(run, model, optimizer, scheduler, epoch, auroc, best, improved, rows)
        log.info("epoch %d: train_loss %.4f val_loss %.4f val macro AUROC %.4f%s (%.0f img/s)", epoch,
                 row["train_loss"], row["val_loss"], auroc, " (best)" if improved else "",
                 row["train_images_per_s"])
        distributed.barrier()


def _save_epoch(run, model, optimizer, scheduler, epoch, auroc, best, improved, rows) -> None:
    """best.pt before last.pt: a run killed between the two resumes from the previous epoch and
    makes the same choice again, so best.pt never misses an epoch that last.pt recorded."""
    args = run.args
    write_csv(run.outdir / "train_log.csv", pd.DataFrame(rows))
    plots.training_curves(pd.DataFrame(rows), args.labels, run.outdir / "training_curves.png")
    meta = dict(labels=args.labels, image_size=args.image_size, dropout=args.dropout, epoch=epoch,
                val_macro_auroc=None if math.isnan(auroc) else auroc)
    if improved:
        save_torch(checkpoint_dict(model, **meta), run.outdir / "best.pt")
    save_torch(checkpoint_dict(model, **meta, optimizer=optimizer.state_dict(),
                               scheduler=scheduler.state_dict(), rng_state=torch.get_rng_state(),
                               best_val_macro_auroc=None if math.isinf(best) else best),
               run.outdir / "last.pt")

