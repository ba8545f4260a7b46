"""Other people's model files behind --weights: each layout is built here from a model of known
weights (re-keyed, renamed, with extra outputs) and must give that model's logits to 1e-5 for
the outputs named; files the suite does not know are refused with the list of known layouts."""
import re

import numpy as np
import pytest
import torch
from torch import nn

from tools.errors import UserError
from tools.files import save_torch
from tools.inference import predict
from tools.model import InputSpec, build_model, checkpoint_dict, to_model_input
from tools.model_files import (CHESTXRAY14, LAYOUT_TEXT, XRV_PATHOLOGIES, ModelRequest, choose_labels,
                               read_model_file, select_outputs)

SIZE = 64
LABELS = ["Cardiomegaly", "Edema", "Effusion"]


def _randomise_batchnorm(model: nn.Module, seed: int) -> nn.Module:
    """Running statistics away from (0, 1) so a key that lands in the wrong place shows."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def original():
    torch.manual_seed(0)
    return _randomise_batchnorm(build_model(len(LABELS), 0.2), 1)


@pytest.fixture(scope="module")
def films():
    return torch.from_numpy(np.random.default_rng(3).integers(0, 256, (4, SIZE, SIZE), dtype=np.uint8))


class _Loader:
    """One batch of films, as tools.inference.predict reads a loader."""

    def __init__(self, images):
        self.images, self.dataset = images, list(range(len(images)))

    def __iter__(self):
        yield {"image": self.images, "index": torch.arange(len(self.images))}

    def __len__(self):
        return 1


def _logits(model, films) -> np.ndarray:
    """Logits through the suite's own predict loop (its input spec, its head split)."""
    return predict(model, _Loader(films), torch.device("cpu"), "fp32")["logits"]


def _direct(model, films, spec=InputSpec()) -> np.ndarray:
    """Logits of the original model's plain forward on inputs made as the spec says."""
    with torch.inference_mode():
        return model(to_model_input(films, spec=spec)).numpy()


def _plain_state(model) -> dict:
    """torchvision's key names: the suite's head Sequential(Dropout, Linear) becomes classifier.*"""
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("classifier")}
    state["classifier.weight"] = model.classifier[1].weight.detach().clone()
    state["classifier.bias"] = model.classifier[1].bias.detach().clone()
    return state


def _spread_rows(state: dict, names: list, seed: int) -> dict:
    """The head widened to ``names`` outputs: LABELS' rows where their names are, random rows
    elsewhere."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(len(names), 1024, generator=g) * 0.05
    bias = torch.randn(len(names), generator=g)
    for j, label in enumerate(LABELS):
        weight[names.index(label)] = state["classifier.weight"][j]
        bias[names.index(label)] = state["classifier.bias"][j]
    return {**state, "classifier.weight": weight, "classifier.bias": bias}


def _old_names(state: dict) -> dict:
    """torchvision 0.3-era names: denselayer parts norm1 -> norm.1, conv2 -> conv.2."""
    return {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v for k, v in state.items()}


def _load(path, labels=LABELS, **flags):
    model, info = read_model_file(ModelRequest(str(path), **flags))
    return select_outputs(model, info, choose_labels(info, labels, LABELS)), info


def test_suite_checkpoint_gives_its_logits(original, films, tmp_path):
    save_torch(checkpoint_dict(original, LABELS, SIZE, 0.2, 3, 0.9), tmp_path / "best.pt")
    model, info = _load(tmp_path / "best.pt")
    assert (info.layout, info.model_labels, info.image_size, info.dropout) == ("suite", LABELS, SIZE, 0.2)
    np.testing.assert_allclose(_logits(model, films), _direct(original, films), atol=1e-5)


def test_torchvision_state_dict_with_extra_outputs_maps_names_to_rows(original, films, tmp_path):
    names = ["Atelectasis", "Effusion", "Mass", "Cardiomegaly", "Edema"]
    torch.save(_spread_rows(_plain_state(original), names, 4), tmp_path / "tv.pth")
    model, info = _load(tmp_path / "tv.pth", model_labels=names, image_size=SIZE)
    assert (info.layout, info.input_norm, info.input_channels) == ("torchvision", "imagenet", 3)
    np.testing.assert_allclose(_logits(model, films), _direct(original, films), atol=1e-5)
    # --labels picks and orders: Edema then Mass is output 4 then output 2 of the file
    model, _ = _load(tmp_path / "tv.pth", labels=["Edema", "Mass"], model_labels=names, image_size=SIZE)
    state = torch.load(tmp_path / "tv.pth", weights_only=True)
    full = build_model(5, 0.0)
    full.classifier[1].weight.data, full.classifier[1].bias.data = state["classifier.weight"], state["classifier.bias"]
    full.load_state_dict({k: v for k, v in state.items() if k.startswith("features")}, strict=False)
    np.testing.assert_allclose(_logits(model, films), _direct(full.eval(), films)[:, [4, 2]], atol=1e-5)


def test_torchvision_state_dict_needs_model_labels(original, tmp_path):
    torch.save(_plain_state(original), tmp_path / "tv.pth")
    with pytest.raises(UserError, match="does not name them; pass --model-labels"):
        read_model_file(ModelRequest(str(tmp_path / "tv.pth")))
    with pytest.raises(UserError, match="--model-labels names 2 outputs, .* has 3"):
        read_model_file(ModelRequest(str(tmp_path / "tv.pth"), model_labels=["A", "B"]))


def test_chexnet_layout_renamed_rekeyed_and_sigmoid_dropped(original, films, tmp_path):
    state = _old_names(_spread_rows(_plain_state(original), CHESTXRAY14, 5))
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # torch 0.3 had none
    state["classifier.0.weight"], state["classifier.0.bias"] = state.pop("classifier.weight"), state.pop("classifier.bias")
    assert any(".norm.1." in k for k in state)  # the file really has the old names
    torch.save({"epoch": 7, "arch": "DenseNet-121",
                "state_dict": {f"module.densenet121.{k}": v for k, v in state.items()}}, tmp_path / "model.pth.tar")
    model, info = _load(tmp_path / "model.pth.tar", image_size=SIZE)
    assert info.layout == "chexnet" and info.model_labels == CHESTXRAY14 and info.input_norm == "imagenet"
    assert info.labels == LABELS
    np.testing.assert_allclose(_logits(model, films), _direct(original, films), atol=1e-5)


def _xrv_file(tmp_path, seed, thresholds=None):
    """A one-channel DenseNet-121 with 18 outputs saved as a torchxrayvision state_dict."""
    torch.manual_seed(seed)
    net = _randomise_batchnorm(build_model(18, 0.0, in_channels=1), seed)
    state = _plain_state(net)
    if thresholds is not None:
        state["op_threshs"] = torch.tensor(thresholds, dtype=torch.float32)
    torch.save(state, tmp_path / "xrv.pt")
    return net


def test_xrv_layout_one_channel_and_its_scale(films, tmp_path):
    net = _xrv_file(tmp_path, 6)
    model, info = _load(tmp_path / "xrv.pt", image_size=SIZE)
    assert (info.layout, info.input_norm, info.input_channels, info.model_labels) == ("xrv", "xrv", 1, XRV_PATHOLOGIES)
    # the scale torchxrayvision's normalize gives 8-bit films: (2 x / 255 - 1) * 1024
    x = (2 * films.float() / 255 - 1) * 1024
    with torch.inference_mode():
        expected = net(x[:, None]).numpy()[:, [XRV_PATHOLOGIES.index(lbl) for lbl in LABELS]]
    np.testing.assert_allclose(_logits(model, films), expected, atol=1e-4, rtol=1e-5)


def test_xrv_operating_points_and_untrained_outputs(films, tmp_path):
    thresholds = np.linspace(0.05, 0.6, 18)
    thresholds[[1, 14]] = np.nan  # Consolidation and Lung Lesion: outputs the model was not trained on
    net = _xrv_file(tmp_path, 7, thresholds)
    model, info = _load(tmp_path / "xrv.pt", labels=["Effusion", "Atelectasis"], image_size=SIZE)
    assert info.model_labels[1] == "" and info.model_labels[14] == "" and info.output == "operating_points"
    x = (2 * films.float() / 255 - 1) * 1024
    with torch.inference_mode():
        z = net(x[:, None]).numpy()[:, [7, 0]]
    p, t = 1 / (1 + np.exp(-z)), thresholds[[7, 0]]
    mapped = np.where(p < t, p / (2 * t), 1 - (1 - p) / (2 * (1 - t)))  # torchxrayvision's op_norm
    np.testing.assert_allclose(1 / (1 + np.exp(-_logits(model, films))), mapped, atol=1e-5)
    with pytest.raises(UserError, match="Consolidation: not among the model's outputs"):
        _load(tmp_path / "xrv.pt", labels=["Consolidation"], image_size=SIZE)


def test_torchscript_with_model_labels_and_input_spec(original, films, tmp_path):
    class Probabilities(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return torch.sigmoid(self.net(x))

    example = to_model_input(films[:1])
    torch.jit.save(torch.jit.trace(original, example), tmp_path / "logits.ts")
    torch.jit.save(torch.jit.trace(Probabilities(original).eval(), example), tmp_path / "probs.ts")
    flags = {"model_labels": LABELS, "input_norm": "imagenet", "image_size": SIZE}
    model, info = _load(tmp_path / "logits.ts", labels=["Effusion", "Cardiomegaly"], **flags)
    assert info.layout == "torchscript" and not info.has_features
    np.testing.assert_allclose(_logits(model, films), _direct(original, films)[:, [2, 0]], atol=1e-5)
    model, _ = _load(tmp_path / "probs.ts", model_output="prob", **flags)
    np.testing.assert_allclose(_logits(model, films), _direct(original, films), atol=1e-3)
    with pytest.raises(UserError, match="does not name its outputs; pass --model-labels"):
        read_model_file(ModelRequest(str(tmp_path / "logits.ts")))
    with pytest.raises(UserError, match="needs its input spec: pass --input-norm"):
        read_model_file(ModelRequest(str(tmp_path / "logits.ts"), model_labels=LABELS))


def test_unknown_layouts_and_pickled_modules_are_refused(original, tmp_path):
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(UserError) as err:
        read_model_file(ModelRequest(str(tmp_path / "other.pt")))
    assert "layout not recognised" in str(err.value) and LAYOUT_TEXT in str(err.value)
    torch.save(original, tmp_path / "whole.pt")  # a pickled module: only weights_only=False could read it
    with pytest.raises(UserError, match="refused .*torch.save\\(model.state_dict\\(\\), PATH\\)"):
        read_model_file(ModelRequest(str(tmp_path / "whole.pt")))


def test_labels_the_model_lacks_print_both_lists(original, tmp_path):
    save_torch(checkpoint_dict(original, LABELS, SIZE, 0.2, 3, 0.9), tmp_path / "best.pt")
    with pytest.raises(UserError) as err:
        _load(tmp_path / "best.pt", labels=["Edema", "Pneumonia"])
    text = str(err.value)
    assert "--labels Pneumonia" in text and "--labels says Edema Pneumonia" in text
    assert "has Cardiomegaly Edema Effusion" in text


@pytest.mark.parametrize("layout", ["torchvision", "chexnet", "xrv", "torchscript"])
def test_export_writes_a_file_each_layout_reads_back(original, films, tmp_path, layout):
    from tools.export_model import main as export_main

    save_torch(checkpoint_dict(original, LABELS, SIZE, 0.2, 3, 0.9), tmp_path / "best.pt")
    out = tmp_path / f"model.{layout}"
    assert export_main(["--weights", str(tmp_path / "best.pt"), "--layout", layout, "--out", str(out)]) == 0
    flags = {"image_size": SIZE}
    if layout in ("torchvision", "torchscript"):
        flags["model_labels"] = LABELS
    if layout == "torchscript":
        flags["input_norm"] = "imagenet"
    model, info = _load(out, **flags)
    assert info.layout == layout
    expected = _direct(original, films)
    if layout == "xrv":  # the converted stem differs only where the first convolution pads
        got = _logits(model, films)
        assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.99
        assert np.abs(got - expected).mean() < 0.1 * np.abs(expected).mean()
    else:
        np.testing.assert_allclose(_logits(model, films), expected, atol=1e-5)
