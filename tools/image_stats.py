"""Intensity statistics of decoded films: per image (mean and spread over the film's content,
without the letterbox padding; simple quality flags) and per group of a metadata column.
Intensities are those of the decoded-image store (letterboxed, 0-255), the pixels the model sees.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from tools import dicom
from tools.dataset import content_box, content_stats
from tools.errors import UserError
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


# bits per sample of a PIL image mode ("I;16" and its byte orders are 16-bit grayscale)
_MODE_BITS = {"1": 1, "L": 8, "P": 8, "LA": 8, "RGB": 8, "RGBA": 8, "YCbCr": 8, "I": 32, "F": 32}
PROPERTIES = ("brightness", "contrast", "sharpness", "original_height", "original_width", "bit_depth", "file_format")


def image_properties(paths, store) -> pd.DataFrame:
    """Per image, what describes a film besides its content: ``brightness`` and ``contrast``
    (mean and standard deviation of the pixels the model sees, over the film's content without the
    letterbox padding), ``sharpness`` (variance of the Laplacian over that content: Pech-Pacheco et
    al. 2000), and from the file's header, read without decoding it again: ``original_height``,
    ``original_width``, ``bit_depth`` (bits per sample; BitsStored for DICOM) and ``file_format``
    (PIL's name, or DICOM)."""
    return measure_images(paths, store).drop(columns="saturated_share")


def measure_images(paths, store) -> pd.DataFrame:
    """:func:`image_properties` plus ``saturated_share`` (content pixels >= 250): one pass over
    the files' headers and the stored pixels, from which both the properties and
    :func:`quality_table` are taken."""
    import cv2
    from PIL import Image

    rows = []
    for i, path in enumerate(paths):
        h = w = bits = fmt = None
        try:
            if dicom.is_dicom(path):
                header = dicom.read_header(path)  # stops before the pixel data
                h, w, bits, fmt = header["rows"], header["columns"], header["bits_stored"], "DICOM"
            else:
                with Image.open(path) as im:  # reads the header only
                    w, h = im.size
                    bits = 16 if im.mode.startswith("I;16") else _MODE_BITS.get(im.mode)
                    fmt = im.format
        except (OSError, UserError):
            pass
        pix = store[i]
        box = content_box(pix[None])[0]
        if not box.any():
            box = np.ones_like(box)
        content = pix[box]
        rows.append({"image_path": path, "brightness": float(content.mean()), "contrast": float(content.std()),
                     "sharpness": float(cv2.Laplacian(pix, cv2.CV_64F)[box].var()),
                     "original_height": h, "original_width": w, "bit_depth": bits, "file_format": fmt,
                     "saturated_share": float((content >= 250).mean())})
    return pd.DataFrame(rows, columns=["image_path", *PROPERTIES, "saturated_share"])


def image_quality(paths, store, image_size) -> pd.DataFrame:
    """Per image: original size, brightness, contrast, sharpness, bit depth and format
    (:func:`image_properties`) and simple flags (tiny, nearly blank, saturated, dark,
    undecodable) that often explain odd predictions."""
    return quality_table(measure_images(paths, store), store.bad, image_size)


def quality_table(m: pd.DataFrame, bad, image_size) -> pd.DataFrame:
    """:func:`image_quality` from :func:`measure_images`'s table ``m`` and the store's
    undecodable rows ``bad``."""
    h, w = m["original_height"].astype(float), m["original_width"].astype(float)
    return pd.DataFrame({
        "image_path": m["image_path"], "height": m["original_height"], "width": m["original_width"],
        "mean_intensity": m["brightness"], "std_intensity": m["contrast"], "sharpness": m["sharpness"],
        "bit_depth": m["bit_depth"], "file_format": m["file_format"],
        "flag_small": (np.fmin(h, w) < image_size).to_numpy(), "flag_low_contrast": (m["contrast"] < 10).to_numpy(),
        "flag_saturated": (m["saturated_share"] > 0.2).to_numpy(), "flag_dark": (m["brightness"] < 30).to_numpy(),
        "flag_undecodable": np.isin(np.arange(len(m)), list(bad))})
