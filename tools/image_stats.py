"""Intensity statistics of decoded films: per image (mean and spread over the film's content,
without the letterbox padding; simple quality flags) and per group of a metadata column.
Intensities are those of the decoded-image store (letterboxed, 0-255), the pixels the model sees.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from tools.dataset import content_box, content_stats
from tools.slicing import group_values

STAT_PIXELS = 1 << 22  # pixels per vectorised block of intensity statistics (~32 MB of float64)


def image_intensity(store, n: int, image_size: int) -> pd.DataFrame:
    """``mean_intensity`` and ``std_intensity`` (``tools.dataset.content_stats``) of rows 0..n-1 of a store,
    in blocks of about STAT_PIXELS pixels so memory stays bounded at any image size."""
    step = max(1, STAT_PIXELS // (image_size * image_size))
    means, stds = [np.zeros(0)], [np.zeros(0)]
    for start in range(0, n, step):
        m, s = content_stats(np.stack([store[i] for i in range(start, min(n, start + step))]))
        means.append(m)
        stds.append(s)
    return pd.DataFrame({"mean_intensity": np.concatenate(means), "std_intensity": np.concatenate(stds)})


def brightness_stats(df: pd.DataFrame, intensity: pd.DataFrame, group_cols) -> pd.DataFrame:
    """One row per group of each column (numeric columns with many values binned, missing values
    their own group, as in the group metrics), after an "all" row: ``n`` images, the mean and the
    sample standard deviation (ddof=1) of their mean intensities, the mean of their standard
    deviations. Images without content (all black) are left out of the averages, not of ``n``."""
    def row(col, group, mask):
        m = intensity["mean_intensity"].to_numpy()[mask]
        s = intensity["std_intensity"].to_numpy()[mask]
        return {"group_col": col, "group": group, "n": int(mask.sum()),
                "mean_of_means": _nanmean(m), "std_of_means": _nanstd1(m), "mean_of_stds": _nanmean(s)}

    rows = [row("all", "all", np.ones(len(df), bool))]
    for col in group_cols:
        values, _ = group_values(df[col])
        for group in sorted(pd.unique(values), key=str):
            rows.append(row(col, str(group), values == group))
    return pd.DataFrame(rows, columns=["group_col", "group", "n", "mean_of_means", "std_of_means", "mean_of_stds"])


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if len(x) else np.nan


def _nanstd1(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.std(ddof=1)) if len(x) > 1 else np.nan


def image_quality(paths, store, image_size) -> pd.DataFrame:
    """Per image: original size, bit depth proxy, brightness, contrast and simple flags
    (tiny, nearly blank, saturated) that often explain odd predictions."""
    from PIL import Image

    rows, bad = [], set(store.bad)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:  # reads the header only: no second decode
                w, h = im.size
        except OSError:
            h = w = None
        pix = store[i]
        box = content_box(pix[None])[0]  # without the letterbox padding
        content = pix[box] if box.any() else pix.ravel()
        mean, std = float(content.mean()), float(content.std())
        rows.append({"image_path": path, "height": h, "width": w, "mean_intensity": mean, "std_intensity": std,
                     "flag_small": bool(h is not None and min(h, w) < image_size),
                     "flag_low_contrast": std < 10, "flag_saturated": float((content >= 250).mean()) > 0.2,
                     "flag_dark": mean < 30, "flag_undecodable": i in bad})
    return pd.DataFrame(rows)
