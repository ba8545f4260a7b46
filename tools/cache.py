"""Decode each image once: letterboxed uint8 pixels at model resolution, reused by every pass.

With a cache directory the pixels live in a memory-mapped ``.npy`` file keyed by the image paths,
their modification times and sizes, the image size and the DICOM window mode (``--dicom-window``),
so every later command on the same rows reuses it; a changed file, size or window mode changes
the key. Without one they are kept in memory for the run.
Reading a cached 224 px image costs microseconds; decoding a 1024x1024 PNG costs milliseconds.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from tools.dataset import CXRDataset, worker_init
from tools.errors import ImageError, UserError


def cache_key(paths, image_size: int, dicom_window: str = "file") -> str:
    # v2: deeper-than-8-bit films are letterboxed in float (pixels of v1 caches differ for them)
    digest = hashlib.sha1(f"v2 {int(image_size)} {dicom_window}".encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"\n{os.path.abspath(path)}\t{stat.st_mtime_ns}\t{stat.st_size}".encode())
    return digest.hexdigest()[:24]


class ImageStore:
    """Row ``i`` -> letterboxed uint8 image (size, size). Build with :func:`build_store`.
    ``bad``: the rows that could not be read; ``errors``: row -> why (what the file is)."""

    def __init__(self, array: np.ndarray | None, path: Path | None, bad: list[int], errors: dict | None = None):
        self._array = array
        self.path = path
        self.bad = bad
        self.errors = errors or {}

    def _pixels(self) -> np.ndarray:
        if self._array is None:  # opened lazily, so each DataLoader worker maps the file itself
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def __len__(self) -> int:
        return len(self._pixels())

    def __getitem__(self, index: int) -> np.ndarray:
        return np.array(self._pixels()[index])  # a writable copy: torch refuses read-only arrays

    def __getstate__(self):
        state = dict(self.__dict__)
        if self.path is not None:
            state["_array"] = None
        return state


class _Safe(CXRDataset):
    """Items that never raise for a bad file: a black image, index -1 - row and the reason."""

    def __getitem__(self, index):
        try:
            return {**super().__getitem__(index), "error": ""}
        except UserError as exc:
            return {"image": torch.zeros(self.image_size, self.image_size, dtype=torch.uint8),
                    "labels": torch.zeros(0), "index": -1 - index,
                    "error": exc.reason if isinstance(exc, ImageError) else str(exc)}


def _decode_all(paths, image_size: int, out: np.ndarray, num_workers: int, progress: bool,
                dicom_window: str = "file") -> dict[int, str]:
    """Decode ``paths`` into ``out`` in parallel; returns {row: reason} for the rows that could not
    be decoded."""
    from tqdm import tqdm

    errors = {}
    loader = torch.utils.data.DataLoader(
        _Safe(paths, None, image_size, dicom_window=dicom_window), batch_size=32, num_workers=num_workers,
        shuffle=False, worker_init_fn=worker_init, generator=torch.Generator().manual_seed(0),
    )  # its own generator: a cold cache must not consume the global RNG that seeds the model
    for batch in tqdm(loader, desc="decode", unit="batch", disable=not progress, leave=False):
        index = batch["index"].numpy()
        rows = np.where(index < 0, -1 - index, index)
        out[rows] = batch["image"].numpy()
        errors.update({int(r): batch["error"][k] for k, r in enumerate(rows) if index[k] < 0})
    return dict(sorted(errors.items()))


def build_store(paths, image_size: int, cache_dir=None, num_workers: int = 0,
                progress: bool = True, dicom_window: str = "file") -> ImageStore:
    """Decode every path once (or reuse the on-disk cache) and return the store; DICOM films are
    read with ``dicom_window`` (``--dicom-window``).

    Undecodable files do not stop the build: their rows are listed in ``store.bad`` (and why, in
    ``store.errors``) so that the caller can stop with a clear message or drop them
    (``--skip-bad-images``)."""
    paths = list(paths)
    shape = (len(paths), int(image_size), int(image_size))
    if cache_dir is None:
        array = np.zeros(shape, np.uint8)
        errors = _decode_all(paths, image_size, array, num_workers, progress, dicom_window)
        return ImageStore(array, None, list(errors), errors)

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(paths, image_size, dicom_window)
    target, meta_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    if target.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        return ImageStore(None, target, meta["bad"], {int(k): v for k, v in meta.get("errors", {}).items()})
    tmp = cache_dir / f".{key}.{os.getpid()}.npy"
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        errors = _decode_all(paths, image_size, array, num_workers, progress, dicom_window)
        array.flush()
        del array
        meta_path.write_text(json.dumps({"n": len(paths), "image_size": image_size, "dicom_window": dicom_window,
                                         "bad": list(errors), "errors": errors}))
        os.replace(tmp, target)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return ImageStore(None, target, list(errors), errors)
