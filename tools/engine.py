"""Devices, precision, data loaders, the one predict loop, MC-Dropout on the head, and one
training epoch. Loops return data; the subcommands decide what to write."""
from __future__ import annotations

import contextlib
import math
import os

import numpy as np
import torch
from torch import nn

from tools import distributed
from tools.data import to_model_input
from tools.errors import RunError, UserError
from tools.model import backbone_features, head


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def cpu_has_bf16() -> bool:
    """Native bf16 matrix units (AVX-512 BF16 or AMX) make bf16 autocast faster on the CPU."""
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((check and check()) or (amx and amx()))


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto``: bf16 on CUDA devices that support it and on CPUs with native bf16, else fp32."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def default_workers() -> int:
    """Loader processes: one per spare core, at most 8 (decoding is done once, by the cache)."""
    return min(8, max(0, (os.cpu_count() or 1) - 1))


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def worker_init(_worker_id: int) -> None:
    """One thread per loader process: OpenCV's own thread pool in every worker otherwise fights
    the model's threads for the same cores (measured: 20x slower training on 2 cores).
    OpenCV is told 0 (run sequentially), not 1: setting 1 in a forked child waits for pool
    threads that exist only in the parent, and hangs once the parent has used OpenCV's pool."""
    import cv2

    cv2.setNumThreads(0)
    torch.set_num_threads(1)


def make_loader(dataset, batch_size: int, num_workers: int, device: torch.device, shuffle: bool = False,
                seed: int = 0, drop_last: bool = False, persistent: bool = True):
    """DataLoader; under torchrun a DistributedSampler shards the rows (reshuffled per epoch via
    ``loader.sampler.set_epoch``)."""
    sampler = None
    if distributed.world_size() > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(
            dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
        shuffle = False
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=num_workers,
        pin_memory=device.type == "cuda", drop_last=drop_last, generator=generator,
        persistent_workers=persistent and num_workers > 0, worker_init_fn=worker_init,
    )


def prepare_model(model: nn.Module, device: torch.device, channels_last: bool = True,
                  compile: bool = False) -> nn.Module:
    """On ``device`` in channels_last (faster convolutions on CPU and GPU); ``compile`` wraps the
    backbone in torch.compile (worth it for long GPU runs; the first batches pay for compiling).
    Only the backbone is compiled so MC-Dropout can still sample the head on its own."""
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model.features = torch.compile(model.features)
    return model


@torch.inference_mode()
def predict(model: nn.Module, loader, device: torch.device, precision: str = "fp32",
            channels_last: bool = True, features: bool = False, progress: str | None = None) -> dict:
    """Run the model over ``loader``; returns ``logits`` (N, L) float32 in row order, and the pooled
    backbone ``features`` (N, 1024) when asked (MC-Dropout samples the head on them).
    Under torchrun each rank runs its shard and every rank gets all rows back."""
    from tqdm import tqdm

    model.eval()
    index, logits, feats = [], [], []
    show = progress is not None and distributed.is_main()
    for batch in tqdm(loader, desc=progress, unit="batch", disable=not show, leave=False):
        x = to_model_input(batch["image"].to(device, non_blocking=True), channels_last)
        with autocast(device, precision):
            f = backbone_features(model, x)
            out = head(model)(f)
        index.append(batch["index"].numpy())
        logits.append(out.float().cpu().numpy())
        if features:
            feats.append(f.float().cpu().numpy())
    arrays = {"logits": np.concatenate(logits) if logits else np.zeros((0, 0), np.float32)}
    if features:
        arrays["features"] = np.concatenate(feats)
    index = np.concatenate(index) if index else np.zeros(0, int)
    return distributed.gather_rows(index, arrays, len(loader.dataset))


@torch.inference_mode()
def mc_dropout_logits(model: nn.Module, features: np.ndarray, samples: int, seed: int,
                      device: torch.device | None = None) -> np.ndarray:
    """(samples, N, L) logits with the head's dropout active: features computed once, the head
    sampled ``samples`` times (Gal & Ghahramani 2016). Only the dropout samples; BatchNorm in the
    backbone is untouched because the backbone is not re-run."""
    classifier = head(model)
    dropout = next((m for m in classifier if isinstance(m, nn.Dropout)), None)
    linear = next(m for m in classifier if isinstance(m, nn.Linear))
    device = device or next(linear.parameters()).device
    p = dropout.p if dropout is not None else 0.0
    feats = torch.as_tensor(features, dtype=torch.float32, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = []
    for _ in range(samples):
        if p > 0:
            keep = torch.empty_like(feats).bernoulli_(1 - p, generator=generator)
            sample = feats * keep / (1 - p)
        else:
            sample = feats
        out.append(linear(sample).float().cpu().numpy())
    return np.stack(out) if out else np.zeros((0,) + (len(features), linear.out_features), np.float32)


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
    import time

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
