"""Passes of a model over a split: the one predict loop, MC-Dropout on the head, test-time
augmentation draws and corrupted passes. Loops return arrays in row order; callers decide what
to write. Under torchrun each rank runs its shard and every rank gets all rows back.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tools import distributed
from tools.corruptions import apply_corruption
from tools.dataset import SeededAugment, make_loader
from tools.model import backbone_features, has_backbone, head, input_spec, to_model_input
from tools.runtime import Run, autocast
from tools.splits import SplitData


@torch.inference_mode()
def predict(model: nn.Module, loader, device: torch.device, precision: str = "fp32",
            channels_last: bool = True, features: bool = False, progress: str | None = None) -> dict:
    """Run the model over ``loader``; returns ``logits`` (N, L) float32 in row order, and the pooled
    backbone ``features`` (N, 1024) when asked (MC-Dropout samples the head on them; a model
    without a backbone, TorchScript, has none to give).
    Under torchrun each rank runs its shard and every rank gets all rows back."""
    from tqdm import tqdm

    model.eval()
    spec, split = input_spec(model), has_backbone(model)
    if features and not split:
        raise ValueError("this model has no backbone features (TorchScript); check has_backbone first")
    channels_last = channels_last and split
    index, logits, feats = [], [], []
    show = progress is not None and distributed.is_main()
    for batch in tqdm(loader, desc=progress, unit="batch", disable=not show, leave=False):
        x = to_model_input(batch["image"].to(device, non_blocking=True), channels_last, spec)
        with autocast(device, precision):
            if split:
                f = backbone_features(model, x)
                out = head(model)(f)
            else:
                out = model(x)
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
    after = [m for m in classifier if not isinstance(m, nn.Dropout)]  # the Linear (and an output map)
    linear = next(m for m in after if isinstance(m, nn.Linear))
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
        for module in after:
            sample = module(sample)
        out.append(sample.float().cpu().numpy())
    return np.stack(out) if out else np.zeros((0,) + (len(features), linear.out_features), np.float32)


def clean_pass(run: Run, model, data: SplitData, features: bool = False, transform=None,
               desc: str = "predict") -> dict:
    """Logits (and backbone features) of ``model`` on ``data``, in row order; ``transform(image,
    index)`` changes each decoded image first (a corruption, an augmentation draw)."""
    loader = make_loader(data.dataset(transform), run.inference_batch, run.pass_workers, run.device,
                         persistent=False)
    return predict(model, loader, run.device, run.precision, features=features, progress=desc)


# ====== test-time augmentation ======

def tta_logits(run: Run, model, data: SplitData, samples: int) -> np.ndarray:
    """(samples, N, L) logits, one model pass per augmentation draw (TTA: mild, anatomy-preserving
    draws of each decoded image: small shift, scale, rotation, brightness; no flip)."""
    return np.stack([clean_pass(run, model, data, transform=SeededAugment(run.seed, stream=1, draw=t),
                                desc=f"tta {t + 1}/{samples}")["logits"] for t in range(samples)])


# ====== corrupted passes ======

class Corrupt:
    """Dataset transform: corruption ``name`` at ``severity``, seeded by (seed, row index)."""

    def __init__(self, name: str, severity: int, seed: int):
        self.name, self.severity, self.seed = name, int(severity), int(seed)

    def __call__(self, image: np.ndarray, index: int) -> np.ndarray:
        return apply_corruption(image, self.name, self.severity, self.seed, index)


def corrupted_logits(run, model, data, corruptions) -> dict:
    """{(name, severity): logits (N, L)} for every chosen corruption and severity 1..3."""
    out = {}
    for name in corruptions:
        for severity in (1, 2, 3):
            out[(name, severity)] = clean_pass(
                run, model, data, transform=Corrupt(name, severity, run.seed),
                desc=f"{name} sev{severity}")["logits"]
    return out
