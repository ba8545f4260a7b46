"""The data layer: read and validate an input CSV, load images, the dataset class, splits.

Input CSV contract (SPEC "Input CSV"): ``image_path`` (relative to ``--img-root`` or absolute), one
0/1 column per label (empty/NaN = unknown, masked from loss and metrics), optional ``split``
(train/val/test), optional ``patient_id``; every other column is metadata.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

from tools.errors import UserError

DEFAULT_LABELS = ["Cardiomegaly", "Edema", "Effusion"]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
# ImageNet statistics, applied to the grayscale film replicated to three channels.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ====== the table ======

def read_table(csv, labels, require_labels: bool = True) -> pd.DataFrame:
    """Read ``csv`` and validate it; return it with label columns as float (NaN = unknown).

    Raises UserError (one line naming file, column, row and value) for: a missing or empty file,
    a missing ``image_path`` or label column, a label value other than 0/1/empty, duplicated
    image paths. Rows are numbered as in a spreadsheet: the header is row 1.
    """
    df = read_csv_file(csv)
    if require_labels:
        check_label_columns(df, csv, labels)
        for label in labels:
            df[label] = parse_label_column(df[label], csv, label)
    check_image_paths(df, csv)
    return df


def read_csv_file(csv) -> pd.DataFrame:
    """The CSV as stored, checked only for being a table with an ``image_path`` column and rows.

    The steps of :func:`read_table` are separate functions so that the data checks can run each
    one, report what fails and go on with the rest."""
    csv = Path(csv)
    if not csv.is_file():
        raise UserError(f"--csv {csv}: file not found; pass the path of the input CSV")
    try:
        df = pd.read_csv(csv, dtype={"image_path": str}, keep_default_na=True)
    except pd.errors.EmptyDataError:
        raise UserError(f"--csv {csv}: the file is empty; it needs a header with image_path and label columns") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise UserError(f"--csv {csv}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    if "image_path" not in df.columns:
        raise UserError(f"--csv {csv}: no image_path column; columns are: {', '.join(map(str, df.columns))}")
    if len(df) == 0:
        raise UserError(f"--csv {csv}: the table has a header but no rows")
    return df


def check_label_columns(df: pd.DataFrame, csv, labels) -> None:
    """Every label has a column; the error lists the columns there are."""
    missing = [label for label in labels if label not in df.columns]
    if missing:
        raise UserError(
            f"--csv {csv}: label column(s) {', '.join(missing)} not found (check --labels); "
            f"columns are: {', '.join(map(str, df.columns))}"
        )


def check_image_paths(df: pd.DataFrame, csv) -> None:
    """No empty ``image_path`` and no path listed twice."""
    blank = df["image_path"].isna() | (df["image_path"].astype(str).str.strip() == "")
    if blank.any():
        row = int(np.flatnonzero(blank.to_numpy())[0]) + 2
        raise UserError(f"--csv {csv}: column image_path, row {row}: empty path")
    dup = df["image_path"].duplicated(keep=False)
    if dup.any():
        rows = np.flatnonzero(dup.to_numpy())[:2] + 2
        value = df["image_path"].iloc[rows[0] - 2]
        raise UserError(
            f"--csv {csv}: column image_path, rows {rows[0]} and {rows[1]}: duplicated path {value!r} "
            f"({int(dup.sum())} rows share a path); each image must appear once"
        )


def parse_label_column(column: pd.Series, csv, label: str) -> pd.Series:
    """0/1 (also '0.0'/'1.0', True/False) to float; empty/NaN to NaN; anything else is an error."""
    text = column.astype(str).str.strip().str.lower()
    mapping = {"0": 0.0, "1": 1.0, "0.0": 0.0, "1.0": 1.0, "false": 0.0, "true": 1.0,
               "nan": np.nan, "": np.nan, "none": np.nan}
    parsed = text.map(mapping)
    bad = ~text.isin(mapping.keys())
    if bad.any():
        pos = int(np.flatnonzero(bad.to_numpy())[0])
        raise UserError(
            f"--csv {csv}: column {label}, row {pos + 2}: value {str(column.iloc[pos])!r} is not 0, 1 or empty "
            f"({int(bad.sum())} such rows); use 1 = present, 0 = absent, empty = unknown"
        )
    return parsed.astype(float)


def select_split(df: pd.DataFrame, split: str | None, csv) -> pd.DataFrame:
    """Rows of ``split`` (index reset). Without a ``split`` column, every row is used."""
    if split is None or "split" not in df.columns:
        return df.reset_index(drop=True)
    rows = df[df["split"].astype(str) == split]
    if len(rows) == 0:
        present = sorted(df["split"].dropna().astype(str).unique())
        raise UserError(
            f"--csv {csv}: split {split!r} has no rows; splits present: {', '.join(present) or 'none'} "
            "(choose one with --split, or make splits with train --auto-split)"
        )
    return rows.reset_index(drop=True)


def label_matrix(df: pd.DataFrame, labels) -> np.ndarray:
    """(N, L) float32 with NaN for unknown."""
    return df[list(labels)].to_numpy(dtype=np.float32)


def resolve_paths(df: pd.DataFrame, img_root) -> list[str]:
    root = Path(img_root)
    return [str(p if Path(p).is_absolute() else root / p) for p in df["image_path"].astype(str)]


def check_images_exist(paths, csv, img_root) -> None:
    """All paths checked up front, before any expensive work; the first few missing are listed."""
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        shown = ", ".join(missing[:3])
        raise UserError(
            f"--csv {csv}: {len(missing)} of {len(paths)} image(s) not found under --img-root {img_root} "
            f"(first: {shown}); fix image_path or --img-root"
        )


# ====== splits ======

def auto_split(df: pd.DataFrame, fractions, seed: int) -> pd.DataFrame:
    """Assign ``split`` = train/val/test with the given fractions, grouped by ``patient_id`` when
    present (a patient never straddles splits), seeded. Returns a copy."""
    fractions = [float(f) for f in fractions]
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise UserError(
            f"--auto-split {' '.join(map(str, fractions))}: need three non-negative fractions "
            "TRAIN VAL TEST that sum to 1 (e.g. 0.7 0.1 0.2)"
        )
    groups = df["patient_id"].astype(str).to_numpy() if "patient_id" in df.columns else np.arange(len(df)).astype(str)
    unique = np.unique(groups)
    rng = np.random.default_rng(seed)
    order = unique[rng.permutation(len(unique))]
    # Assign whole patients greedily so that image counts approach the fractions.
    counts = pd.Series(groups).value_counts()
    targets = np.cumsum(fractions) * len(df)
    assignment, running = {}, 0
    for patient in order:
        split_idx = int(np.searchsorted(targets, running, side="right"))
        assignment[patient] = ("train", "val", "test")[min(split_idx, 2)]
        running += counts[patient]
    out = df.copy()
    out["split"] = [assignment[g] for g in groups]
    return out


# ====== images ======

def read_raw(path) -> np.ndarray:
    """The image as stored in the file (``cv2.IMREAD_UNCHANGED``): HxW grayscale or HxWxC BGR(A),
    uint8 or uint16. The one place files are decoded.

    Raises UserError naming the path when the file is missing, cannot be decoded, or holds a
    pixel type other than 8 or 16 bits.
    """
    data = np.fromfile(str(path), dtype=np.uint8) if Path(path).is_file() else None
    if data is None:
        raise UserError(f"image {path}: file not found")
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise UserError(f"image {path}: cannot be decoded (truncated or not a PNG/JPEG); "
                        "replace it or pass --skip-bad-images")
    if image.dtype not in (np.uint8, np.uint16):
        raise UserError(f"image {path}: unsupported pixel type {image.dtype}; use 8- or 16-bit PNG or JPEG")
    return image


def load_image(path) -> np.ndarray:
    """Read any PNG/JPEG (8- or 16-bit grayscale, RGB, RGBA; any size) as uint8 grayscale HxW.

    16-bit films are scaled by their bit depth: 12-bit data (max <= 4095) by 4095, otherwise by
    65535, so intensities keep their meaning across images (no per-image stretching).
    Raises UserError naming the path when the file cannot be decoded.
    """
    image = read_raw(path)
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        image = cv2.cvtColor(image, code)
    if image.dtype == np.uint16:
        scale = 4095.0 if image.max() <= 4095 else 65535.0
        image = np.clip(np.rint(image.astype(np.float32) * (255.0 / scale)), 0, 255).astype(np.uint8)
    return image


def letterbox(image: np.ndarray, size: int) -> np.ndarray:
    """Aspect-preserving resize so the longer side is ``size``, centred on a black square."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (nw, nh), interpolation=interp) if (nh, nw) != (h, w) else image
    out = np.zeros((size, size), dtype=np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = resized
    return out


def content_box(images: np.ndarray) -> np.ndarray:
    """Boolean mask (N, S, S) of each letterboxed uint8 image's content, i.e. without the black
    padding that :func:`letterbox` adds: whole rows (top and bottom) or whole columns (left and
    right) of zeros. The content is the box from the first to the last row and column holding a
    non-zero pixel; zero pixels inside it count. A film whose own outermost lines are entirely
    black loses those lines too (they cannot be told apart). An all-black image has no content."""
    nonzero = np.asarray(images) > 0
    _, h, w = nonzero.shape
    rows_any, cols_any = nonzero.any(axis=2), nonzero.any(axis=1)

    def span(any_line: np.ndarray, length: int) -> np.ndarray:
        first = np.argmax(any_line, axis=1)
        last = length - 1 - np.argmax(any_line[:, ::-1], axis=1)
        idx = np.arange(length)
        return (idx >= first[:, None]) & (idx <= last[:, None]) & any_line.any(axis=1)[:, None]

    return span(rows_any, h)[:, :, None] & span(cols_any, w)[:, None, :]


def content_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (population) standard deviation of each letterboxed uint8 image (N, S, S) over its
    :func:`content_box`. An all-black image gives NaN."""
    box = content_box(images)
    count = box.sum(axis=(1, 2)).astype(float)
    pixels = np.asarray(images).astype(float)
    total = np.where(box, pixels, 0.0).sum(axis=(1, 2))
    squares = np.where(box, pixels * pixels, 0.0).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        var = np.maximum(squares / count - mean * mean, 0.0)
    return mean, np.sqrt(var)


# ====== augmentation ======

def mild_augment(image: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Anatomically sane augmentation: small rotation (+/-7 deg), scale (+/-8%), shift (+/-5%),
    brightness/contrast (+/-10%). No horizontal flip: the heart is on the patient's left."""
    h, w = image.shape
    angle = rng.uniform(-7, 7) * strength
    scale = 1.0 + rng.uniform(-0.08, 0.08) * strength
    tx, ty = rng.uniform(-0.05, 0.05, size=2) * strength * np.array([w, h])
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    matrix[:, 2] += (tx, ty)
    out = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    alpha = 1.0 + rng.uniform(-0.1, 0.1) * strength
    beta = rng.uniform(-0.1, 0.1) * strength * 255
    return np.clip(out.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


class SeededAugment:
    """``mild_augment`` with a generator derived from (seed, stream, draw, row index) only, so a
    draw is the same for any batch size, worker count or number of processes. Training uses
    stream 0 with draw = epoch; test-time augmentation stream 1 with draw = sample number."""

    def __init__(self, seed: int, stream: int, draw: int = 0):
        self.seed, self.stream, self.draw = int(seed), int(stream), int(draw)

    def __call__(self, image: np.ndarray, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.stream, self.draw, int(index)])
        return mild_augment(image, rng)


def to_model_input(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 (B, H, W) -> float (B, 3, H, W), grayscale replicated, ImageNet-normalised.

    Done on the model's device, so loaders move uint8 (4x less data than float)."""
    x = images.float().div_(255.0).unsqueeze(1)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# ====== the dataset ======

class CXRDataset(torch.utils.data.Dataset):
    """Chest films of one table, rows aligned with the table.

    Item ``i`` is a dict: ``image`` uint8 tensor (size, size) (letterboxed, grayscale),
    ``labels`` float32 tensor (L,) with NaN for unknown, ``index`` = i (the row position, used to
    gather results in row order and to seed per-image randomness).

    ``source`` gives the letterboxed uint8 image for a row: a ``tools.cache.ImageStore`` (decoded
    once, memory-mapped) or, by default, decoding the file each time.
    ``transform(image, index) -> image`` runs on the uint8 image at model resolution
    (augmentation, a corruption, a TTA draw).
    """

    def __init__(self, paths, y: np.ndarray | None, image_size: int, transform=None, source=None):
        self.paths = list(paths)
        self.y = np.full((len(self.paths), 0), np.nan, np.float32) if y is None else np.asarray(y, np.float32)
        self.image_size = int(image_size)
        self.transform = transform
        self.source = source

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, index: int) -> np.ndarray:
        if self.source is not None:
            return self.source[index]
        return letterbox(load_image(self.paths[index]), self.image_size)

    def __getitem__(self, index: int) -> dict:
        image = self.image(index)
        if self.transform is not None:
            image = self.transform(image, index)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)),
            "labels": torch.from_numpy(self.y[index]),
            "index": index,
        }
