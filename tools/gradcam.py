"""Grad-CAM heatmaps for one label of the DenseNet-121 classifier, and their overlay on the film.

Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
Localization", ICCV 2017, eq. 1-2): for feature maps A^k of the last convolutional stage and the
class score y^c,

    alpha_k = mean over positions (i, j) of d y^c / d A^k_ij
    L^c     = ReLU(sum_k alpha_k A^k)

upsampled to the input size. Here A is the map DenseNet pools for its head: ReLU of
``features.norm5`` (the output of the last dense block after the final batch norm), and y^c is the
label's logit. Because the head is global average pooling then a linear layer, alpha_k equals
W[c, k] / (h * w), so the map is the class activation map of Zhou et al. (CVPR 2016) up to scale.

The forward pass is the model's own split (``tools.model.backbone_features`` then ``head``): the
backbone runs without a graph and the feature map becomes a fresh leaf tensor, so the gradient is
taken through the head alone with ``torch.autograd.grad``. No hooks are registered and no
parameter's ``.grad`` is touched.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

from tools.model import feature_map, head, head_linear, input_spec, pool, to_model_input, unwrap

OVERLAY_ALPHA = 0.4


def gradcam(model, x: torch.Tensor, label_index: int) -> np.ndarray:
    """Grad-CAM heatmap (H, W) float32 in [0, 1] of label ``label_index`` for one image.

    ``x`` is one normalised image (1, C, H, W) as made by ``tools.model.to_model_input``. The map
    is ReLU(sum_k alpha_k A^k) (module docstring), resized to (H, W) bilinearly and divided by its
    maximum; an image with no positive evidence for the label gets all zeros. The model is run in
    eval mode and left in the mode it was in.
    """
    if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] not in (1, 3):
        raise ValueError(f"gradcam takes one image of shape (1, C, H, W), C 1 or 3, got {tuple(x.shape)}")
    net = unwrap(model)
    n_labels = head_linear(net).out_features
    if not 0 <= int(label_index) < n_labels:
        raise ValueError(f"label_index {label_index} out of range for {n_labels} labels")
    was_training = net.training
    net.eval()
    try:
        device = next(net.parameters()).device
        with torch.no_grad():
            fmap = feature_map(net, x.to(device))
        fmap = fmap.float().detach().requires_grad_(True)
        with torch.enable_grad():
            pooled = pool(fmap)
            logit = head(net)(pooled)[0, int(label_index)]
            (grad,) = torch.autograd.grad(logit, fmap)
    finally:
        net.train(was_training)
    weights = grad[0].mean(dim=(1, 2))                               # alpha_k
    cam = torch.relu(torch.einsum("k,khw->hw", weights, fmap[0].detach()))
    return _upsample_normalise(cam.cpu().numpy(), x.shape[2], x.shape[3])


def film_gradcam(model, film: np.ndarray, label_index: int, device) -> np.ndarray:
    """:func:`gradcam` of one letterboxed uint8 film, made into the model's input on ``device``."""
    x = to_model_input(torch.from_numpy(np.ascontiguousarray(film))[None].to(device), spec=input_spec(model))
    return gradcam(model, x, label_index)


def _upsample_normalise(cam: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize to (height, width), then divide by the maximum (all zeros stay zeros)."""
    # cv2.resize takes the size as (width, height).
    big = cv2.resize(cam.astype(np.float32), (int(width), int(height)), interpolation=cv2.INTER_LINEAR)
    big = np.maximum(big, 0.0)
    peak = float(big.max())
    return (big / peak if peak > 0 else np.zeros_like(big)).astype(np.float32)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """RGB uint8 (H, W, 3): (1 - alpha) * film + alpha * JET colour of the heatmap, rounded.

    ``image`` is uint8 grayscale (H, W) or RGB (H, W, 3); ``heatmap`` is (H, W) in [0, 1]
    (0 = dark blue, 1 = dark red in OpenCV's JET colormap).
    """
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"overlay takes a uint8 (H, W) or (H, W, 3) image, got {image.dtype} {image.shape}")
    if heatmap.shape != image.shape[:2]:
        raise ValueError(f"heatmap shape {heatmap.shape} does not match the image's {image.shape[:2]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha {alpha} must be in [0, 1]")
    rgb = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else image
    levels = np.clip(np.rint(np.nan_to_num(heatmap) * 255.0), 0, 255).astype(np.uint8)
    # applyColorMap returns BGR.
    colour = cv2.cvtColor(cv2.applyColorMap(levels, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    blend = (1.0 - alpha) * rgb.astype(np.float32) + alpha * colour.astype(np.float32)
    return np.clip(np.rint(blend), 0, 255).astype(np.uint8)
