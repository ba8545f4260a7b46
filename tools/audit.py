"""What a command audits: a model in any layout ``tools.model_files`` reads, or only the
predictions some model wrote, over the rows of the input table.

Every command opens one :class:`Subject` and asks it for a split's rows and logits; the subject
knows what it can give (``missing`` says why a model pass, MC head sampling or Grad-CAM cannot
run) so each stage skips with a reason instead of failing.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import pandas as pd
from torch import nn

from tools.errors import UserError
from tools.model_files import ModelInfo, ModelRequest, load_audited_model
from tools.predictions import predicted_labels, read_logits, split_logits, unmatched
from tools.runtime import Run
from tools.splits import Source, SplitData, load_split, read_source, table_split
from tools.table import ReadRules, header, pick_labels

log = logging.getLogger("cxr")

NEEDS_MODEL = "needs the model: not run (predictions only)"
NEEDS_FEATURES = "needs the penultimate features, which a TorchScript model does not expose: not run"


@dataclass
class Subject:
    """A model (``model``, ``info``) or predictions alone (``model`` None), the analysed labels,
    the input table, and the predictions' logits by image_path when there are any."""
    model: nn.Module | None
    info: ModelInfo | None
    labels: list
    source: Source
    predictions: pd.DataFrame | None = None
    prediction_files: list | None = None
    pred_format: str | None = None

    @property
    def image_size(self) -> int | None:
        return self.info.image_size if self.info else None

    def missing(self, need: str) -> str | None:
        """Why ``need`` ("model" or "features") cannot be had; None when it can."""
        if self.model is None:
            return NEEDS_MODEL
        if need == "features" and not self.info.has_features:
            return NEEDS_FEATURES
        return None

    def split(self, run: Run, name: str | None) -> SplitData:
        """Rows of split ``name``: with their decoded pixels for a model, the table alone else."""
        if self.model is None:
            return table_split(self.source, name, self.labels)
        return load_split(run, self.source, name, self.labels, self.image_size)

    def logits(self, run: Run, data: SplitData, features: bool = False, desc: str = "predict") -> dict:
        """``logits`` (and backbone ``features`` when asked and available) of ``data``'s rows."""
        features = features and self.missing("features") is None
        return split_logits(run, self.model, data, self.predictions, self.labels, features, desc)

    def describe(self) -> dict:
        """What was audited: the file(s) and their layout."""
        if self.info is not None:
            return {"file": self.info.weights, "layout": self.info.layout}
        return {"file": " ".join(map(str, self.prediction_files)), "layout": f"predictions ({self.pred_format})"}


def open_subject(run: Run, request: ModelRequest, predictions, pred_format, csv, img_root, labels,
                 group_cols=(), compile: bool = False, rules: ReadRules = ReadRules()) -> Subject:
    """The subject of a command: ``request.weights`` when given (``predictions`` then stand in for
    its clean passes where they hold the rows), else ``predictions`` alone; the input table read
    under ``rules``. Every mismatch of labels, columns and rows is found here, before any image
    is read."""
    if not csv:
        raise UserError(f"--csv is required for {run.command}: the input table with image_path and label columns")
    columns = header(csv)
    model = info = None
    if request.weights:
        model, info = load_audited_model(run, request, labels, columns, compile)
        labels = info.labels
    elif predictions:
        labels = _predicted_labels(predictions, labels, columns)
    else:
        raise UserError(f"{run.command} needs a model or its predictions: pass --weights (a model file) or "
                        "--predictions CSV")
    source = read_source(csv, img_root, labels, group_cols, rules)
    preds = fmt = None
    if predictions:
        preds, fmt = read_logits(predictions, labels, pred_format)
        if model is None:
            rows = pd.concat([source.table["image_path"].astype(str), pd.Series(source.left_out, dtype=str)])
            count, first = unmatched(preds.index, rows)
            if count:
                raise UserError(f"--predictions: {count} of {len(preds)} predicted images are not rows of --csv {csv} "
                                f"(first: {', '.join(first)}); its {len(source.table)} rows must list every image")
            run.config(model_layout="predictions", predictions=[str(p) for p in predictions], pred_format=fmt,
                       labels=list(labels))
            log.info("predictions only (%s): %d rows, labels %s; analyses that need the model are not run",
                     fmt, len(preds), " ".join(labels))
    return Subject(model, info, list(labels), source, preds, predictions, fmt)


def _predicted_labels(files, requested, columns) -> list:
    """The analysed labels of predictions: ``--labels``, else every predicted label that the
    input table has a column for."""
    available = predicted_labels(files)
    return pick_labels(available, requested, columns,
                       lacking=f"no <label>_prob/_logit column in --predictions {files[0]}",
                       holder="the predictions have",
                       none_in_data=f"--predictions {files[0]}: none of its labels ({' '.join(available) or 'none'}) "
                                    "is a column of --csv; pass --labels")
