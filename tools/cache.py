"""Decode each image once: letterboxed uint8 pixels at model resolution, reused by every pass.

With a cache directory the pixels live in a memory-mapped ``.npy`` file keyed by the image paths,
their modification times and sizes, and the image size, so every later command on the same rows
reuses it; a changed file changes the key. Without one they are kept in memory for the run.
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
from tools.errors import UserError


def cache_key(paths, image_size: int) -> str:
    digest = hashlib.sha1(f"v1 {int(image_size)}".encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"\n{os.path.abspath(path)}\t{stat.st_mtime_ns}\t{stat.st_size}".encode())
    return digest.hexdigest()[:24]


class ImageStore:
    """Row ``i`` -> letterboxed uint8 image (size, size). Build with :func:`build_store`."""

    def __init__(self, array: np.ndarray | None, path: Path | None, bad: list[int]):
        self._array = array
        self.path = path
        self.bad = bad

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


def _decode_all(paths, image_size: int, out: np.ndarray, num_workers: int, progress: bool) -> list[int]:
    """Decode ``paths`` into ``out`` in parallel; returns the rows that could not be decoded."""
    from tqdm import tqdm

    bad = []

    class _Safe(CXRDataset):
        def __getitem__(self, index):
            try:
                return super().__getitem__(index)
            except UserError:
                return {"image": torch.zeros(self.image_size, self.image_size, dtype=torch.uint8),
                        "labels": torch.zeros(0), "index": -1 - index}

    loader = torch.utils.data.DataLoader(
        _Safe(paths, None, image_size), batch_size=32, num_workers=num_workers, shuffle=False,
        worker_init_fn=worker_init, generator=torch.Generator().manual_seed(0),
    )  # its own generator: a cold cache must not consume the global RNG that seeds the model
    for batch in tqdm(loader, desc="decode", unit="batch", disable=not progress, leave=False):
        index = batch["index"].numpy()
        rows = np.where(index < 0, -1 - index, index)
        out[rows] = batch["image"].numpy()
        bad.extend(int(r) for r in rows[index < 0])
    return sorted(bad)


def build_store(paths, image_size: int, cache_dir=None, num_workers: int = 0,
                progress: bool = True) -> ImageStore:
    """Decode every path once (or reuse the on-disk cache) and return the store.

    Undecodable files do not stop the build: their rows are listed in ``store.bad`` so that the
    caller can stop with a clear message or drop them (``--skip-bad-images``)."""
    paths = list(paths)
    shape = (len(paths), int(image_size), int(image_size))
    if cache_dir is None:
        array = np.zeros(shape, np.uint8)
        bad = _decode_all(paths, image_size, array, num_workers, progress)
        return ImageStore(array, None, bad)

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(paths, image_size)
    target, meta_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    if target.is_file() and meta_path.is_file():
        return ImageStore(None, target, json.loads(meta_path.read_text())["bad"])
    tmp = cache_dir / f".{key}.{os.getpid()}.npy"
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        bad = _decode_all(paths, image_size, array, num_workers, progress)
        array.flush()
        del array
        meta_path.write_text(json.dumps({"n": len(paths), "image_size": image_size, "bad": bad}))
        os.replace(tmp, target)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return ImageStore(None, target, bad)
