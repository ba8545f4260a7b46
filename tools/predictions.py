"""The predictions CSV, in one place: its columns, writing it, and reading it back.

``predictions_<split>.csv`` holds every input column of the split's rows, then ``<L>_logit`` and
``<L>_prob`` per label L; calibrate's ``predictions_calibrated_<split>.csv`` adds
``<L>_prob_uncal`` (the model's own probability, ``<L>_prob`` being the calibrated one) and the
spread columns ``<L>_mc_mean``, ``<L>_mc_std``, ``<L>_tta_mean``, ``<L>_tta_std``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from tools.errors import UserError
from tools.inference import clean_pass
from tools.runtime import Run
from tools.splits import SplitData
from tools.table import read_csv_at

log = logging.getLogger("cxr")

# A confidence signal -> the column suffix it is read from in predictions_calibrated_<split>.csv.
SIGNAL_COLUMNS = {"maxprob": "prob_uncal", "calibrated": "prob", "mc_std": "mc_std", "tta_std": "tta_std"}


# ====== writing ======

def predictions_frame(df: pd.DataFrame, labels, logits, probs, extra: dict | None = None) -> pd.DataFrame:
    """All input columns of the rows, then ``<L>_logit`` and ``<L>_prob`` per label (and extras)."""
    out = df.copy()
    for j, label in enumerate(labels):
        out[f"{label}_logit"] = logits[:, j]
        out[f"{label}_prob"] = probs[:, j]
    for name, values in (extra or {}).items():
        out[name] = values
    return out


def spread_columns(label: str, j: int, mc: dict | None, tta: dict | None) -> dict:
    """Columns of label ``label`` (column ``j``): ``<L>_mc_mean``, ``<L>_mc_std``, ``<L>_tta_mean``,
    ``<L>_tta_std`` for the spreads that were computed (``tools.uncertainty.spread_stats``)."""
    columns = {}
    for name, stats in (("mc", mc), ("tta", tta)):
        if stats is not None:
            columns[f"{label}_{name}_mean"], columns[f"{label}_{name}_std"] = stats["mean"][:, j], stats["std"][:, j]
    return columns


# ====== reading back ======

PROB_CLIP = 1e-7


def _read_prediction_file(path) -> pd.DataFrame:
    df = read_csv_at(path, "--predictions", "pass a CSV with image_path and <label>_prob or <label>_logit columns "
                     "(eval writes predictions_<split>.csv)", image_path=True)
    return df.assign(_file=str(path), _row=np.arange(len(df)) + 2)


def predicted_labels(files) -> list:
    """Labels L with a ``<L>_prob`` or ``<L>_logit`` column in the first predictions file."""
    columns = pd.read_csv(files[0], nrows=0).columns if Path(files[0]).is_file() else []
    found = []
    for col in map(str, columns):
        for suffix in ("_logit", "_prob"):
            if col.endswith(suffix) and col[: -len(suffix)] not in found:
                found.append(col[: -len(suffix)])
    return found


def read_logits(files, labels, pred_format: str | None = None) -> tuple[pd.DataFrame, str]:
    """(logits of ``labels`` indexed by image_path, the format read) from predictions CSVs: one
    per split or one for all. ``pred_format`` prob or logit picks ``<L>_prob`` or ``<L>_logit``
    columns (default: logits when every label has them, else probabilities); probabilities become
    logits with clipping at 1e-7. Every value is checked (a probability in [0, 1], a finite
    logit), and an image listed twice is an error."""
    frame = pd.concat([_read_prediction_file(f) for f in files], ignore_index=True)
    if pred_format is None:
        pred_format = "logit" if all(f"{lbl}_logit" in frame.columns for lbl in labels) else "prob"
    cols = [f"{lbl}_{pred_format}" for lbl in labels]
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise UserError(f"--predictions {' '.join(map(str, files))}: column(s) {', '.join(missing)} not found "
                        f"(--pred-format {pred_format}); columns are: {', '.join(c for c in frame.columns if c[0] != '_')}")
    dup = frame["image_path"].duplicated(keep=False)
    if dup.any():
        first = frame[dup].iloc[:2]
        where = " and ".join(f"{f} row {r}" for f, r in zip(first["_file"], first["_row"]))
        raise UserError(f"--predictions: image {first['image_path'].iloc[0]} has two predictions ({where}); "
                        f"{int(dup.sum())} rows are repeated, keep one per image")
    out = pd.DataFrame(index=frame["image_path"].astype(str))
    for label, col in zip(labels, cols):
        values = pd.to_numeric(frame[col], errors="coerce").to_numpy(float)
        ok = np.isfinite(values) & ((values >= 0) & (values <= 1) if pred_format == "prob" else True)
        if not ok.all():
            pos = int(np.flatnonzero(~ok)[0])
            allowed = "a probability in [0, 1]" if pred_format == "prob" else "a finite number"
            raise UserError(f"--predictions {frame['_file'].iloc[pos]}: column {col}, row {frame['_row'].iloc[pos]}: "
                            f"value {frame[col].iloc[pos]!r} is not {allowed} ({int((~ok).sum())} such rows)")
        if pred_format == "prob":
            values = np.clip(values, PROB_CLIP, 1 - PROB_CLIP)
            values = np.log(values) - np.log1p(-values)
        out[label] = values
    return out, pred_format


def unmatched(paths, index, limit: int = 3) -> tuple[int, list]:
    """(how many of ``paths`` are not in ``index``, the first ``limit`` of them)."""
    missing = ~pd.Index(paths).isin(index)
    return int(missing.sum()), list(pd.Index(paths)[missing][:limit])


def logits_of_rows(preds: pd.DataFrame, data: SplitData, labels, required: bool = True) -> np.ndarray | None:
    """Logits of ``data``'s rows (matched by image_path) from :func:`read_logits`' table. A row
    without a prediction is an error (both counts and the first ones); with ``required`` False,
    a split the predictions hold none of gives None instead (the model runs on it)."""
    paths = data.df["image_path"].astype(str)
    count, first = unmatched(paths, preds.index)
    if count == len(paths) and not required:
        return None
    if count:
        raise UserError(f"--predictions: {count} of {len(paths)} rows of split {data.name} have no prediction "
                        f"(first: {', '.join(first)}); the predictions hold {len(preds)} rows; pass predictions "
                        "for every row of the split")
    return preds.loc[paths, list(labels)].to_numpy(np.float32)


def split_logits(run: Run, model, data: SplitData, predictions: pd.DataFrame | None, labels,
                 features: bool = False, desc: str = "predict") -> dict:
    """Logits of a split: from ``predictions`` (:func:`read_logits`) when they hold its rows and
    no features are needed, else one clean pass; without a model they must hold every row."""
    if predictions is not None and (not features or model is None):
        logits = logits_of_rows(predictions, data, labels, required=model is None)
        if logits is not None:
            log.info("split %s: logits read from --predictions (no model pass)", data.name)
            return {"logits": logits}
    return clean_pass(run, model, data, features=features, desc=desc)


def signal_columns(df: pd.DataFrame, path, labels, signal: str) -> np.ndarray:
    """(N, L) values of a confidence signal's columns in calibrate's CSV (``SIGNAL_COLUMNS``)."""
    cols = [f"{lbl}_{SIGNAL_COLUMNS[signal]}" for lbl in labels]
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise UserError(f"--calibrated {path}: column(s) {', '.join(missing)} not found; rerun calibrate "
                        f"with the sampler for {signal} turned on")
    return df[cols].to_numpy(float)


def read_predictions(path, labels, label) -> pd.DataFrame:
    """The predictions CSV, validated: ``image_path``, the ``label`` column (0/1/empty) and
    ``<L>_prob`` in [0, 1] for every label L. Label and probability columns come back as float."""
    path = Path(path)
    where = "pass predictions_<split>.csv written by main.py eval"
    df = read_csv_at(path, "--preds", where, f"; {where}")
    needed = ["image_path", label] + [f"{lbl}_prob" for lbl in labels]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise UserError(f"--preds {path}: column(s) {', '.join(missing)} not found; it must be written by "
                        f"main.py eval with the checkpoint's labels ({' '.join(labels)})")
    if len(df) == 0:
        raise UserError(f"--preds {path}: the table has a header but no rows")
    df = df.copy()
    df[label] = _numeric_column(df, label, path, allowed="0, 1 or empty", check=lambda v: v.isin([0.0, 1.0]))
    for lbl in labels:
        col = f"{lbl}_prob"
        df[col] = _numeric_column(df, col, path, allowed="a probability in [0, 1]",
                                  check=lambda v: (v >= 0.0) & (v <= 1.0))
    return df


def _numeric_column(df, col, path, allowed, check) -> pd.Series:
    """``col`` as float (empty = NaN); a value that is not a number or fails ``check`` is an error."""
    values = pd.to_numeric(df[col], errors="coerce").astype(float)
    bad = (values.isna() & df[col].notna()) | (values.notna() & ~check(values))
    if bad.any():
        pos = int(np.flatnonzero(bad.to_numpy())[0])
        value = df[col].iloc[pos]
        value = value.item() if isinstance(value, np.generic) else value
        raise UserError(f"--preds {path}: column {col}, row {pos + 2}: value {value!r} is not "
                        f"{allowed} ({int(bad.sum())} such rows)")
    return values
