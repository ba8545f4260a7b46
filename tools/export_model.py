"""Write a checkpoint of this suite in another layout ``--weights`` reads, to share a model with
tools that expect those layouts or to try the suite's model-audit path on the demo data.

    python -m tools.export_model --weights outputs/demo/train/best.pt --layout chexnet --out m.pth.tar

Layouts (``tools.model_files`` describes each):

- ``torchvision``: a plain state_dict (``features.*``, ``classifier.weight/bias``); outputs in the
  checkpoint's label order, named with ``--model-labels`` when read back. Same logits.
- ``chexnet``: ``{"state_dict": ...}``, keys ``module.densenet121.*`` with torchvision 0.3-era names,
  14 outputs in ChestX-ray14 order (outputs the checkpoint lacks are zero rows; a label outside
  that list is an error). Same logits for the checkpoint's labels.
- ``xrv``: torchxrayvision's 18 outputs, a one-channel stem for inputs on [-1024, 1024], and
  ``op_threshs`` NaN for outputs the checkpoint lacks (its own outputs get 0.5, which leaves
  their probabilities unchanged). The stem is converted from the three-channel ImageNet-normalised
  one (weights summed and rescaled, the mean folded in); only the first convolution's zero
  padding differs, so the logits are close, not equal.
- ``torchscript``: the model traced at the checkpoint's image size; inputs ImageNet-normalised RGB.
  Same logits.
"""
from __future__ import annotations

import argparse
import re
import sys
import warnings
from pathlib import Path

import torch

from tools.cli import guarded
from tools.errors import UserError
from tools.files import save_torch
from tools.model import IMAGENET_MEAN, IMAGENET_STD, to_model_input
from tools.model_files import CHESTXRAY14, XRV_PATHOLOGIES, load_model
from tools.model_files import LAYOUTS as READ_LAYOUTS

PROG = "python -m tools.export_model"
LAYOUTS = tuple(layout for layout in READ_LAYOUTS if layout != "suite")


def _plain(model) -> tuple[dict, torch.Tensor, torch.Tensor]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("features.")}
    return state, model.classifier[1].weight.detach().clone(), model.classifier[1].bias.detach().clone()


def _widen(weight, bias, labels, names: list, target: str):
    """The head's rows placed at ``names``' positions (zero rows elsewhere)."""
    missing = [lbl for lbl in labels if lbl not in names]
    if missing:
        raise UserError(f"--layout {target}: label(s) {', '.join(missing)} are not among its outputs "
                        f"({', '.join(n for n in names if n)}); use --layout torchvision or torchscript")
    wide_w, wide_b = torch.zeros(len(names), weight.shape[1]), torch.zeros(len(names))
    for j, label in enumerate(labels):
        wide_w[names.index(label)], wide_b[names.index(label)] = weight[j], bias[j]
    return wide_w, wide_b


def _old_names(state: dict) -> dict:
    """torchvision 0.3-era dense-layer names (``norm1`` -> ``norm.1``), as CheXNet files have them."""
    return {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v for k, v in state.items()}


def _xrv_stem(conv0: torch.Tensor) -> torch.Tensor:
    """(64, 1, 7, 7) weights on x in [-1024, 1024] from (64, 3, 7, 7) weights on the ImageNet-
    normalised film: u = (x + 1024) / 2048, channel c = (u - mean_c) / std_c. The constant part
    is left to the caller, which folds it into norm0's running mean."""
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (conv0 / std).sum(1, keepdim=True) / 2048.0


def export(weights, layout: str, out) -> Path:
    model, info = load_model(weights)
    if info.layout != "suite":
        raise UserError(f"--weights {weights}: a {info.layout} file; export takes this suite's checkpoints")
    labels, out = info.labels, Path(out)
    state, weight, bias = _plain(model)
    if layout == "torchvision":
        save_torch({**state, "classifier.weight": weight, "classifier.bias": bias}, out)
    elif layout == "chexnet":
        wide_w, wide_b = _widen(weight, bias, labels, CHESTXRAY14, layout)
        keys = {**_old_names(state), "classifier.0.weight": wide_w, "classifier.0.bias": wide_b}
        save_torch({"state_dict": {f"module.densenet121.{k}": v for k, v in keys.items()}}, out)
    elif layout == "xrv":
        wide_w, wide_b = _widen(weight, bias, labels, XRV_PATHOLOGIES, layout)
        state = dict(state)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        conv0 = state["features.conv0.weight"]
        # u = (x + 1024) / 2048: the offset 1024/2048 - mean_c, through conv0, shifts norm0's input;
        # fold it into norm0's running mean (exact away from the padded border)
        offset = ((0.5 - mean) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * conv0).sum((1, 2, 3))
        state["features.norm0.running_mean"] = state["features.norm0.running_mean"] - offset
        state["features.conv0.weight"] = _xrv_stem(conv0)
        thresholds = torch.full((len(XRV_PATHOLOGIES),), float("nan"))
        thresholds[[XRV_PATHOLOGIES.index(lbl) for lbl in labels]] = 0.5
        save_torch({**state, "classifier.weight": wide_w, "classifier.bias": wide_b, "op_threshs": thresholds}, out)
    else:
        example = to_model_input(torch.zeros(1, info.image_size, info.image_size, dtype=torch.uint8))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            traced = torch.jit.trace(model.eval(), example)
            out.parent.mkdir(parents=True, exist_ok=True)
            torch.jit.save(traced, str(out))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="a checkpoint written by main.py train (best.pt)")
    parser.add_argument("--layout", required=True, choices=LAYOUTS)
    parser.add_argument("--out", required=True, help="the file to write")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    args = parser.parse_args(argv)

    def run(a):
        path = export(a.weights, a.layout, a.out)
        print(f"{PROG}: {a.weights} -> {path} ({a.layout} layout)")

    return guarded(PROG, run, args, None)


if __name__ == "__main__":
    sys.exit(main())
