"""Films to pixels: decode a file, letterbox it to the model's size, augment it, and the one
dataset class with its loaders. What reaches the model, the cache and the corruptions is uint8
grayscale at model resolution; films deeper than 8 bits (16-bit PNGs, DICOM) stay float through
the resize and are quantised once, at that resolution.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from tools import dicom, distributed
from tools.errors import ImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
DICOM_EXTENSION = ".dcm"


# ====== images ======

def is_image_file(path) -> bool:
    """A file an image folder (``--image-dir``) holds: png/jpg/jpeg/dcm by extension, or a file
    without an extension (or with a numeric one, as UID-named DICOM files have: ``1.2.840.5``)
    that carries the DICM prefix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS or suffix == DICOM_EXTENSION:
        return True
    return (suffix == "" or suffix[1:].isdigit()) and dicom.has_preamble(path)


def read_raw(path) -> np.ndarray:
    """The image as stored in the file: for PNG/JPEG (``cv2.IMREAD_UNCHANGED``) HxW grayscale or
    HxWxC BGR(A), uint8 or uint16; for DICOM the stored values as pydicom decodes them (HxW, or
    HxWx3 RGB), after checking that the file is a single-frame image. With :func:`read_film`,
    the one place files are decoded.

    Raises ImageError naming the path when the file is missing, cannot be decoded, is not a
    single-frame image, or holds a PNG/JPEG pixel type other than 8 or 16 bits.
    """
    if not Path(path).is_file():
        raise ImageError(path, "file not found", "")
    return dicom.stored_pixels(path) if dicom.is_dicom(path) else _decode_png_jpeg(path)


def _decode_png_jpeg(path) -> np.ndarray:
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise ImageError(path, "cannot be decoded (truncated or not a PNG/JPEG/DICOM)")
    if image.dtype not in (np.uint8, np.uint16):
        raise ImageError(path, f"unsupported pixel type {image.dtype}", "use 8- or 16-bit PNG or JPEG, or DICOM")
    return image


def read_film(path, dicom_window: str = "file") -> np.ndarray:
    """The displayed film, grayscale HxW at its own size: uint8 as stored for 8-bit PNG/JPEG;
    float32 on [0, 1] at full depth for 16-bit PNGs and for DICOM (``tools.dicom.read_film``:
    modality LUT, the ``dicom_window`` range, MONOCHROME1 inverted).

    Colour PNG/JPEG become luma (OpenCV's BGR2GRAY). 16-bit PNGs are scaled by their bit depth:
    12-bit data (max <= 4095) by 4095, otherwise by 65535, so intensities keep their meaning
    across images (no per-image stretching). Raises ImageError naming the path when the file
    cannot be read.
    """
    if not Path(path).is_file():
        raise ImageError(path, "file not found", "")
    if dicom.is_dicom(path):
        return dicom.read_film(path, dicom_window)
    image = _decode_png_jpeg(path)
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        image = cv2.cvtColor(image, code)
    if image.dtype == np.uint16:
        scale = 4095.0 if image.max() <= 4095 else 65535.0
        image = image.astype(np.float32) * np.float32(1.0 / scale)
    return image


def to_uint8(film: np.ndarray) -> np.ndarray:
    """A film as uint8: unchanged when it is uint8, else float [0, 1] rounded once to 0-255."""
    if film.dtype == np.uint8:
        return film
    return np.clip(np.rint(film * 255.0), 0, 255).astype(np.uint8)


def load_image(path, dicom_window: str = "file") -> np.ndarray:
    """:func:`read_film` as uint8 grayscale HxW at the film's own size (PNG/JPEG of any bit depth,
    RGB(A), DICOM). Raises ImageError naming the path when the file cannot be read."""
    return to_uint8(read_film(path, dicom_window))


def letterbox(image: np.ndarray, size: int) -> np.ndarray:
    """Aspect-preserving resize so the longer side is ``size``, centred on a black square; uint8
    out. A float film on [0, 1] is resized in float and quantised to uint8 only then, so a 12-bit
    film loses no depth before the resize."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (nw, nh), interpolation=interp) if (nh, nw) != (h, w) else image
    out = np.zeros((size, size), dtype=np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = to_uint8(resized)
    return out


def model_image(path, size: int, dicom_window: str = "file") -> np.ndarray:
    """The pixels the model sees for a file: :func:`read_film` letterboxed to ``size`` (uint8)."""
    return letterbox(read_film(path, dicom_window), size)


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


# ====== the dataset ======

class CXRDataset(torch.utils.data.Dataset):
    """Chest films of one table, rows aligned with the table.

    Item ``i`` is a dict: ``image`` uint8 tensor (size, size) (letterboxed, grayscale),
    ``labels`` float32 tensor (L,) with NaN for unknown, ``index`` = i (the row position, used to
    gather results in row order and to seed per-image randomness).

    ``source`` gives the letterboxed uint8 image for a row: a ``tools.cache.ImageStore`` (decoded
    once, memory-mapped) or, by default, decoding the file each time (DICOM files read with
    ``dicom_window``, ``--dicom-window``).
    ``transform(image, index) -> image`` runs on the uint8 image at model resolution
    (augmentation, a corruption, a TTA draw).
    """

    def __init__(self, paths, y: np.ndarray | None, image_size: int, transform=None, source=None,
                 dicom_window: str = "file"):
        self.paths = list(paths)
        self.y = np.full((len(self.paths), 0), np.nan, np.float32) if y is None else np.asarray(y, np.float32)
        self.image_size = int(image_size)
        self.transform = transform
        self.source = source
        self.dicom_window = dicom_window

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, index: int) -> np.ndarray:
        if self.source is not None:
            return self.source[index]
        return model_image(self.paths[index], self.image_size, self.dicom_window)

    def __getitem__(self, index: int) -> dict:
        image = self.image(index)
        if self.transform is not None:
            image = self.transform(image, index)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)),
            "labels": torch.from_numpy(self.y[index]),
            "index": index,
        }


# ====== loaders ======

def worker_init(_worker_id: int) -> None:
    """One thread per loader process: OpenCV's own thread pool in every worker otherwise fights
    the model's threads for the same cores (measured: 20x slower training on 2 cores).
    OpenCV is told 0 (run sequentially), not 1: setting 1 in a forked child waits for pool
    threads that exist only in the parent, and hangs once the parent has used OpenCV's pool."""
    import cv2

    cv2.setNumThreads(0)
    torch.set_num_threads(1)


def make_loader(dataset, batch_size: int, num_workers: int, device: torch.device, shuffle: bool = False,
                seed: int = 0, drop_last: bool = False, persistent: bool = True):
    """DataLoader; under torchrun a DistributedSampler shards the rows (reshuffled per epoch via
    ``loader.sampler.set_epoch``)."""
    sampler = None
    if distributed.world_size() > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(
            dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
        shuffle = False
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=num_workers,
        pin_memory=device.type == "cuda", drop_last=drop_last, generator=generator,
        persistent_workers=persistent and num_workers > 0, worker_init_fn=worker_init,
    )
