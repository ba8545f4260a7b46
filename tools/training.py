"""One training epoch of the multi-label model: the masked loss, the class weights and the loop.
The recipe around it (optimiser, schedule, checkpoints, resume) is the train stage's."""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

from tools import distributed
from tools.errors import RunError
from tools.model import to_model_input
from tools.runtime import autocast


def masked_bce(logits: torch.Tensor, y: torch.Tensor, pos_weight: torch.Tensor | None) -> torch.Tensor:
    """Binary cross-entropy over the known labels only (NaN = unknown is masked out)."""
    known = ~torch.isnan(y)
    target = torch.where(known, y, torch.zeros_like(y))
    loss = nn.functional.binary_cross_entropy_with_logits(
        logits.float(), target, pos_weight=pos_weight, reduction="none")
    return (loss * known).sum() / known.sum().clamp(min=1)


def pos_weights(y: np.ndarray) -> torch.Tensor:
    """Per-label negatives / positives on the known train labels (1 where a label has no positive)."""
    pos = np.nansum(y, axis=0)
    neg = np.sum(~np.isnan(y), axis=0) - pos
    return torch.tensor(np.where(pos > 0, neg / np.maximum(pos, 1), 1.0), dtype=torch.float32)


def train_one_epoch(model, loader, optimizer, device, precision, pos_weight, channels_last=True,
                    progress: str | None = None) -> dict:
    """One pass over ``loader``; returns mean loss, images seen and seconds. A non-finite loss
    stops the run (RunError) before it corrupts the weights."""
    from tqdm import tqdm

    model.train()
    pos_weight = pos_weight.to(device) if pos_weight is not None else None
    total, count, start = 0.0, 0, time.perf_counter()
    show = progress is not None and distributed.is_main()
    bar = tqdm(loader, desc=progress, unit="batch", disable=not show, leave=False)
    for step, batch in enumerate(bar):
        x = to_model_input(batch["image"].to(device, non_blocking=True), channels_last)
        y = batch["labels"].to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(x)
        loss = masked_bce(logits, y, pos_weight)
        if not math.isfinite(loss.item()):
            raise RunError(f"training stopped: non-finite loss ({loss.item()}) at step {step}; "
                           "lower --lr or check the input images")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(x)
        count += len(x)
        bar.set_postfix(loss=f"{total / count:.4f}")
    total, count = distributed.sum_across_ranks(total, count)
    return {"train_loss": total / max(count, 1), "images": int(count), "seconds": time.perf_counter() - start}
