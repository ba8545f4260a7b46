"""Image corruptions for the stress test: pure ``f(image, severity, rng) -> image`` functions.

Every function takes a uint8 grayscale HxW image at model input resolution and returns one of the
same shape and dtype. Each severity means exactly one parameter (SPEC "stress"):

| name                  | parameter                       | sev 1 | sev 2 | sev 3 |
| --------------------- | ------------------------------- | ----- | ----- | ----- |
| `gaussian_noise`      | variance on the 0-255 scale     | 10    | 25    | 50    |
| `gaussian_blur`       | kernel size k (k x k)           | 3     | 5     | 9     |
| `jpeg`                | JPEG quality                    | 70    | 50    | 30    |
| `brightness_contrast` | +/- limit of both factors       | 0.15  | 0.30  | 0.45  |

Randomness comes only from the ``numpy.random.Generator`` passed in; :func:`image_rng` derives
it from (seed, image index, corruption name, severity), so a corrupted image is the same whatever
the batch size, worker count, processing order or number of processes.

Blur, JPEG and brightness/contrast use albumentations 2.0.8 transforms, built once per
(name, severity) and seeded from the per-image generator on every call. The cached transforms
carry that per-call random state, so do not share this module's functions between threads that
run at the same time (DataLoader workers are processes, which is fine).
"""
from __future__ import annotations

import functools
import math
import random
import zlib

import numpy as np

SEVERITIES: dict[str, list] = {
    "gaussian_noise": [10, 25, 50],
    "gaussian_blur": [3, 5, 9],
    "jpeg": [70, 50, 30],
    "brightness_contrast": [0.15, 0.30, 0.45],
}

PARAM_NAMES: dict[str, str] = {
    "gaussian_noise": "variance",
    "gaussian_blur": "kernel",
    "jpeg": "quality",
    "brightness_contrast": "limit",
}


# ====== parameters and randomness ======

def corruption_param(name: str, severity: int):
    """The table's parameter for (name, severity); ValueError naming the valid choices otherwise."""
    if name not in SEVERITIES:
        raise ValueError(f"unknown corruption {name!r}; choose one of {', '.join(SEVERITIES)}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= severity <= 3:
        raise ValueError(f"severity {severity!r} for {name} is not valid; choose 1, 2 or 3")
    return SEVERITIES[name][int(severity) - 1]


def image_rng(seed: int, index: int, name: str, severity: int) -> np.random.Generator:
    """Generator seeded by (seed, image index, corruption name, severity) and nothing else.

    The name enters through CRC-32 of its UTF-8 bytes: Python's ``hash()`` of a string changes
    between processes (PYTHONHASHSEED), which would make results depend on the worker.
    """
    parts = [seed, index, severity]
    if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0 for v in parts):
        raise ValueError(f"seed, index and severity must be non-negative integers, got {parts}")
    entropy = [int(seed), int(index), zlib.crc32(name.encode("utf-8")), int(severity)]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def blur_sigma(kernel: int) -> float:
    """Gaussian sigma for a k x k kernel: OpenCV's rule 0.3 * ((k - 1) * 0.5 - 1) + 0.8.

    Source: cv::getGaussianKernel documentation (used there when sigma <= 0). albumentations'
    GaussianBlur has no automatic sigma for a given kernel, so the table's kernel sizes get
    sigma 0.8, 1.1 and 1.7.
    """
    return 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 2:
        got = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"corruptions take a uint8 grayscale HxW array, got {got}")


def _to_unit_float(image: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [0, 1], the float convention of albumentations (max value 1.0)."""
    return image.astype(np.float32) / 255.0


def _to_uint8(image_0_255: np.ndarray) -> np.ndarray:
    """Round to nearest once and clip: albumentations' uint8 paths truncate instead (see below)."""
    return np.clip(np.rint(image_0_255), 0, 255).astype(np.uint8)


# ====== albumentations transforms (built once per name and severity) ======

@functools.lru_cache(maxsize=None)
def _transform(name: str, severity: int):
    """The albumentations transform for (name, severity), every parameter fixed and p=1.

    albumentations defaults every transform to p=0.5; p=1 makes each call apply it.
    """
    import albumentations as A  # imported on first use: it pulls in torch (slow import)

    param = corruption_param(name, severity)
    if name == "gaussian_blur":
        sigma = blur_sigma(param)
        return A.GaussianBlur(blur_limit=(param, param), sigma_limit=(sigma, sigma), p=1)
    if name == "jpeg":
        # Encodes and decodes with cv2.imencode/imdecode at this quality (albumentations
        # augmentations/pixel/functional.py image_compression).
        return A.ImageCompression(compression_type="jpeg", quality_range=(param, param), p=1)
    if name == "brightness_contrast":
        # out = (1 + c) * x + b * max_value with c, b ~ U[-limit, limit] drawn per call
        # (RandomBrightnessContrast.get_params_dependent_on_data, brightness_by_max=True).
        return A.RandomBrightnessContrast(
            brightness_limit=(-param, param), contrast_limit=(-param, param),
            brightness_by_max=True, ensure_safe_range=False, p=1,
        )
    raise ValueError(f"{name} is not built on an albumentations transform")


def _apply_seeded(transform, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Run ``transform`` with its random state taken from ``rng`` (not the global random state).

    albumentations 2.x transforms draw from two generators, ``random_generator`` (numpy) and
    ``py_random`` (random.Random); ``BasicTransform.set_random_state`` replaces both
    (core/transforms_interface.py).
    """
    transform.set_random_state(rng, random.Random(int(rng.integers(2**63))))
    return transform(image=image)["image"]


# ====== the corruptions ======

def gaussian_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Add i.i.d. zero-mean Gaussian noise of the table's variance (0-255 scale), round once.

    The noise is drawn here from ``rng`` rather than by ``A.GaussNoise``, for three reasons found
    in albumentations 2.0.8: on uint8 its noise is truncated (measured variance 7.8/21.3/44.6
    instead of 10/25/50 on flat grey); it samples through OpenCV's global RNG
    (``cv2.setRNGSeed`` + ``cv2.randn`` in pixel/functional.py ``generate_noise``), changing
    state other code shares; and that seed is drawn from only 2**16 values, so images would share
    identical noise patterns. Its float32 path has the same definition: std = sqrt(variance)/255
    on [0, 1] images, added and clipped.
    """
    _check_image(image)
    variance = corruption_param("gaussian_noise", severity)
    noise = rng.normal(0.0, math.sqrt(variance), size=image.shape)
    return _to_uint8(image.astype(np.float64) + noise)


def gaussian_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur with a k x k kernel and sigma = :func:`blur_sigma` (k); deterministic."""
    _check_image(image)
    return _apply_seeded(_transform("gaussian_blur", severity), image, rng)


def jpeg(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """JPEG encode/decode round trip (OpenCV) at the table's quality; deterministic."""
    _check_image(image)
    return _apply_seeded(_transform("jpeg", severity), image, rng)


def brightness_contrast(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """out = round(clip((1 + c) * x + 255 * b)), c and b drawn uniformly in [-limit, +limit].

    Applied to the float32 [0, 1] image and rounded once: on uint8 albumentations builds a lookup
    table with ``np.clip(...).astype(uint8)`` (albucore ``multiply_add_lut``), which truncates
    and so darkens every image by half a grey level on average.
    """
    _check_image(image)
    out = _apply_seeded(_transform("brightness_contrast", severity), _to_unit_float(image), rng)
    return _to_uint8(out * 255.0)


CORRUPTIONS: dict = {f.__name__: f for f in (gaussian_noise, gaussian_blur, jpeg, brightness_contrast)}


def apply_corruption(image: np.ndarray, name: str, severity: int, seed: int, index: int = 0) -> np.ndarray:
    """Corrupt ``image`` (uint8 HxW) with ``name`` at ``severity``, randomness from
    :func:`image_rng` (seed, index, name, severity)."""
    corruption_param(name, severity)
    _check_image(image)
    return CORRUPTIONS[name](image, severity, image_rng(seed, index, name, severity))


def param_label(name: str, severity: int) -> str:
    """The parameter of (name, severity) in words: "kernel 9x9", "limit ±0.45", "quality 30"."""
    param = corruption_param(name, severity)
    if name == "gaussian_blur":
        return f"kernel {param}x{param}"
    if name == "brightness_contrast":
        return f"limit \u00b1{param:.2f}"
    return f"{PARAM_NAMES[name]} {param}"
