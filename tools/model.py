"""The one DenseNet-121 builder, its input normalisation, its checkpoints, and the split into
backbone features and head.

Head: ``Dropout(p)`` then ``Linear(1024, n_labels)`` as ``model.classifier``, optionally followed
by an :class:`OperatingPoints` map (a torchxrayvision model's per-output thresholds). The dropout
is an ``nn.Dropout`` module in front of the head so MC-Dropout can sample it (torchvision's dense
layers drop out functionally, so toggling modules there would change nothing).

Input: every model carries an :class:`InputSpec` (``model.input_spec``): how uint8 films become
its input tensor (ImageNet-normalised RGB for this suite's and torchvision-style models,
[-1024, 1024] single-channel for torchxrayvision's, or [0, 1]).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tools.errors import UserError

ARCH = "densenet121"
FEATURE_DIM = 1024
# ImageNet statistics, applied to the grayscale film replicated to three channels.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_NORMS = ("imagenet", "xrv", "unit")
# torchvision 0.3-era checkpoints name dense-layer parts "norm.1" where the module says "norm1".
_OLD_DENSE_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                            r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


@dataclass(frozen=True)
class InputSpec:
    """How a uint8 film becomes the model's input: ``norm`` imagenet (x/255, ImageNet mean/std),
    xrv (x/255 mapped to [-1024, 1024], torchxrayvision's scale) or unit (x/255); ``channels`` 1
    or 3 (the grayscale film replicated)."""
    norm: str = "imagenet"
    channels: int = 3


SUITE_INPUT = InputSpec("imagenet", 3)


def modern_densenet_keys(state: dict) -> dict:
    """``state`` with torchvision 0.3-era dense-layer names (``norm.1``) renamed (``norm1``)."""
    fixed = {}
    for key, value in state.items():
        match = _OLD_DENSE_KEY.match(key)
        fixed[match.group(1) + match.group(2) if match else key] = value
    return fixed


def imagenet_weights_file() -> Path:
    """Where torchvision keeps the ImageNet DenseNet-121 weights in the local torch cache."""
    from torchvision.models import DenseNet121_Weights

    name = DenseNet121_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def _backbone_state_dict(pretrained: str) -> dict:
    """State dict of the backbone from ``imagenet`` (local torch cache) or a file path."""
    path = imagenet_weights_file() if pretrained == "imagenet" else Path(pretrained)
    if not path.is_file():
        where = f"the torch cache ({path})" if pretrained == "imagenet" else str(path)
        raise UserError(
            f"--pretrained {pretrained}: weights not found at {where}; there is no download. Copy "
            f"densenet121-a639ec97.pth there, pass --pretrained /path/to/weights.pth, or use --pretrained none"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not plain weights"
        raise UserError(f"--pretrained {path}: not a plain weights file ({type(exc).__name__}); "
                        "only tensors are loaded (weights_only=True)") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    return {k: v for k, v in modern_densenet_keys(state).items() if not k.startswith("classifier")}


def build_model(n_labels: int, dropout: float = 0.2, pretrained: str = "none", in_channels: int = 3) -> nn.Module:
    """DenseNet-121 with the multi-label head; ``pretrained`` is ``none``, ``imagenet`` or a path;
    ``in_channels`` 1 builds torchxrayvision's single-channel stem."""
    from torchvision.models import densenet121

    model = densenet121(weights=None)
    if in_channels != 3:
        model.features.conv0 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if pretrained != "none":
        missing, unexpected = model.load_state_dict(_backbone_state_dict(pretrained), strict=False)
        missing = [k for k in missing if not k.startswith("classifier")]
        if missing or unexpected:
            raise UserError(f"--pretrained {pretrained}: not DenseNet-121 weights "
                            f"({len(missing)} missing, {len(unexpected)} unexpected keys)")
    model.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(FEATURE_DIM, n_labels))
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DistributedDataParallel / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def feature_map(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ReLU(features(x)): the (B, 1024, H/32, W/32) map that DenseNet average-pools for its head."""
    return F.relu(unwrap(model).features(x))


def pool(fmap: torch.Tensor) -> torch.Tensor:
    """(B, 1024) global average of a :func:`feature_map`: the head's input."""
    return torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1)


def backbone_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled 1024-d features: what DenseNet's forward computes before the classifier."""
    return pool(feature_map(model, x))


def load_weights(model: nn.Module, state: dict) -> None:
    """Load plain-named weights, also into a model whose backbone was compiled."""
    target = unwrap(model)
    if hasattr(target.features, "_orig_mod"):
        state = {("features._orig_mod." + k[len("features."):]) if k.startswith("features.") else k: v
                 for k, v in state.items()}
    target.load_state_dict(state)


def head(model: nn.Module) -> nn.Sequential:
    return unwrap(model).classifier


def head_linear(model: nn.Module) -> nn.Linear:
    """The head's ``Linear(1024, n_labels)``."""
    return next(m for m in head(model) if isinstance(m, nn.Linear))


def has_backbone(model: nn.Module) -> bool:
    """True for a DenseNet-121 split into ``features`` and ``classifier`` (every layout but
    TorchScript): MC head sampling, Grad-CAM and feature-based analyses need it."""
    net = unwrap(model)
    return hasattr(net, "features") and isinstance(getattr(net, "classifier", None), nn.Sequential)


class OperatingPoints(nn.Module):
    """torchxrayvision's output map as a logit: p = sigmoid(z) becomes p / (2 t) below the
    output's threshold t and 1 - (1 - p) / (2 (1 - t)) above it, so t maps to 0.5; an output
    without a threshold (NaN) is 0.5. Returned as logit(p), clipped at 1e-7, so every analysis
    that takes logits sees the probabilities the model reports."""

    def __init__(self, thresholds: torch.Tensor):
        super().__init__()
        self.register_buffer("thresholds", torch.as_tensor(thresholds, dtype=torch.float32).clone())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        p, t = torch.sigmoid(z.float()), self.thresholds.to(z.device)
        mapped = torch.where(p < t, p / (2 * t), 1.0 - (1.0 - p) / (2 * (1 - t)))
        return torch.logit(torch.where(torch.isnan(t), torch.full_like(p, 0.5), mapped), eps=1e-7)


def input_spec(model: nn.Module | None) -> InputSpec:
    """The model's :class:`InputSpec` (this suite's for a model without one)."""
    return getattr(unwrap(model), "input_spec", SUITE_INPUT) if model is not None else SUITE_INPUT


def to_model_input(images: torch.Tensor, channels_last: bool = False, spec: InputSpec = SUITE_INPUT) -> torch.Tensor:
    """uint8 (B, H, W) -> float (B, C, H, W) as ``spec`` says (default: grayscale replicated to
    three channels, ImageNet-normalised).

    Done on the model's device, so loaders move uint8 (4x less data than float)."""
    x = images.float().div_(255.0).unsqueeze(1)
    if spec.norm == "xrv":
        x = x * 2048.0 - 1024.0
    if spec.channels == 3:
        x = x.expand(-1, 3, -1, -1)
    if spec.norm == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        x = (x - mean[:, :spec.channels]) / std[:, :spec.channels]
    else:
        x = x.contiguous()
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


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


# ====== checkpoints ======

def checkpoint_dict(model, labels, image_size, dropout, epoch, val_macro_auroc, **extra) -> dict:
    """A plain dict (tensors, numbers, strings): loadable with ``weights_only=True``."""
    # a compiled backbone names its parameters "features._orig_mod.*": store the plain names
    state = {k.replace("._orig_mod", ""): v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}
    ckpt = {"model": state, "labels": list(labels), "image_size": int(image_size), "arch": ARCH,
            "dropout": float(dropout), "epoch": int(epoch),
            "val_macro_auroc": None if val_macro_auroc is None else float(val_macro_auroc)}
    ckpt.update(extra)
    return ckpt


def read_checkpoint(path) -> dict:
    """Load a checkpoint with ``weights_only=True`` only: a crafted pickle cannot run code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--weights {path}: file not found; pass a best.pt/last.pt written by train")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is "not a plain checkpoint"
        raise UserError(f"--weights {path}: not a plain checkpoint, refused ({type(exc).__name__}); "
                        "only files written by train are loaded (weights_only=True)") from None
    if not isinstance(ckpt, dict) or not {"model", "labels", "arch"} <= set(ckpt):
        raise UserError(f"--weights {path}: not a checkpoint of this suite (needs model, labels, arch)")
    return ckpt
