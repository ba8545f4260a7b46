"""What changes when the demo's films come from another hospital: the shifts behind
``python -m tools.make_demo_data --site-shift KIND`` (``tools.make_demo_data.make_site`` draws the
phantoms and writes the folder; this module holds the shifts, pure functions of a film).

Kinds (``SHIFTS``), each applied to phantoms drawn as the demo's are (same patients, findings,
sites, views and planted failure modes):

- ``none``: nothing changes; the control on which no drift should be detected.
- ``exposure``: another processing and exposure: the displayed film goes through a steeper tone
  curve (gamma ``SITE_PARAMS["exposure"]["gamma"]``) and is scaled darker.
- ``device``: another detector: resolution loss (the film is sampled down and up again),
  electronic noise, a lead side marker burned into the top-right corner, and a smaller pixel
  matrix (films written at ``size_ratio`` of ``--size``).
- ``mixed-views``: most films unchanged, but ``planted_share`` of them are lateral films (a side
  view of the chest: spine behind, sternum in front, heart low and anterior, the arms raised) and
  as many are inverted (bone dark, air bright: a MONOCHROME1 film shown without its inversion).
  An out-of-distribution score should put these films first.

Films are floats in [0, 1], as ``tools.make_demo_data.render_phantom`` gives them; attenuation
maps are in its log-attenuation units (soft tissue 1).
"""
from __future__ import annotations

import cv2
import numpy as np

SHIFTS = ("none", "exposure", "device", "mixed-views")
SITE_TRUTH_FILE = "site_truth.csv"  # beside the images folder, never in it: only the tests read it
PLANTED = ("lateral", "inverted")

SITE_PARAMS = {
    # displayed value v -> scale * v ** gamma: darker mid-tones, less contrast in the lungs
    "exposure": {"gamma": 1.8, "scale": 0.85},
    # detail finer than 1 / downsample of the film is lost; noise sd in display units; the side
    # marker: a white box of side marker_width (film widths) with a dark letter, marker_corner from
    # the top-right corner
    "device": {"downsample": 3.0, "noise_sd": 0.04, "marker_letter": "L", "marker_width": 0.08,
               "marker_corner": 0.04, "size_ratio": 0.75},
    # share of the films of each planted kind (at least one of each from 10 films up)
    "mixed-views": {"planted_share": 0.1},
}
# lateral view, in film widths (x from the patient's front, image left, to the back; y down) and
# log-attenuation units (frontal films: soft tissue 1, aerated lung -0.58)
LATERAL = {"soft": 1.0, "lung_air": 0.6, "heart": 0.22, "spine": 0.25, "sternum": 0.12, "trachea": 0.16,
           "arms": 0.35, "rib": 0.07, "edge_sigma": 0.006}


def planted_rows(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Per film: "lateral", "inverted" or "" (only ``mixed-views`` plants any)."""
    planted = np.full(n, "", dtype=object)
    if kind != "mixed-views":
        return planted
    count = int(round(SITE_PARAMS["mixed-views"]["planted_share"] * n))
    count = max(count, 1) if n >= 10 else count
    chosen = rng.choice(n, size=min(2 * count, n), replace=False)
    planted[chosen[:count]] = "lateral"
    planted[chosen[count:]] = "inverted"
    return planted


def film_side(kind: str, size: int) -> int:
    """Side of the written film: ``size``, or the device's smaller matrix."""
    if kind == "device":
        return int(round(size * SITE_PARAMS["device"]["size_ratio"]))
    return int(size)


def shift_film(image: np.ndarray, kind: str, planted: str, rng: np.random.Generator) -> np.ndarray:
    """The film as the new site writes it (float [0, 1], square)."""
    if planted == "inverted":
        image = 1.0 - image
    if kind == "exposure":
        params = SITE_PARAMS["exposure"]
        image = params["scale"] * np.clip(image, 0.0, 1.0) ** params["gamma"]
    elif kind == "device":
        image = _device(image, rng)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _device(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Resolution loss, then noise, then the side marker, then the smaller matrix."""
    params, size = SITE_PARAMS["device"], image.shape[0]
    small = max(8, int(round(size / params["downsample"])))
    blurred = cv2.resize(cv2.resize(image, (small, small), interpolation=cv2.INTER_AREA), (size, size),
                         interpolation=cv2.INTER_LINEAR)
    noisy = np.clip(blurred + params["noise_sd"] * rng.standard_normal(image.shape), 0.0, 1.0).astype(np.float32)
    side = max(5, int(round(params["marker_width"] * size)))
    corner = int(round(params["marker_corner"] * size))
    x0, y0 = size - corner - side, corner
    noisy[y0:y0 + side, x0:x0 + side] = 1.0
    thickness = max(1, side // 8)
    (width, height), _ = cv2.getTextSize(params["marker_letter"], cv2.FONT_HERSHEY_SIMPLEX, 1.0, thickness)
    scale = 0.65 * side / height
    (width, height), _ = cv2.getTextSize(params["marker_letter"], cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    cv2.putText(noisy, params["marker_letter"], (x0 + (side - width) // 2, y0 + (side + height) // 2),
                cv2.FONT_HERSHEY_SIMPLEX, scale, 0.0, thickness, cv2.LINE_AA)
    out = film_side("device", size)
    return cv2.resize(noisy, (out, out), interpolation=cv2.INTER_AREA)


def lateral_attenuation(rng: np.random.Generator, size: int) -> np.ndarray:
    """A lateral chest film's log-attenuation (size x size, float32): the torso in profile with
    the neck above, the two lungs superimposed as one lucent field over the domes, the heart low
    and in front, the spine behind, the sternum in front, the trachea, the raised arms' soft
    tissue at the top and faint ribs; random build and position."""
    a = LATERAL
    canvas = lambda: np.zeros((size, size), np.float32)  # noqa: E731
    px = lambda v: int(round(v * size))  # noqa: E731
    dx, dy = rng.normal(0.0, 0.015, 2)
    depth, lung_w = rng.uniform(0.34, 0.40), rng.uniform(0.25, 0.29)
    cx, top = 0.5 + dx, 0.1 + dy

    grid = (np.arange(size, dtype=np.float32) + 0.5) / size
    # the trunk in profile: a superellipse, square-shouldered with rounded corners
    trunk = ((grid[None, :] - cx) / depth) ** 4 + ((grid[:, None] - 0.68 - dy) / 0.55) ** 4 <= 1.0
    body = trunk.astype(np.float32)
    cv2.rectangle(body, (px(cx - 0.12), 0), (px(cx + 0.16), px(0.3 + dy)), 1.0, -1)  # neck
    arms = canvas()
    for side in (-1, 1):
        cv2.ellipse(arms, (px(cx + side * 0.12), px(top)), (px(0.16), px(0.09)), side * 15, 0, 360, 1.0, -1)
    lungs = canvas()
    cv2.ellipse(lungs, (px(cx + 0.02), px(0.47 + dy)), (px(lung_w), px(0.31)), 0, 0, 360, 1.0, -1)
    dome_front, dome_back = 0.66 + dy + rng.uniform(-0.02, 0.02), 0.80 + dy + rng.uniform(-0.02, 0.02)
    below = np.array([[0, px(dome_front)], [size, px(dome_back)], [size, size], [0, size]], np.int32)
    cv2.fillPoly(lungs, [below], 0.0)
    heart = canvas()
    cv2.ellipse(heart, (px(cx - 0.1), px(dome_front - 0.1)), (px(0.15), px(0.13)), -20, 0, 360, 1.0, -1)
    spine = canvas()
    for k in range(12):  # vertebral bodies with disc spaces between them
        y0 = top + 0.12 + k * 0.065
        cv2.rectangle(spine, (px(cx + depth - 0.17), px(y0)), (px(cx + depth - 0.09), px(y0 + 0.05)), 1.0, -1)
    sternum = canvas()
    cv2.line(sternum, (px(cx - depth + 0.05), px(0.3 + dy)), (px(cx - depth + 0.07), px(0.62 + dy)), 1.0,
             max(1, px(0.02)))
    trachea = canvas()
    cv2.line(trachea, (px(cx + 0.02), 0), (px(cx + 0.06), px(0.38 + dy)), 1.0, max(1, px(0.03)))
    ribs = canvas()
    for k in range(9):
        y = top + 0.16 + k * 0.06
        cv2.ellipse(ribs, (px(cx + 0.05), px(y)), (px(lung_w + 0.05), px(0.05)), 8, 200, 340, 1.0, max(1, px(0.008)))

    sigma = a["edge_sigma"] * size
    soft = lambda m: cv2.GaussianBlur(m, (0, 0), sigma)  # noqa: E731
    lungs, heart = soft(lungs), soft(heart)
    mu = a["soft"] * soft(body) + a["arms"] * soft(arms) * (1.0 - lungs)
    mu += a["heart"] * heart - a["lung_air"] * lungs * (1.0 - 0.6 * heart)
    mu += a["spine"] * soft(spine) + a["sternum"] * soft(sternum) + a["rib"] * soft(ribs) * lungs
    mu -= a["trachea"] * soft(trachea) * (1.0 - lungs)
    return mu.astype(np.float32)
