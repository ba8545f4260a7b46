"""A split's rows, labels and decoded pixels, loaded once and shared by every pass over them.

Every image path is checked up front; pixels are decoded once (or read from the decode cache) on
rank 0 and shared with the other torchrun ranks.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from tools import distributed
from tools.cache import build_store
from tools.dataset import CXRDataset, is_image_file
from tools.errors import UserError
from tools.runtime import Run
from tools.table import (ReadRules, check_group_columns, check_images_exist, label_matrix, read_kept, resolve_paths,
                         select_split)

log = logging.getLogger("cxr")


@dataclass
class Source:
    """An input table (validated) and the folder its relative image paths start from;
    ``left_out``: the image paths of rows --views left out of it."""
    csv: str | None
    img_root: str
    table: pd.DataFrame
    left_out: list = field(default_factory=list)


def read_source(csv, img_root, labels, group_cols=(), rules: ReadRules = ReadRules()) -> Source:
    """The input CSV validated for ``labels`` (and for the ``group_cols`` it must have), read
    under ``rules`` (--uncertain, --views)."""
    table, left_out = read_kept(csv, labels, rules=rules)
    check_group_columns(table, group_cols, csv)
    return Source(csv, img_root, table, left_out)


@dataclass
class SplitData:
    """One split's rows (table order), image paths, labels (NaN unknown) and decoded pixels."""
    name: str | None
    df: pd.DataFrame
    paths: list
    y: np.ndarray | None
    store: object
    image_size: int | None = None  # the pixels' size (letterboxed squares)

    def dataset(self, transform=None) -> CXRDataset:
        return CXRDataset(self.paths, self.y, self.image_size, transform=transform, source=self.store)

    def subset(self, keep) -> SplitData:
        """Rows ``keep`` (positions, in order), renumbered from 0; their pixels are shared, not
        decoded again."""
        keep = np.asarray(keep)
        return SplitData(self.name, self.df.iloc[keep].reset_index(drop=True), [self.paths[i] for i in keep],
                         None if self.y is None else self.y[keep], RowSubset(self.store, keep), self.image_size)

    def select(self, split: str | None, csv) -> SplitData:
        """The rows of ``split`` of data loaded for every row (pixels reused, not decoded again); all
        rows, named None, when there is no split column, as :func:`tools.table.select_split` does
        (which also gives the error for a split without rows)."""
        if split is None or "split" not in self.df.columns:
            return replace(self, name=None)
        select_split(self.df, split, csv)
        keep = np.flatnonzero((self.df["split"].astype(str) == split).to_numpy())
        return replace(self.subset(keep), name=split)

    @property
    def clusters(self) -> np.ndarray:
        """Bootstrap unit: patients when ``patient_id`` exists, else single images."""
        if "patient_id" in self.df.columns:
            return self.df["patient_id"].astype(str).to_numpy()
        return np.arange(len(self.df))


class RowSubset:
    """Rows ``keep`` of a store, renumbered 0..len(keep)-1."""

    def __init__(self, store, keep):
        self.store, self.keep, self.bad = store, np.asarray(keep), []

    def __len__(self):
        return len(self.keep)

    def __getitem__(self, index):
        return self.store[int(self.keep[index])]


def shared_store(run: Run, paths, image_size: int):
    """Decoded pixels of ``paths`` for every rank: rank 0 decodes them (or finds them cached) and,
    with a cache, the other ranks map its file; without one each rank decodes for itself. DICOM
    films are read with the run's ``--dicom-window``."""
    if run.cache_dir is None:
        return build_store(paths, image_size, None, run.workers, progress=distributed.is_main(),
                           dicom_window=run.dicom_window)
    store = (build_store(paths, image_size, run.cache_dir, run.workers, progress=True, dicom_window=run.dicom_window)
             if distributed.is_main() else None)
    return distributed.broadcast_object(store)


def bad_images_text(paths, store) -> str:
    """The undecodable rows of ``store`` in words: the first file with why it could not be read
    (what it is, for a DICOM that is no film), then up to two more paths."""
    first = store.bad[0]
    why = store.errors.get(first)
    text = f"{paths[first]}: {why}" if why else paths[first]
    others = [paths[i] for i in store.bad[1:3]]
    return text + (f"; also {', '.join(others)}" if others else "")


def load_split(run: Run, source: Source, split: str | None, labels, image_size: int) -> SplitData:
    """Rows of ``split``; every image path checked up front; pixels decoded once (or read from the
    cache). Undecodable images stop the run, or with ``run.skip_bad_images`` are dropped and
    counted (in config.json)."""
    df = select_split(source.table, split, source.csv)
    paths = resolve_paths(df, source.img_root)
    check_images_exist(paths, source.csv, source.img_root)
    store = shared_store(run, paths, image_size)
    y = label_matrix(df, labels) if all(lbl in df.columns for lbl in labels) else None
    data = SplitData(split, df, paths, y, store, image_size)
    if store.bad:
        shown = bad_images_text(paths, store)
        if not run.skip_bad_images:
            raise UserError(f"--csv {source.csv}: {len(store.bad)} image(s) cannot be decoded (first: {shown}); "
                            "replace them or pass --skip-bad-images")
        log.warning("skipping %d undecodable image(s) in split %s (first: %s)", len(store.bad), split, shown)
        run.skipped[str(split)] = {"count": len(store.bad), "paths": [paths[i] for i in store.bad]}
        run.config()
        data = data.subset(np.setdiff1d(np.arange(len(df)), store.bad))
    return data


def table_split(source: Source, split: str | None, labels) -> SplitData:
    """Rows of ``split`` without their pixels: for analyses of predictions alone, where the
    images are not read and need not exist."""
    df = select_split(source.table, split, source.csv)
    return SplitData(split, df, resolve_paths(df, source.img_root), label_matrix(df, labels), None, None)


def find_images(folder) -> list[str]:
    """Every image file under ``folder`` (recursively, ``tools.dataset.is_image_file``: png, jpg,
    jpeg, dcm, and DICOM files without an extension), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--image-dir {folder}: not a directory")
    paths = sorted(str(p) for p in folder.rglob("*") if p.is_file() and is_image_file(p))
    if not paths:
        raise UserError(f"--image-dir {folder}: no .png/.jpg/.jpeg/.dcm files (nor DICOM files without an extension) "
                        "found (searched recursively)")
    return paths


def load_folder(run: Run, folder, n_labels: int, image_size: int) -> SplitData:
    """Every image under ``folder`` as an unlabelled split named ``images`` (labels all unknown)."""
    paths = find_images(folder)
    store = shared_store(run, paths, image_size)
    return SplitData("images", pd.DataFrame({"image_path": paths}), paths,
                     np.full((len(paths), n_labels), np.nan, np.float32), store, image_size)
