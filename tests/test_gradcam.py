"""tools/gradcam.py: Grad-CAM of one label, checked against the class activation map it must equal
for a global-average-pool + linear head, on feature locations, and for side effects."""
import copy

import cv2
import numpy as np
import pytest
import torch

from tools.gradcam import gradcam, overlay
from tools.model import feature_map
from tools.model import build_model

H, W = 64, 96  # feature map 2 x 3: rows and columns are distinguishable


@pytest.fixture(scope="module")
def model():
    """Untrained model, head weights shifted to a positive mean so every label has some positive
    evidence (with signed random weights a label's map may be legitimately all zero)."""
    torch.manual_seed(0)
    net = build_model(3, 0.0, "none").eval()
    with torch.no_grad():
        net.classifier[1].weight.add_(0.01)
    return net


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(1)
    return torch.randn(1, 3, H, W)


def cam_from_weights(model, x, label_index):
    """Zhou et al. 2016 CAM: ReLU(sum_k W[c, k] A_k), resized bilinearly, divided by its maximum."""
    with torch.no_grad():
        a = feature_map(model, x)[0].numpy()
    w = model.classifier[1].weight[label_index].detach().numpy()
    cam = np.maximum(np.tensordot(w, a, axes=1), 0).astype(np.float32)
    big = cv2.resize(cam, (W, H), interpolation=cv2.INTER_LINEAR)
    return big / big.max()


def test_shape_range_and_label_dependence(model, x):
    maps = [gradcam(model, x, c) for c in range(3)]
    for m in maps:
        assert m.shape == (H, W) and m.dtype == np.float32
        assert m.min() >= 0.0 and m.max() == pytest.approx(1.0)
        assert m.std() > 0.01  # not constant
    assert np.abs(maps[0] - maps[1]).max() > 0.05
    assert np.abs(maps[1] - maps[2]).max() > 0.05


def test_equals_class_activation_map(model, x):
    # GAP + linear head: d logit_c / d A_k_ij = W[c, k] / (h w), so Grad-CAM is CAM up to scale.
    for c in range(3):
        np.testing.assert_allclose(gradcam(model, x, c), cam_from_weights(model, x, c), atol=1e-4)


def peaked_channel(a: np.ndarray, row: int, col: int) -> int:
    """The channel whose value at (row, col) exceeds its value everywhere else by the most."""
    others = a.copy()
    others[:, row, col] = -np.inf
    margin = a[:, row, col] - others.reshape(len(a), -1).max(axis=1)
    k = int(np.argmax(margin))
    assert margin[k] > 0
    return k


def test_heatmap_peaks_where_the_logit_reads_its_feature(model, x):
    model = copy.deepcopy(model)
    with torch.no_grad():
        a = feature_map(model, x)[0].numpy()                   # (1024, 2, 3)
        linear = model.classifier[1]
        linear.weight.zero_()
        linear.bias.zero_()
        # label 0 reads a channel that fires top-right, label 1 one that fires bottom-left.
        linear.weight[0, peaked_channel(a, 0, 2)] = 1.0
        linear.weight[1, peaked_channel(a, 1, 0)] = 1.0
        linear.weight[2, peaked_channel(a, 0, 2)] = -1.0      # evidence against label 2 only

    def cell_means(m):
        """Mean heat in each of the 2 x 3 cells the feature positions cover."""
        return m.reshape(2, H // 2, 3, W // 3).mean(axis=(1, 3))

    top_right = cell_means(gradcam(model, x, 0))
    bottom_left = cell_means(gradcam(model, x, 1))
    assert np.unravel_index(np.argmax(top_right), (2, 3)) == (0, 2)
    assert np.unravel_index(np.argmax(bottom_left), (2, 3)) == (1, 0)
    # ReLU keeps positive evidence only: a label with none has an all-zero map, not a stretched one.
    assert not gradcam(model, x, 2).any()


def test_no_side_effects(model, x):
    model = copy.deepcopy(model)
    model.classifier[0].p = 0.2  # dropout active in train mode: gradcam must not sample it
    with torch.no_grad():
        before = model.eval()(x).clone()
    model.train()
    with torch.no_grad():  # works from inside a no-grad block too
        m = gradcam(model, x, 1)
    assert m.std() > 0
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks and not module._backward_hooks
    assert not model.features.denseblock4._forward_hooks
    with torch.no_grad():
        after = model.eval()(x)
    assert torch.equal(before, after)


def test_rejects_batches_and_bad_labels(model, x):
    with pytest.raises(ValueError, match="one image"):
        gradcam(model, torch.cat([x, x]), 0)
    with pytest.raises(ValueError, match="out of range"):
        gradcam(model, x, 3)


def test_overlay_is_a_blend_of_film_and_jet():
    image = np.full((4, 6), 100, np.uint8)
    heat = np.zeros((4, 6), np.float32)
    heat[:, 3:] = 1.0
    assert np.array_equal(overlay(image, heat, alpha=0.0), np.full((4, 6, 3), 100, np.uint8))
    pure = overlay(image, heat, alpha=1.0)
    # OpenCV JET: 0 -> dark blue, 1 -> dark red (RGB channel order here).
    assert (pure[:, :3] == (0, 0, 128)).all() and (pure[:, 3:] == (128, 0, 0)).all()
    mixed = overlay(image, heat, alpha=0.4)
    assert mixed.dtype == np.uint8 and mixed.shape == (4, 6, 3)
    assert tuple(mixed[0, 0]) == (60, 60, 111)     # 0.6 * 100 + 0.4 * (0, 0, 128), rounded
    assert tuple(mixed[0, 5]) == (111, 60, 60)
    with pytest.raises(ValueError, match="does not match"):
        overlay(image, heat[:, :5])
