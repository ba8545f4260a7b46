"""Every model file ``--weights`` takes, recognised from its keys, and the record of what was found.

Layouts (``LAYOUTS``):

- ``suite``: this suite's checkpoint (``model``, ``labels``, ``arch``, ``image_size``, ...).
- ``torchvision``: a plain DenseNet-121 ``state_dict`` (``features.*``, ``classifier.weight/bias``);
  ``--model-labels`` names its outputs.
- ``chexnet``: the ``model.pth.tar`` layout of CheXNet re-implementations: ``{"state_dict": ...}``
  with keys prefixed ``module.densenet121.``, a ``Sequential(Linear(1024, 14), Sigmoid)`` head
  (``classifier.0.*``) and torchvision 0.3-era names (``norm.1``); 14 outputs in ChestX-ray14
  order, ImageNet-normalised RGB at 224 px. The sigmoid is dropped: the Linear's outputs are the
  logits.
- ``xrv``: a torchxrayvision DenseNet-121 ``state_dict``: one input channel (``features.conv0``
  takes 1), inputs on [-1024, 1024], 224 px, 18 outputs named by its pathology list, and the
  per-output ``op_threshs`` buffer. With thresholds the outputs are mapped as torchxrayvision's
  forward maps them (:class:`tools.model.OperatingPoints`); an output without a threshold (NaN)
  is one the model was not trained on and gets an empty name.
- ``torchscript``: a TorchScript archive (``torch.jit.load``); it needs ``--model-labels`` and an
  input spec, and has no penultimate features (MC head sampling and Grad-CAM are skipped).

Every file but TorchScript is read with ``torch.load(weights_only=True)``: tensors and plain
containers only, so a crafted pickle cannot run code. A TorchScript archive is a program: load
only files from a source you trust.

Every DenseNet-121 layout is rebuilt as this suite's model (``tools.model.build_model``), with the
head's rows cut to the analysed labels, so every analysis works on it unchanged.
"""
from __future__ import annotations

import logging
import warnings
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from tools.errors import UserError
from tools.model import (ARCH, FEATURE_DIM, INPUT_NORMS, InputSpec, OperatingPoints, build_model,
                         modern_densenet_keys, prepare_model)
from tools.runtime import Run
from tools.table import pick_labels

log = logging.getLogger("cxr")

LAYOUTS = ("suite", "torchvision", "chexnet", "xrv", "torchscript")
LAYOUT_TEXT = ("this suite's checkpoint (best.pt/last.pt), a torchvision DenseNet-121 state_dict, the CheXNet "
               "model.pth.tar layout, a torchxrayvision DenseNet-121 state_dict, or a TorchScript archive")
# CheXNet's 14 outputs, in ChestX-ray14 order.
CHESTXRAY14 = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
               "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]
# torchxrayvision's default pathology list (its datasets.default_pathologies): the 18 outputs.
XRV_PATHOLOGIES = ["Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema",
                   "Fibrosis", "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass",
                   "Hernia", "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum"]
# Defaults of each layout: (input norm, channels, image size); None = must be given.
LAYOUT_INPUT = {"suite": ("imagenet", 3, None), "torchvision": ("imagenet", 3, 224), "chexnet": ("imagenet", 3, 224),
                "xrv": ("xrv", 1, 224), "torchscript": (None, None, None)}
# Dropout before the head for MC head sampling of a model trained without one.
DEFAULT_MC_DROPOUT = 0.2


@dataclass
class ModelRequest:
    """What the user said about the model (main.py's flags of the same names)."""
    weights: str | None
    model_labels: list | None = None
    image_size: int | None = None
    input_norm: str | None = None
    input_channels: int | None = None
    model_output: str | None = None   # TorchScript: logit | prob
    mc_dropout: float | None = None   # p of the dropout MC head sampling applies


@dataclass
class ModelInfo:
    """What was loaded: written to config.json and the report."""
    layout: str
    weights: str
    model_labels: list                # every output, in order ('' = an output without a name)
    input_norm: str
    input_channels: int
    image_size: int
    dropout: float                    # p of the head's dropout (MC head sampling)
    has_features: bool
    output: str = "logit"             # logit | prob | operating_points
    checkpoint: dict = field(default_factory=dict)  # this suite's checkpoint record
    notes: list = field(default_factory=list)
    labels: list = field(default_factory=list)       # the analysed outputs, in order

    @property
    def input(self) -> InputSpec:
        return InputSpec(self.input_norm, self.input_channels)

    def record(self) -> dict:
        """config.json's facts: ``model_layout``, ``model_labels``, the input spec, and the rest."""
        out = asdict(self)
        out["model_layout"] = out.pop("layout")
        out["checkpoint"] = out["checkpoint"] or None
        return out


class ScriptedModel(nn.Module):
    """A TorchScript model behind the suite's interface: ``forward`` gives the logits of the
    analysed outputs (probabilities are turned into logits, clipped at 1e-7)."""

    def __init__(self, module, output: str):
        super().__init__()
        self.module, self.output = module, output
        self.register_buffer("select", torch.zeros(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        out = out.float()
        if len(self.select):
            out = out[:, self.select.to(out.device)]
        return torch.logit(out, eps=1e-7) if self.output == "prob" else out


# ====== reading a file ======

def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names)


def _read_plain(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not plain weights"
        raise UserError(f"--weights {path}: not a plain weights file, refused ({type(exc).__name__}); only tensors "
                        "are loaded (weights_only=True). A model saved whole (torch.save(model)) must be re-saved "
                        "as torch.save(model.state_dict(), PATH)") from None


def _state_and_prefix(obj) -> tuple[dict, str] | None:
    """The tensor dict of a state_dict or a ``{"state_dict": ...}`` wrapper, with the prefix
    (``module.``, ``module.densenet121.``, ...) in front of ``features.conv0.weight`` removed."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        return None
    stem = next((k for k in obj if isinstance(k, str) and k.endswith("features.conv0.weight")), None)
    if stem is None:
        return None
    prefix = stem[: -len("features.conv0.weight")]
    return {k[len(prefix):]: v for k, v in obj.items() if k.startswith(prefix)}, prefix


def _unknown(path: Path) -> UserError:
    return UserError(f"--weights {path}: layout not recognised; known layouts: {LAYOUT_TEXT}")


def _densenet_parts(path: Path, state: dict) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(backbone state, head weight (n, 1024), head bias (n,)) of a DenseNet-121 state dict whose
    head is ``classifier``, ``classifier.0`` (CheXNet) or ``classifier.1`` (this suite)."""
    for name in ("classifier", "classifier.0", "classifier.1"):
        weight, bias = state.get(f"{name}.weight"), state.get(f"{name}.bias")
        if weight is not None and bias is not None and weight.ndim == 2:
            break
    else:
        raise UserError(f"--weights {path}: no classifier.weight/bias found (a DenseNet-121 head Linear(1024, n)); "
                        f"known layouts: {LAYOUT_TEXT}")
    if weight.shape[1] != FEATURE_DIM:
        raise UserError(f"--weights {path}: the head takes {weight.shape[1]} features, DenseNet-121 gives {FEATURE_DIM}")
    backbone = {k: v for k, v in modern_densenet_keys(state).items() if k.startswith("features.")}
    return backbone, weight.float(), bias.float()


def _output_names(path: Path, layout: str, given, n_out: int, default: list | None, blanks=()) -> list:
    """Names of the file's ``n_out`` outputs: ``--model-labels`` when given, else the layout's."""
    if given:
        if len(given) != n_out:
            raise UserError(f"--model-labels names {len(given)} outputs, {path} ({layout}) has {n_out}; "
                            "name every output in order ('' for one you do not analyse)")
        return list(given)
    if default is None or len(default) != n_out:
        raise UserError(f"--weights {path}: a {layout} file with {n_out} outputs does not name them; "
                        "pass --model-labels NAME ... (one per output, in order)")
    return ["" if i in blanks else name for i, name in enumerate(default)]


def _input_of(layout: str, request: ModelRequest, path: Path) -> tuple[str, int, int | None]:
    norm, channels, size = LAYOUT_INPUT[layout]
    norm = request.input_norm or norm
    channels = request.input_channels or channels
    size = request.image_size or size
    if layout == "torchscript" and (norm is None or size is None):
        raise UserError(f"--weights {path}: a TorchScript file needs its input spec: pass --input-norm "
                        f"({'|'.join(INPUT_NORMS)}), --image-size and, for one channel, --input-channels 1")
    return norm, channels or 3, size


def read_model_file(request: ModelRequest) -> tuple[nn.Module, ModelInfo]:
    """The model in ``request.weights`` (every output, on the CPU) and what it is."""
    path = Path(request.weights)
    if not path.is_file():
        raise UserError(f"--weights {path}: file not found; pass a checkpoint (best.pt) or a model file "
                        f"({LAYOUT_TEXT})")
    if _is_torchscript(path):
        return _torchscript(path, request)
    obj = _read_plain(path)
    if isinstance(obj, dict) and {"model", "labels", "arch"} <= set(obj):
        return _suite(path, obj, request)
    found = _state_and_prefix(obj)
    if found is None:
        raise _unknown(path)
    state, prefix = found
    backbone, weight, bias = _densenet_parts(path, state)
    in_channels = int(backbone["features.conv0.weight"].shape[1])
    thresholds = state.get("op_threshs")
    if in_channels == 1 or thresholds is not None:
        layout = "xrv"
        blanks = set(torch.nonzero(torch.isnan(thresholds.float())).flatten().tolist()) if thresholds is not None else ()
        names = _output_names(path, layout, request.model_labels, len(bias), XRV_PATHOLOGIES, blanks)
    elif "densenet121." in prefix or "classifier.0.weight" in state:
        layout = "chexnet"
        names = _output_names(path, layout, request.model_labels, len(bias), CHESTXRAY14)
    else:
        layout = "torchvision"
        if len(bias) == 1000 and not request.model_labels:
            raise UserError(f"--weights {path}: a torchvision DenseNet-121 with the 1000-class ImageNet head is not a "
                            "chest X-ray classifier; pass a fine-tuned state_dict and --model-labels")
        names = _output_names(path, layout, request.model_labels, len(bias), None)
    norm, channels, size = _input_of(layout, request, path)
    if channels != in_channels:
        raise UserError(f"--input-channels {channels}: {path} ({layout}) takes {in_channels} input channel(s)")
    p = DEFAULT_MC_DROPOUT if request.mc_dropout is None else float(request.mc_dropout)
    model = build_model(len(bias), p, in_channels=in_channels)
    missing, unexpected = model.load_state_dict({**backbone, "classifier.1.weight": weight,
                                                 "classifier.1.bias": bias}, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]  # absent from pre-0.4 files
    if missing or unexpected:
        first = (list(missing) + list(unexpected))[0]
        raise UserError(f"--weights {path}: not DenseNet-121 weights ({len(missing)} missing, {len(unexpected)} "
                        f"unexpected keys, first {first}); known layouts: {LAYOUT_TEXT}")
    output = "logit"
    notes = [f"read as {layout}" + (f" (key prefix {prefix!r} removed)" if prefix else "")]
    if layout == "chexnet":
        notes.append("the head's Sigmoid is dropped: its Linear outputs are the logits")
    if thresholds is not None:
        model.classifier.append(OperatingPoints(thresholds.float()))
        output = "operating_points"
        notes.append("outputs mapped by the file's op_threshs as torchxrayvision does (its threshold -> 0.5)")
    if request.mc_dropout is None:
        notes.append(f"trained without a head dropout: MC head sampling applies p = {p} at test time "
                     "(set with --mc-dropout)")
    info = ModelInfo(layout, str(path), names, norm, channels, size, p, True, output, notes=notes)
    return _with_spec(model, info), info


def _suite(path: Path, ckpt: dict, request: ModelRequest) -> tuple[nn.Module, ModelInfo]:
    if ckpt["arch"] != ARCH:
        raise UserError(f"--weights {path}: architecture {ckpt['arch']!r}, this suite builds {ARCH!r}")
    size = int(ckpt["image_size"])
    if request.image_size is not None and int(request.image_size) != size:
        raise UserError(f"--weights {path}: trained at --image-size {size}, asked for {request.image_size}; "
                        f"omit --image-size or pass {size}")
    for flag, value, own in (("--input-norm", request.input_norm, "imagenet"),
                             ("--input-channels", request.input_channels, 3)):
        if value is not None and value != own:
            raise UserError(f"{flag} {value}: {path} is this suite's checkpoint, trained on {flag[2:]} {own}")
    if request.model_labels and list(request.model_labels) != list(ckpt["labels"]):
        raise UserError(f"--model-labels: {path} names its outputs ({' '.join(ckpt['labels'])}); omit --model-labels")
    dropout = float(ckpt.get("dropout", 0.0)) if request.mc_dropout is None else float(request.mc_dropout)
    model = build_model(len(ckpt["labels"]), dropout)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError:
        raise UserError(f"--weights {path}: weights do not fit DenseNet-121 with {len(ckpt['labels'])} labels") from None
    record = {k: ckpt.get(k) for k in ("labels", "image_size", "arch", "dropout", "epoch", "val_macro_auroc", "data")}
    info = ModelInfo("suite", str(path), list(ckpt["labels"]), "imagenet", 3, size, dropout, True,
                     checkpoint=record, notes=["this suite's checkpoint"])
    return _with_spec(model, info), info


def _torchscript(path: Path, request: ModelRequest) -> tuple[nn.Module, ModelInfo]:
    if not request.model_labels:
        raise UserError(f"--weights {path}: a TorchScript file does not name its outputs; pass --model-labels "
                        "NAME ... (one per output, in order)")
    norm, channels, size = _input_of("torchscript", request, path)
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated upstream; its files are still what vendors ship
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any failure to read the archive is the user's file
        raise UserError(f"--weights {path}: not a loadable TorchScript archive ({type(exc).__name__})") from None
    output = request.model_output or "logit"
    model = ScriptedModel(module.eval(), output)
    with torch.inference_mode():
        probe = model(torch.zeros(1, channels, size, size))
    if probe.ndim != 2 or probe.shape[1] != len(request.model_labels):
        raise UserError(f"--model-labels names {len(request.model_labels)} outputs, {path} gives shape "
                        f"{tuple(probe.shape)} for one {channels}x{size}x{size} input")
    notes = ["TorchScript: no penultimate features, so MC head sampling and Grad-CAM case studies are not run",
             f"outputs read as {output}s"]
    info = ModelInfo("torchscript", str(path), list(request.model_labels), norm, channels, size, 0.0, False,
                     output, notes=notes)
    return _with_spec(model, info), info


def _with_spec(model: nn.Module, info: ModelInfo) -> nn.Module:
    model.input_spec = info.input
    return model.eval()


# ====== the analysed outputs ======

def choose_labels(info: ModelInfo, requested, columns) -> list:
    """The analysed labels: ``--labels`` (each must be one of the model's outputs), else the
    model's named outputs that the data has a column for (this suite's checkpoint, or ``columns``
    None for data without labels: all of them)."""
    named = [name for name in info.model_labels if name]
    return pick_labels(named, requested, None if info.layout == "suite" else columns,
                       lacking="not among the model's outputs", holder=f"{info.weights} ({info.layout}) has",
                       none_in_data=f"--weights {info.weights}: none of the model's outputs ({' '.join(named)}) is a "
                                    "column of the data; pass --labels, or --model-labels with the data's names")


def select_outputs(model: nn.Module, info: ModelInfo, labels) -> nn.Module:
    """The model cut to the outputs ``labels``, in that order."""
    index = [info.model_labels.index(label) for label in labels]
    info.labels = list(labels)
    if index == list(range(len(info.model_labels))):
        return model
    if isinstance(model, ScriptedModel):
        model.select = torch.tensor(index, dtype=torch.long)
        return model
    rows = torch.tensor(index, dtype=torch.long)
    linear = model.classifier[1]
    cut = nn.Linear(FEATURE_DIM, len(index))
    with torch.no_grad():
        cut.weight.copy_(linear.weight[rows])
        cut.bias.copy_(linear.bias[rows])
    model.classifier[1] = cut
    if len(model.classifier) > 2:
        model.classifier[2] = OperatingPoints(model.classifier[2].thresholds[rows])
    return model


def load_model(path, labels=None) -> tuple[nn.Module, ModelInfo]:
    """The model in ``path`` (any layout; this suite's checkpoint needs nothing else) on the CPU,
    cut to ``labels`` (default: every named output)."""
    model, info = read_model_file(ModelRequest(str(path)))
    return select_outputs(model, info, choose_labels(info, labels, None)), info


def load_audited_model(run: Run, request: ModelRequest, labels, columns, compile: bool = False):
    """(model on the run's device, its :class:`ModelInfo`) for ``labels`` (or the outputs the
    data has a column for); the record goes into config.json."""
    if not request.weights:
        raise UserError(f"--weights is required for {run.command}: pass a checkpoint (best.pt) or a model file, "
                        "or --predictions CSV to analyse predictions without a model")
    model, info = read_model_file(request)
    model = select_outputs(model, info, choose_labels(info, labels, columns))
    if info.layout != "suite":  # this suite's own checkpoints load as they always have, silently
        for note in info.notes[1:]:
            log.info("model: %s", note)
        log.info("model: %s layout, %d of %d outputs analysed (%s), input %s x%d at %d px", info.layout,
                 len(info.labels), len(info.model_labels), " ".join(info.labels), info.input_norm,
                 info.input_channels, info.image_size)
    run.config(**info.record())
    compile = compile and info.has_features
    return prepare_model(model, run.device, channels_last=info.has_features, compile=compile), info

