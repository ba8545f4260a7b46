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

def logits_from_predictions(files, data: SplitData, labels) -> np.ndarray | None:
    """Logits of ``data``'s rows from predictions CSVs written by eval (matched by image_path),
    so a later stage does not run the model again. None when the files hold none of the rows."""
    if not files:
        return None
    frames = []
    for f in files:
        if not Path(f).is_file():
            raise UserError(f"--predictions {f}: file not found; pass predictions_<split>.csv written by eval")
        frames.append(pd.read_csv(f))
    preds = pd.concat(frames, ignore_index=True).drop_duplicates("image_path", keep="last").set_index("image_path")
    cols = [f"{label}_logit" for label in labels]
    missing = [c for c in cols if c not in preds.columns]
    if missing:
        raise UserError(f"--predictions: column(s) {', '.join(missing)} not found; pass files written by eval "
                        "with the same labels")
    found = data.df["image_path"].astype(str).isin(preds.index)
    if not found.any():
        return None
    if not found.all():
        raise UserError(f"--predictions: {int((~found).sum())} of {len(found)} rows of split {data.name} are not in "
                        f"the predictions (first: {data.df['image_path'][~found].iloc[0]}); pass eval's file for this split")
    return preds.loc[data.df["image_path"].astype(str), cols].to_numpy(np.float32)


def split_logits(run: Run, model, data: SplitData, predictions, labels, features: bool = False,
                 desc: str = "predict") -> dict:
    """Logits of a split: read from the ``predictions`` CSVs when they cover it and no features
    are needed, else one clean pass."""
    if not features:
        logits = logits_from_predictions(predictions, data, labels)
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
    if not path.is_file():
        raise UserError(f"--preds {path}: file not found; pass predictions_<split>.csv written by main.py eval")
    try:
        df = pd.read_csv(path, dtype={"image_path": str})
    except pd.errors.EmptyDataError:
        raise UserError(f"--preds {path}: the file is empty; pass predictions_<split>.csv written by main.py eval") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise UserError(f"--preds {path}: not a readable CSV ({str(exc).splitlines()[0]})") from None
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
