"""Image corruptions for the stress test: pure ``f(image, severity, rng) -> image`` functions.

Every function takes a uint8 grayscale HxW image at model input resolution and returns one of the
same shape and dtype. Each severity means exactly one parameter (SPEC "stress"). Two families,
chosen with ``--corruptions default|acquisition|all`` (:func:`corruption_names`); ``default`` is
the stress test of the first releases, unchanged:

| name                  | parameter                       | sev 1 | sev 2 | sev 3 |
| --------------------- | ------------------------------- | ----- | ----- | ----- |
| `gaussian_noise`      | variance on the 0-255 scale     | 10    | 25    | 50    |
| `gaussian_blur`       | kernel size k (k x k)           | 3     | 5     | 9     |
| `jpeg`                | JPEG quality                    | 70    | 50    | 30    |
| `brightness_contrast` | +/- limit of both factors       | 0.15  | 0.30  | 0.45  |

``acquisition``: how hospitals' chest films go wrong before a model sees them (PACS export,
DICOM reading, positioning, annotation):

| name          | parameter                                            | sev 1 | sev 2 | sev 3 |
| ------------- | ---------------------------------------------------- | ----- | ----- | ----- |
| `inversion`   | share of films read with the wrong photometric       | 0.25  | 0.50  | 1.00  |
|               | interpretation (each film drawn on its own)           |       |       |       |
| `window`      | window width as a share of the film's own, same centre | 0.60 | 0.40 | 0.25  |
| `bit_depth`   | bits kept (2^bits grey levels)                       | 6     | 4     | 3     |
| `rotation`    | degrees, direction drawn per film                    | 5     | 10    | 15    |
| `collimation` | share of the side cropped at each border, then       | 0.05  | 0.10  | 0.20  |
|               | resized back                                         |       |       |       |
| `markers`     | marker text height as a share of the film's side;    | 0.05  | 0.08  | 0.12  |
|               | marks: 1, 2, 3 (:data:`MARKER_TEXTS`)                 |       |       |       |

- ``inversion``: 255 - x over the film (the letterbox's black padding, no part of the film,
  stays black); each film is inverted with probability = the share, drawn from its generator.
- ``window``: the uint8 film is shown by its own window (centre 127.5, width 255); a window of
  width w * 255 about the same centre maps to 0-255 and clips: out = clip((x - 127.5) / w + 127.5).
- ``bit_depth``: x keeps its top b bits (floor(x / 2^(8 - b))), spread back over 0-255.
- ``rotation``: about the image centre, bilinear; the corners the film leaves are black, as the
  letterbox padding and a digitiser's empty bed are.
- ``collimation``: the central (1 - 2c) of each side is kept and resized back (bilinear) to the
  full size: anatomy at the borders is lost and the rest magnified.
- ``markers``: saturated white (255) text burned into the film's corners: a laterality letter
  ("L" or "R", drawn per film), then "PORTABLE", then "AP SUPINE"; each in its own corner
  (drawn per film), shrunk when it would be wider than 45% of the film.

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

import cv2
import numpy as np

SEVERITIES: dict[str, list] = {
    "gaussian_noise": [10, 25, 50],
    "gaussian_blur": [3, 5, 9],
    "jpeg": [70, 50, 30],
    "brightness_contrast": [0.15, 0.30, 0.45],
    "inversion": [0.25, 0.50, 1.00],
    "window": [0.60, 0.40, 0.25],
    "bit_depth": [6, 4, 3],
    "rotation": [5, 10, 15],
    "collimation": [0.05, 0.10, 0.20],
    "markers": [0.05, 0.08, 0.12],
}

PARAM_NAMES: dict[str, str] = {
    "gaussian_noise": "variance",
    "gaussian_blur": "kernel",
    "jpeg": "quality",
    "brightness_contrast": "limit",
    "inversion": "share inverted",
    "window": "width factor",
    "bit_depth": "bits",
    "rotation": "degrees",
    "collimation": "crop per border",
    "markers": "text height",
}

# Each parameter in words (``param_label``): {p} is the table's value, {marks} the count of marks.
PARAM_TEXTS: dict[str, str] = {
    "gaussian_noise": "variance {p}",
    "gaussian_blur": "kernel {p}x{p}",
    "jpeg": "quality {p}",
    "brightness_contrast": "limit \u00b1{p:.2f}",
    "inversion": "{p:.0%} of films inverted",
    "window": "width x{p:.2f}",
    "bit_depth": "{p} bits",
    "rotation": "\u00b1{p}\u00b0",
    "collimation": "{p:.0%} cropped per border",
    "markers": "{marks}, {p:.0%} high",
}

FAMILIES: dict[str, tuple] = {
    "default": ("gaussian_noise", "gaussian_blur", "jpeg", "brightness_contrast"),
    "acquisition": ("inversion", "window", "bit_depth", "rotation", "collimation", "markers"),
}
# What --corruptions accepts: a family, "all" (both), or single corruption names.
CHOICES = (*FAMILIES, "all", *SEVERITIES)
# The marks burned in at each severity; None is the laterality letter, "L" or "R" drawn per film.
MARKER_TEXTS = ((None,), (None, "PORTABLE"), (None, "PORTABLE", "AP SUPINE"))
MARKER_MAX_WIDTH = 0.45  # a mark wider than this share of the film is shrunk to fit its corner


def corruption_names(choices) -> list[str]:
    """``--corruptions`` values to corruption names, in table order, each once: a family name
    gives its members, ``all`` both families, a corruption name itself. ValueError for anything
    else."""
    wanted = set()
    for choice in choices:
        if choice == "all":
            wanted.update(SEVERITIES)
        elif choice in FAMILIES:
            wanted.update(FAMILIES[choice])
        elif choice in SEVERITIES:
            wanted.add(choice)
        else:
            raise ValueError(f"--corruptions {choice}: choose {', '.join(CHOICES)}")
    return [name for name in SEVERITIES if name in wanted]


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


# ====== acquisition faults ======

def _film_box(image: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), exclusive ends, of the film inside the letterbox padding: the
    rows and columns holding a non-zero pixel; the whole image when it is all black."""
    rows, cols = np.flatnonzero(image.any(axis=1)), np.flatnonzero(image.any(axis=0))
    if not len(rows):
        return 0, image.shape[0], 0, image.shape[1]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def inversion(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """With probability = the table's share, the film read with the wrong photometric
    interpretation: 255 - x inside the film's box (the letterbox padding stays black)."""
    _check_image(image)
    share = corruption_param("inversion", severity)
    out = image.copy()
    if rng.random() < share:
        top, bottom, left, right = _film_box(image)
        out[top:bottom, left:right] = 255 - image[top:bottom, left:right]
    return out


def window(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A window narrower than the film's own (centre 127.5, width 255): width w x 255 about the
    same centre, mapped to 0-255 and clipped; deterministic."""
    _check_image(image)
    width = corruption_param("window", severity)
    return _to_uint8((image.astype(np.float64) - 127.5) / width + 127.5)


def bit_depth(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """The top b bits of each value kept (2^b levels), spread back over 0-255; deterministic."""
    _check_image(image)
    bits = corruption_param("bit_depth", severity)
    levels = image.astype(np.int64) >> (8 - bits)
    return _to_uint8(levels * (255.0 / (2**bits - 1)))


def rotation(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Rotated by the table's angle about the image centre, direction drawn from ``rng``;
    bilinear, the uncovered corners black."""
    _check_image(image)
    angle = corruption_param("rotation", severity) * (1 if rng.random() < 0.5 else -1)
    h, w = image.shape
    matrix = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, 1.0)
    return cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0)


def collimation(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """The table's share of the side cropped at every border, the rest resized back (bilinear);
    deterministic."""
    _check_image(image)
    share = corruption_param("collimation", severity)
    h, w = image.shape
    dy, dx = int(round(share * h)), int(round(share * w))
    kept = image[dy:h - dy, dx:w - dx]
    return cv2.resize(kept, (w, h), interpolation=cv2.INTER_LINEAR)


def markers(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Saturated white marks burned into the film's corners (:data:`MARKER_TEXTS`): severity k
    draws k marks, text height the table's share of the film's shorter side; the laterality letter
    and each mark's corner are drawn from ``rng``. Hard-edged (no anti-aliasing): burned-in
    annotations are 255 exactly."""
    _check_image(image)
    height_share = corruption_param("markers", severity)
    top, bottom, left, right = _film_box(image)
    film_h, film_w = bottom - top, right - left
    out = image.copy()
    font = cv2.FONT_HERSHEY_SIMPLEX
    corners = rng.permutation(4)
    margin = max(1, int(round(0.03 * min(film_h, film_w))))
    for k, text in enumerate(MARKER_TEXTS[int(severity) - 1]):
        if text is None:
            text = "L" if rng.random() < 0.5 else "R"
        target = max(3.0, height_share * min(film_h, film_w))
        thickness = max(1, int(round(target / 8)))
        (width_1, height_1), _ = cv2.getTextSize(text, font, 1.0, thickness)
        scale = min(target / height_1, MARKER_MAX_WIDTH * film_w / width_1)
        (width, height), _ = cv2.getTextSize(text, font, scale, thickness)
        corner = int(corners[k])
        x = left + margin if corner % 2 == 0 else right - margin - width
        y = top + margin + height if corner < 2 else bottom - margin
        cv2.putText(out, text, (int(x), int(y)), font, scale, 255, thickness, cv2.LINE_8)
    return out


CORRUPTIONS: dict = {f.__name__: f for f in (gaussian_noise, gaussian_blur, jpeg, brightness_contrast, inversion,
                                             window, bit_depth, rotation, collimation, markers)}


def apply_corruption(image: np.ndarray, name: str, severity: int, seed: int, index: int = 0) -> np.ndarray:
    """Corrupt ``image`` (uint8 HxW) with ``name`` at ``severity``, randomness from
    :func:`image_rng` (seed, index, name, severity)."""
    corruption_param(name, severity)
    _check_image(image)
    return CORRUPTIONS[name](image, severity, image_rng(seed, index, name, severity))


def param_label(name: str, severity: int) -> str:
    """The parameter of (name, severity) in words: "kernel 9x9", "limit ±0.45", "quality 30",
    "25% of films inverted", "width x0.40", "4 bits", "±10°", "10% cropped per border",
    "2 marks, 8% high"."""
    param = corruption_param(name, severity)
    count = len(MARKER_TEXTS[int(severity) - 1])
    return PARAM_TEXTS[name].format(p=param, marks=f"{count} mark{'s' if count > 1 else ''}")
