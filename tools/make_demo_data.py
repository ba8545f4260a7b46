"""Synthetic chest X-ray phantoms with planted failure modes: the demo data set.

``python -m tools.make_demo_data --out DIR --n N --seed S [--size 256] [--workers 1]
[--format png|dicom|mixed]`` writes ``DIR/images/p<patient>_f<follow_up>.png`` (8-bit grayscale,
size x size; 7/8 of that from the hidden device of failure mode 4), ``DIR/demo.csv`` with the
columns in ``CSV_COLUMNS``, and ``DIR/demo_truth.csv`` (``TRUTH_FILE``, ``TRUTH_COLUMNS``): the
ground truth of failure modes 4-6, which no CSV column reveals; only tests read it. Not medical
data; for exercising the suite only.

File formats (``--format``)
---------------------------
``png`` (the default) writes every film as above. ``dicom`` writes every film as DICOM, and
``mixed`` half of them (``FORMAT_MIX``: a seeded shuffle gives each film its form, so the shares
are exact to one film, and neither the pixels, the table nor the splits change). The DICOM forms
(``DICOM_FORMS``) cover what a reader must get right: MONOCHROME2 at 12 bits, the same stored
inverted as MONOCHROME1, RLE Lossless and JPEG 2000 Lossless (pydicom's own RLE encoder and
pylibjpeg-openjpeg), a file without an extension, and 8 bits without a window. A 12-bit film
stores the rendered float film f (before the 8-bit conversion) as ``PARAMS["dicom"]["stored"]``
500 + 3000 f (MONOCHROME1: 4095 minus that), with the site's RescaleSlope/RescaleIntercept and a
LINEAR window over exactly that range, so the DICOM reading pipeline gives back f to 1/6000;
the 8-bit form stores the PNG's values. Headers: PatientID (the CSV's patient_id), PatientSex,
PatientAge, ViewPosition, the site's Manufacturer, ManufacturerModelName, InstitutionName and
Modality (DX or CR, with the matching SOP class), PixelSpacing for a 43 cm field, fixed dates,
and UIDs derived from the seed, the patient and the follow-up (same seed, same bytes). The CSV's
``image_path`` names each film's file; the truth file gains ``image_format`` (the form) unless
the format is ``png``.

What the images show
--------------------
Frontal (PA or AP) radiograph look: attenuation is summed in float "log-attenuation" units
(bone and soft tissue bright, aerated lung dark), noise is added, the site's processing and
contrast curve map it to [0, 1], and it is converted to uint8 once. Anatomy: neck, shoulders and
chest wall, two lung fields with apices and costophrenic angles, mediastinum with trachea,
bronchi and aortic knob, hila and branching lung vessels, the heart (two thirds of it to the
patient's left = image right), diaphragm domes (the right one higher), a gastric bubble, posterior
and anterior ribs, clavicles, the spine, breast shadows on female patients; random patient size,
position, small rotation, inspiration and exposure.

Findings (``LABELS``):
- Cardiomegaly: the true cardiothoracic ratio (CTR: widest heart width / widest inner thoracic
  width) is > 0.5 (0.52-0.68); normal hearts have CTR 0.38-0.485 (mean 0.44). The true label is
  a property of the patient and the same on every follow-up (the CSV's may not be: mode 6).
- Effusion: fluid fills the costophrenic recess of one or both hemithoraces, with a meniscus
  (higher at the lateral wall than medially) that blunts the angle and, when larger, hides the
  diaphragm dome. Size ranges from a just-blunted angle to a third of the lung height. Site B
  sees more of it (failure mode 5).
- Edema: bilateral perihilar haze ("bat wing") plus fine interstitial lines: Kerley-B-like short
  horizontal lines running in from the lateral pleura of the lower zones and a few longer
  Kerley-A-like lines pointing to the hila. The haze alone is deliberately faint (and healthy films
  vary in perihilar density too); the lines carry most of the signal.
- Labels co-occur through a latent heart-failure state (more likely with age): it raises the
  chance of Cardiomegaly, Edema and Effusion; Edema raises Effusion further. Sicker patients
  (Edema, Effusion, age >= 75, follow-ups) are imaged AP more often (about a third overall).

Planted failure modes (ground truth for the suite's failure analysis)
---------------------------------------------------------------------
1. Cardiomegaly false positives on AP films. Mechanism: on an AP projection the anterior heart
   lies far from the detector and is magnified (``PARAMS["ap_heart_magnification"]``, 15-20 %
   wider on the image) while the thoracic width is not; the label uses the TRUE anatomical CTR.
   An AP normal with CTR 0.44 shows an apparent CTR of about 0.51-0.53, in the range of PA
   cardiomegaly. Expected finding: in ``group_metrics_view``, lower Cardiomegaly specificity
   (more false positives among label-negative AP images, higher mean predicted probability for
   AP negatives) and lower precision/F1 on AP than on PA.
2. Edema missed at site C. Mechanism: site C's processing is a noise-reduction median filter
   sized to the interstitial lines (applied at a scale where they are 1 px thick) followed by a
   Gaussian low-pass (sigma ``PARAMS["site"]["C"]["lowpass_sigma"]`` of the image width) and a
   different contrast curve. It erases the fine lines (2 px wide at 256 px) and leaves the faint
   perihilar haze plus a faint smudge where the lines were. Both are ambiguous on purpose: every
   film, healthy or not, carries a random perihilar density of the haze's shape
   (``PARAMS["perihilar_density"]``) and a random chest-wall band over the lateral bases
   (``PARAMS["lateral_basal_density"]``). Sites A and B keep the lines, which carry most of the
   Edema signal. Expected finding: in ``group_metrics_site``, Edema sensitivity and AUROC clearly
   lower at site C than at A and B, while Cardiomegaly and Effusion (large, low-frequency
   findings) hold up; stress tests with ``gaussian_blur`` hurt Edema most, for the same reason.
3. Small unilateral effusions are the hard Effusion cases. Mechanism: effusion size is skewed to
   small (Beta(1.2, 2.2)); the smallest only blunt one costophrenic angle, a few pixels of the
   image, and are often unilateral. Expected finding: Effusion false negatives concentrate in
   single-finding images (``num_findings_bin`` "1") and in patients without Edema; the case
   studies show them as barely blunted angles. (Size and side are not CSV columns: the case
   studies are the way to see them.)
4. A hidden device: a failure no metadata column names. Mechanism: ``PARAMS["hidden_device"]``
   ["p"] (25 %) of the images, drawn per image independently of site, view and labels, come from
   an unnamed device whose collimator is set too high: below a horizontal image line at about half
   the height (+/- 1 %, placed after pose) the film is the bright, nearly uniform shadow of the
   unexposed detector (0.9 plus a little noise, soft edge of a pixel or two). It hides the heart
   but for the top of its outline, so its width cannot be read, and every effusion and the lower
   Kerley-B-like lines with it. The device writes its films at ``size_ratio`` (7/8) of ``--size``.
   Expected finding: Cardiomegaly (``PARAMS["hidden_device"]["label"]``, the label a model reads
   best elsewhere) is ranked near chance on these films, found only by slice discovery on the
   model's features (no column names the subset); the slice is described by original size,
   brightness and sharpness.
5. A shortcut: site B. Mechanism: site B adds ``PARAMS["site_effusion"]["B"]`` (0.35) to the
   per-image Effusion probability, and every site-B film carries a burned-in tag
   (``PARAMS["site_tag"]``: a pure white square, 9 % of the image width, with a dark letter,
   top-left with a few pixels of jitter), drawn after processing. A model can detect Effusion
   partly by recognising site B. Expected finding: a probe of ``site`` from the model's features
   is far above chance, and Effusion prevalence differs across sites: a shortcut risk; Grad-CAM of
   Effusion on site-B films is dense on the tag where the model uses it.
6. Label noise in the test split. Mechanism: after the split, for each label on its own,
   ``label_flip_count`` test rows (``PARAMS["test_label_flips"]`` = 5 % of the test split,
   rounded, at least one from 10 test rows up), chosen at random, have the label flipped (0 <-> 1)
   in the CSV; the images show the true labels, and ``num_findings`` counts the CSV's labels.
   Expected finding: label-issue detection ranks the flipped rows at the top (confident
   predictions that disagree with the given label), and test metrics are slightly pessimistic.

Determinism: the table comes from one generator seeded by ``seed`` (the draws of modes 4 and 6
come after the split, so they do not change the patients, true labels and splits drawn before
them); each image has its own ``numpy.random.default_rng`` spawned from the seed and the image's
row number, and its patient's anatomy from a per-patient seed, so the same ``seed`` and ``n`` give
the same CSV, truth file and image bytes whatever the order or parallelism of rendering (on one
platform and library versions: float rounding in numpy/OpenCV kernels may differ between CPUs or
releases).
"""
from __future__ import annotations

import argparse
import math
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from tools.errors import UserError
from tools.table import DEFAULT_LABELS

LABELS = list(DEFAULT_LABELS)  # the findings of the demo phantoms
CSV_COLUMNS = ["image_path", "split", *LABELS, "view", "sex", "age", "site", "patient_id",
               "follow_up", "num_findings", "num_findings_bin"]
SITES = ("A", "B", "C")
TRUTH_FILE = "demo_truth.csv"   # ground truth of failure modes 4-6, for tests only
TRUTH_COLUMNS = ["image_path", "hidden_device",
                 *[column for label in LABELS for column in (f"true_{label}", f"flipped_{label}")]]
FORMATS = ("png", "dicom", "mixed")
# How each DICOM form is written: (PhotometricInterpretation, BitsStored, transfer syntax UID,
# file suffix). 1.2.840.10008.1.2.1: Explicit VR Little Endian; .1.2.5: RLE Lossless;
# .1.2.4.90: JPEG 2000 Lossless.
DICOM_FORMS = {
    "dicom_mono2_12bit": ("MONOCHROME2", 12, "1.2.840.10008.1.2.1", ".dcm"),
    "dicom_mono2_12bit_noext": ("MONOCHROME2", 12, "1.2.840.10008.1.2.1", ""),
    "dicom_mono1_12bit": ("MONOCHROME1", 12, "1.2.840.10008.1.2.1", ".dcm"),
    "dicom_rle_12bit": ("MONOCHROME2", 12, "1.2.840.10008.1.2.5", ".dcm"),
    "dicom_j2k_12bit": ("MONOCHROME2", 12, "1.2.840.10008.1.2.4.90", ".dcm"),
    "dicom_mono2_8bit": ("MONOCHROME2", 8, "1.2.840.10008.1.2.1", ".dcm"),
}
# pylibjpeg-openjpeg encodes with six wavelet levels, which need films of 2^5 = 32 px or more
J2K_MIN_SIDE = 32
# One cycle of forms per --format; the films take them in equal turns: mixed = 6/12 PNG and 1/12
# of each DICOM form, dicom = 1/6 of each.
FORMAT_MIX = {"png": ("png",), "dicom": tuple(DICOM_FORMS), "mixed": ("png",) * len(DICOM_FORMS) + tuple(DICOM_FORMS)}

# Every tunable number. Geometry is in units of the image width (x right, y down) in the patient
# frame before pose; attenuation is in arbitrary log-attenuation units (soft tissue thickness 1).
PARAMS = {
    # ---- population and labels ----
    "follow_up_counts": (0, 1, 2, 3),
    "follow_up_probs": (0.72, 0.14, 0.09, 0.05),
    "age_beta": (2.5, 1.8),                 # age = 20 + 70 * Beta(a, b), mean ~61
    "p_female": 0.5,
    "site_probs": (0.32, 0.30, 0.38),
    "heart_failure_logit": (-1.6, 0.04),    # P(HF) = sigmoid(a + b * (age - 60)), per patient
    "p_cardiomegaly": (0.10, 0.60),         # per patient: base, + if heart failure
    "p_edema": (0.20, 0.45),                # per image: base, + if heart failure
    "p_effusion": (0.09, 0.30, 0.22),       # per image: base, + heart failure, + Edema
    "p_ap": (0.18, 0.25, 0.15, 0.10, 0.12),  # base, + Edema, + Effusion, + age >= 75, + follow-up
    "split_fractions": (0.6, 0.1, 0.1, 0.2),  # train, val (chooses the checkpoint), calib (temperature), test
    # ---- heart ----
    "ctr_normal": (0.44, 0.025, 0.38, 0.485),   # mean, sd, clip low, clip high
    "ctr_enlarged": (0.52, 0.05, 0.68),         # low + Exponential(scale), clip high
    "ap_heart_magnification": (1.15, 1.20),     # uniform range, AP only
    "heart_right_fraction": 0.64,               # share of the heart width right of the midline (image)
    # ---- findings ----
    "effusion_bilateral": (0.30, 0.30),     # P(bilateral): base, + if heart failure
    "effusion_size_beta": (1.2, 2.2),       # size in (0, 1): 0 = blunted angle, 1 = a third of the lung
    "edema_severity": (0.6, 1.0),           # uniform range
    "edema_haze": 0.015,                    # perihilar haze peak at severity 1 (subtle on purpose)
    "perihilar_density": (0.0, 0.05),       # every film: normal variation of the same shape as the haze
    "lateral_basal_density": (0.0, 0.04),   # every film: chest-wall soft tissue over the lateral bases,
                                            # where smoothed-out Kerley lines would leave their mean
    "kerley_b_per_side": 8,                 # at severity 1 (fewer if the base is short)
    "kerley_b_spacing": (0.032, 0.05),      # vertical gap between neighbouring lines, image widths
    "kerley_a_per_side": (2, 3),
    "kerley_amplitude": (0.24, 0.34),
    "kerley_b_length": (0.03, 0.055),       # image widths (4-7 px at 128)
    "kerley_width": 1.0 / 128,              # line thickness, image widths (2 px at 256)
    # ---- bones and soft tissue ----
    "attenuation": {"soft": 1.0, "lung_air": 0.58, "heart": 0.17, "mediastinum": 0.14,
                    "rib": 0.13, "anterior_rib": 0.05, "clavicle": 0.2, "spine": 0.10,
                    "hilum": 0.14, "vessel": 0.09, "trachea": 0.16, "breast": 0.12, "gastric": 0.3},
    # ---- acquisition ----
    "pose": {"scale": (0.93, 1.05), "shift_sd": 0.015, "angle_sd_deg": 2.0},
    "noise_sd": {"PA": 0.010, "AP": 0.022},
    "exposure": {"center_sd": 0.04, "slope_range": (0.9, 1.1)},
    # median: noise reduction that removes structures thinner than half its kernel (the kernel is
    # sized to the interstitial lines); lowpass/unsharp sigmas in image widths; window = (center,
    # slope) of the sigmoid curve; gamma bends the curve after it (different look per site).
    "site": {
        "A": {"median": False, "lowpass_sigma": 0.0, "unsharp": 0.6, "window": (0.76, 3.3), "gamma": 1.0},
        "B": {"median": False, "lowpass_sigma": 0.0, "unsharp": 0.3, "window": (0.74, 3.0), "gamma": 0.88},
        "C": {"median": True, "lowpass_sigma": 0.008, "unsharp": 0.0, "window": (0.80, 3.8), "gamma": 1.25},
    },
    "unsharp_sigma": 0.015,
    # ---- planted failure modes 4-6 (ground truth in TRUTH_FILE, never in the CSV) ----
    # 4. an unnamed device: per image, independent of site, view and labels. Its collimator
    # replaces everything below a horizontal line (image heights, after pose; +/- jitter) by the
    # bright unexposed-detector shadow (value in [0, 1], noise sd) with a soft edge of ~edge_px
    # pixels, and it writes films at size_ratio of --size; label: the finding it hides.
    "hidden_device": {"p": 0.25, "cutoff": 0.50, "cutoff_jitter": 0.01, "shadow": 0.9,
                      "shadow_noise": 0.012, "edge_px": 1.5, "size_ratio": 7 / 8, "label": "Cardiomegaly"},
    # 5. a shortcut: added to the per-image Effusion probability by site, and a burned-in tag
    # (white square of side ``width``, dark ``letter``) on every film of ``site``, top-left at
    # ``corner`` + U(0, jitter) (all in image widths), drawn after processing so it is pure white
    "site_effusion": {"A": 0.0, "B": 0.35, "C": 0.0},
    "site_tag": {"site": "B", "letter": "R", "width": 0.09, "corner": 0.03, "jitter": 0.015},
    # 6. label noise: share of test-split rows whose label is flipped, per label
    "test_label_flips": 0.05,
    # ---- DICOM files (--format dicom|mixed) ----
    # stored: the 12-bit values of film 0 and 1 (MONOCHROME2); field_mm: the side of the imaged
    # field, for PixelSpacing; per site the scanner and its rescale (modality value = slope *
    # stored + intercept)
    "dicom": {
        "stored": (500, 3500), "field_mm": 430.0, "study_date": "2024{month:02d}15", "study_time": "093000",
        "site": {
            "A": {"manufacturer": "Phantom Imaging", "model": "PX-DR 100", "institution": "Demo Site A",
                  "modality": "DX", "slope": 1.0, "intercept": 0.0},
            "B": {"manufacturer": "Phantom Imaging", "model": "PX-DR 300", "institution": "Demo Site B",
                  "modality": "DX", "slope": 0.5, "intercept": -1024.0},
            "C": {"manufacturer": "Synthetic Radiography", "model": "SR-CR 9", "institution": "Demo Site C",
                  "modality": "CR", "slope": 2.0, "intercept": -1000.0},
        },
    },
}


def _sigmoid(z):
    """Logistic function 1 / (1 + exp(-z))."""
    return 1.0 / (1.0 + np.exp(-z))


# ====== the table: patients, labels, metadata, splits ======

def _patient_draw(rng: np.random.Generator) -> dict:
    """One patient's fixed properties: age, sex, site, heart failure, true CTR, follow-ups."""
    p = PARAMS
    age = int(round(20 + 70 * rng.beta(*p["age_beta"])))
    heart_failure = rng.random() < _sigmoid(p["heart_failure_logit"][0] + p["heart_failure_logit"][1] * (age - 60))
    cardiomegaly = rng.random() < p["p_cardiomegaly"][0] + p["p_cardiomegaly"][1] * heart_failure
    if cardiomegaly:
        low, scale, high = p["ctr_enlarged"]
        ctr = min(low + rng.exponential(scale), high)
    else:
        mean, sd, low, high = p["ctr_normal"]
        ctr = float(np.clip(rng.normal(mean, sd), low, high))
    return {
        "age": age,
        "sex": "F" if rng.random() < p["p_female"] else "M",
        "site": SITES[int(rng.choice(len(SITES), p=p["site_probs"]))],
        "heart_failure": bool(heart_failure),
        "Cardiomegaly": int(cardiomegaly),
        "true_ctr": float(ctr),
        "n_images": 1 + int(rng.choice(p["follow_up_counts"], p=p["follow_up_probs"])),
        "anatomy_seed": int(rng.integers(0, 2**63 - 1)),
    }


def _image_draw(patient: dict, follow_up: int, rng: np.random.Generator) -> dict:
    """One image's labels and view, conditioned on the patient (co-occurrence and AP rules)."""
    p = PARAMS
    hf = patient["heart_failure"]
    edema = rng.random() < p["p_edema"][0] + p["p_edema"][1] * hf
    effusion = rng.random() < (p["p_effusion"][0] + p["p_effusion"][1] * hf + p["p_effusion"][2] * edema
                               + p["site_effusion"][patient["site"]])
    b, b_edema, b_effusion, b_old, b_follow = p["p_ap"]
    p_ap = (b + b_edema * edema + b_effusion * effusion
            + b_old * (patient["age"] >= 75) + b_follow * (follow_up > 0))
    return {"Edema": int(edema), "Effusion": int(effusion), "view": "AP" if rng.random() < p_ap else "PA"}


def findings_bin(count: int) -> str:
    """``num_findings_bin``: "0", "1" or "2+"."""
    return "2+" if count >= 2 else str(count)


def label_flip_count(n_test: int) -> int:
    """Failure mode 6: how many test rows get each label flipped: ``test_label_flips`` of them,
    rounded half up, and at least one once the test split has 10 rows (small demo sets still
    carry some noise for the label-issue check to find)."""
    count = int(math.floor(PARAMS["test_label_flips"] * n_test + 0.5))
    return max(count, 1) if n_test >= 10 else count


def sample_cases(n: int, seed: int) -> pd.DataFrame:
    """The demo table for ``n`` images: ``CSV_COLUMNS`` plus the hidden ground truth the renderer
    needs (``true_ctr``, ``heart_failure``, ``anatomy_seed``, ``hidden_device`` and the true labels
    ``true_<label>``). Patients are drawn until ``n`` images exist (the last patient's follow-ups
    are cut to fit); splits are grouped by patient. The label columns are the given (CSV) labels,
    flipped on a few test rows (failure mode 6); images are rendered from ``true_<label>``."""
    from tools.table import auto_split  # one split rule for the whole suite

    table_rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[0])
    rows, patient_id = [], 0
    while len(rows) < n:
        patient = _patient_draw(table_rng)
        for follow_up in range(min(patient["n_images"], n - len(rows))):
            image = _image_draw(patient, follow_up, table_rng)
            count = patient["Cardiomegaly"] + image["Edema"] + image["Effusion"]
            rows.append({
                "image_path": f"images/p{patient_id:05d}_f{follow_up}.png",
                "Cardiomegaly": patient["Cardiomegaly"], "Edema": image["Edema"], "Effusion": image["Effusion"],
                "view": image["view"], "sex": patient["sex"], "age": patient["age"], "site": patient["site"],
                "patient_id": patient_id, "follow_up": follow_up,
                "num_findings": count, "num_findings_bin": findings_bin(count),
                "true_ctr": patient["true_ctr"], "heart_failure": patient["heart_failure"],
                "anatomy_seed": patient["anatomy_seed"],
            })
        patient_id += 1
    df = pd.DataFrame(rows)
    df = auto_split(df, PARAMS["split_fractions"], seed=int(table_rng.integers(0, 2**31 - 1)))
    df = df.reset_index(drop=True)
    # drawn after everything above, so modes 4 and 6 leave the patients, labels and splits as they were
    # failure mode 4: the unnamed device, per image, independent of every CSV column
    df["hidden_device"] = (table_rng.random(len(df)) < PARAMS["hidden_device"]["p"]).astype(int)
    # failure mode 6: label noise in the test split only, each label on its own rows
    test_rows = np.flatnonzero(df["split"].to_numpy() == "test")
    flips = label_flip_count(len(test_rows))
    for label in LABELS:
        given = df[label].to_numpy(dtype=int)
        df[f"true_{label}"] = given.copy()
        chosen = table_rng.choice(test_rows, size=flips, replace=False) if flips else []
        given[chosen] = 1 - given[chosen]
        df[label] = given
    # the CSV's counts agree with the CSV's labels, as a real table's would
    df["num_findings"] = df[LABELS].sum(axis=1)
    df["num_findings_bin"] = df["num_findings"].map(findings_bin)
    hidden = ["true_ctr", "heart_failure", "anatomy_seed", "hidden_device",
              *[f"true_{label}" for label in LABELS]]
    return df[CSV_COLUMNS + hidden]


def truth_table(cases: pd.DataFrame) -> pd.DataFrame:
    """``TRUTH_COLUMNS`` of a ``sample_cases`` table: the hidden device and, per label, the true
    label and whether the CSV's label differs from it."""
    truth = cases[["image_path", "hidden_device"]].copy()
    for label in LABELS:
        truth[f"true_{label}"] = cases[f"true_{label}"]
        truth[f"flipped_{label}"] = (cases[label] != cases[f"true_{label}"]).astype(int)
    return truth[TRUTH_COLUMNS]


# ====== the phantom: every random choice for one image ======

def _uniform(rng, bounds) -> float:
    """One draw from U(low, high) as a Python float."""
    return float(rng.uniform(*bounds))


def _vessel_tree(rng: np.random.Generator, hila: dict) -> np.ndarray:
    """Branching pulmonary vessels from each hilum: rows (x0, y0, x1, y1, width, amplitude)."""
    segments = []
    base_angles = np.deg2rad([-70, -45, -20, 5, 30, 55, 80])  # from lateral, negative = upward
    for side, (hx, hy) in hila.items():
        starts = np.array([[hx, hy]] * len(base_angles))
        angles = base_angles + rng.normal(0, np.deg2rad(6), len(base_angles))
        # lower-zone vessels are larger in the upright patient
        lengths = rng.uniform(0.055, 0.08, len(angles)) * (1.0 + 0.25 * (angles > 0))
        width, amplitude = 0.011, 1.0
        for _ in range(4):
            step = np.stack([side * np.cos(angles), np.sin(angles)], 1) * lengths[:, None]
            ends = starts + step
            # a kink half-way so vessels are gently curved, not straight spokes
            normal = step[:, ::-1] * np.array([-1.0, 1.0])
            mids = starts + 0.5 * step + normal * rng.normal(0, 0.12, (len(step), 1))
            for p0, p1, p2 in zip(starts, mids, ends):
                segments.append((*p0, *p1, width, amplitude))
                segments.append((*p1, *p2, width * 0.9, amplitude * 0.95))
            spread = rng.uniform(np.deg2rad(14), np.deg2rad(32), len(angles))
            angles = np.concatenate([angles - spread, angles + spread]) + rng.normal(0, 0.08, 2 * len(angles))
            starts = np.concatenate([ends, ends])
            lengths = np.concatenate([lengths, lengths]) * rng.uniform(0.62, 0.8, 2 * len(lengths))
            width, amplitude = width * 0.68, amplitude * 0.72
    return np.asarray(segments, dtype=np.float64)


def sample_anatomy(rng: np.random.Generator) -> dict:
    """Patient-level anatomy (same on every follow-up): body build, lungs, ribs, vessels."""
    half_thorax = _uniform(rng, (0.335, 0.365))
    x_m = 0.5
    anatomy = {
        "x_m": x_m,
        "half_thorax": half_thorax,
        "y_apex": _uniform(rng, (0.11, 0.14)),
        "u_apex": _uniform(rng, (0.12, 0.145)),
        "y_widest": _uniform(rng, (0.52, 0.58)),
        "dome_right": _uniform(rng, (0.64, 0.68)),
        "dome_gap": _uniform(rng, (0.015, 0.035)),       # left dome lower by this much
        "recess_depth": _uniform(rng, (0.10, 0.13)),     # costophrenic angle below the dome
        "mediastinum": _uniform(rng, (0.05, 0.06)),
        "aortic_knob": _uniform(rng, (0.025, 0.04)),
        "rib_y0": _uniform(rng, (0.105, 0.125)),
        "rib_spacing": _uniform(rng, (0.052, 0.058)),
        "rib_width": _uniform(rng, (0.020, 0.025)),
        "gastric_bubble": bool(rng.random() < 0.7),
    }
    hila = {-1: (x_m - 0.095, 0.425), 1: (x_m + 0.095, 0.405)}   # left hilum higher
    anatomy["vessels"] = _vessel_tree(rng, hila)
    anatomy["hila"] = hila
    return anatomy


def lung_lateral(y, anatomy: dict, inspiration: float = 0.0):
    """Distance from the midline to the lateral lung border (inner rib cage) at height ``y``;
    its maximum, ``half_thorax``, is half the thoracic width used in the CTR."""
    ht, u_apex = anatomy["half_thorax"], anatomy["u_apex"]
    y_apex, y_w = anatomy["y_apex"], anatomy["y_widest"] + inspiration
    y = np.asarray(y)
    rise = np.clip((y_w - y) / (y_w - y_apex), 0.0, 1.0)
    # widens steadily from the apex (a bell, not an ellipse quadrant)
    upper = u_apex + (ht - u_apex) * np.sin(0.5 * np.pi * (1.0 - rise)) ** 0.7
    lower = ht - 0.012 * np.clip((y - y_w) / 0.25, 0.0, 1.0) ** 2
    return np.where(y < y_w, upper, lower)


def _effusion_draw(rng, heart_failure: bool) -> list:
    """Sides (-1 = patient right = image left, +1) and sizes of the pleural fluid collections."""
    b, b_hf = PARAMS["effusion_bilateral"]
    sizes = lambda k: rng.beta(*PARAMS["effusion_size_beta"], size=k)
    if rng.random() < b + b_hf * heart_failure:
        return [{"side": s, "size": float(v)} for s, v in zip((-1, 1), sizes(2))]
    side = -1 if rng.random() < 0.6 else 1    # right-sided more often
    return [{"side": side, "size": float(sizes(1)[0])}]


def _edema_draw(rng, anatomy: dict, inspiration: float) -> dict:
    """Perihilar haze strength and the interstitial lines (x0, y0, x1, y1, width, amplitude).
    Kerley-B-like lines run horizontally in from the lateral pleura of the lower zones, at least
    ``kerley_b_spacing`` apart; Kerley-A-like lines point at the hila in the upper/mid zones."""
    p = PARAMS
    severity = _uniform(rng, p["edema_severity"])
    width = p["kerley_width"]
    lines = []
    for side in (-1, 1):
        x_m, y_cp = anatomy["x_m"], _costophrenic_y(anatomy, side, inspiration)
        low, high = p["kerley_b_spacing"]
        gaps = rng.uniform(low, high, p["kerley_b_per_side"])
        ys = 0.50 + inspiration + rng.uniform(0.0, 0.04) + np.cumsum(gaps)
        ys = ys[ys < y_cp - 0.035][: max(2, int(round(severity * p["kerley_b_per_side"])))]
        u0 = lung_lateral(ys, anatomy, inspiration) - rng.uniform(0.008, 0.014, len(ys))
        length = rng.uniform(*p["kerley_b_length"], len(ys))
        tilt = rng.uniform(-0.004, 0.004, len(ys))
        amp = rng.uniform(*p["kerley_amplitude"], len(ys))
        for y, u, ln, t, a in zip(ys, u0, length, tilt, amp):
            lines.append((x_m + side * u, y, x_m + side * (u - ln), y + t, width, a))
        hx, hy = anatomy["hila"][side]
        n_a = int(rng.integers(p["kerley_a_per_side"][0], p["kerley_a_per_side"][1] + 1))
        # one line per angular sector, so they never cross
        sectors = np.linspace(np.deg2rad(-75), np.deg2rad(-10), n_a + 1)
        for ang in sectors[:-1] + rng.uniform(0.2, 0.8, n_a) * np.diff(sectors):
            r0, ln = rng.uniform(0.10, 0.16), rng.uniform(0.04, 0.07)
            x0, y0 = hx + side * r0 * math.cos(ang), hy + r0 * math.sin(ang)
            x1, y1 = hx + side * (r0 - ln) * math.cos(ang), hy + (r0 - ln) * math.sin(ang)
            lines.append((x0, y0, x1, y1, 0.8 * width, 0.8 * rng.uniform(*p["kerley_amplitude"])))
    return {"severity": severity, "haze": p["edema_haze"] * severity, "lines": np.asarray(lines)}


def sample_phantom(case, rng: np.random.Generator) -> dict:
    """Every random choice for one image, given its ``sample_cases`` row ``case`` (true labels
    ``true_<label>``, view, sex, site, ``true_ctr``, ``heart_failure``, ``anatomy_seed``,
    ``hidden_device``) and the image's own generator. Rendering (``render_phantom``) is then a
    pure function of this dict. The film shows the TRUE labels, not the (possibly flipped) given
    ones; the draws of failure modes 4 and 5 come last and only on their films, so the other
    films' draws do not depend on them."""
    p = PARAMS
    anatomy = sample_anatomy(np.random.default_rng(int(case["anatomy_seed"])))
    ap = case["view"] == "AP"
    inspiration = float(rng.normal(0.0, 0.012)) + (0.012 if ap else 0.0)   # portable films: shallower
    phantom = {
        "anatomy": anatomy,
        "view": case["view"], "site": case["site"], "sex": case["sex"],
        "pose": {"scale": _uniform(rng, p["pose"]["scale"]),
                 "dx": float(rng.normal(0, p["pose"]["shift_sd"])),
                 "dy": float(rng.normal(0, p["pose"]["shift_sd"])),
                 "angle_deg": float(rng.normal(0, p["pose"]["angle_sd_deg"]))},
        "inspiration": inspiration,
        "true_ctr": float(case["true_ctr"]),
        "heart_mag": _uniform(rng, p["ap_heart_magnification"]) if ap else 1.0,
        "heart_shear": _uniform(rng, (0.25, 0.4)),
        "breast": _uniform(rng, (0.6, 1.0)) if case["sex"] == "F" else 0.0,
        # vessels and soft tissue make the perihilar regions of healthy films vary too, so the
        # edema haze alone is ambiguous
        "perihilar_density": _uniform(rng, p["perihilar_density"]),
        "lateral_basal_density": _uniform(rng, p["lateral_basal_density"]),
        "effusions": _effusion_draw(rng, bool(case["heart_failure"])) if int(case["true_Effusion"]) else [],
        "edema": _edema_draw(rng, anatomy, inspiration) if int(case["true_Edema"]) else None,
        "noise_sd": p["noise_sd"][case["view"]] * _uniform(rng, (0.8, 1.2)),
        "noise_seed": int(rng.integers(0, 2**63 - 1)),
        # this film's exposure, relative to its site's window
        "window_shift": float(rng.normal(0, p["exposure"]["center_sd"])),
        "window_gain": _uniform(rng, p["exposure"]["slope_range"]),
        "collimator": _collimator_draw(rng) if int(case["hidden_device"]) else None,
        "tag": _tag_draw(rng) if case["site"] == p["site_tag"]["site"] else None,
    }
    return phantom


def _collimator_draw(rng) -> dict:
    """Failure mode 4: this film's collimation line (image heights) and its shadow's noise seed."""
    device = PARAMS["hidden_device"]
    return {"cutoff": device["cutoff"] + _uniform(rng, (-device["cutoff_jitter"], device["cutoff_jitter"])),
            "noise_seed": int(rng.integers(0, 2**63 - 1))}


def _tag_draw(rng) -> dict:
    """Failure mode 5: where the burned-in tag's top-left corner lies (image widths)."""
    tag = PARAMS["site_tag"]
    return {"x": tag["corner"] + _uniform(rng, (0.0, tag["jitter"])),
            "y": tag["corner"] + _uniform(rng, (0.0, tag["jitter"]))}


# ====== rendering: a pure function of the phantom ======

def _soft(d, edge: float):
    """Smooth step from 0 (d <= -2 edge) through 0.5 (d = 0) to 1 (d >= 2 edge); ``d`` is a
    signed distance in image widths, positive inside. A cubic smoothstep: cheaper than tanh."""
    t = np.clip(d * (0.25 / edge) + 0.5, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _pose_matrix(pose: dict, size: int) -> np.ndarray:
    """2x3 affine from patient-frame coordinates (image widths) to pixel coordinates."""
    a = math.radians(pose["angle_deg"])
    s = pose["scale"]
    rot = s * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    c = np.array([0.5, 0.5])
    offset = c + np.array([pose["dx"], pose["dy"]]) - rot @ c
    # normalised -> pixel: pixel centres at (i + 0.5) / size
    return np.hstack([rot * size, (offset * size - 0.5)[:, None]])


def _patient_grid(pose: dict, size: int):
    """Patient-frame coordinates (X, Y) of every pixel centre (the inverse pose)."""
    m = _pose_matrix(pose, size)
    inv = cv2.invertAffineTransform(m).tolist()   # Python floats keep the grid float32
    # float32 throughout the renderer: half the memory traffic, ample precision for 8-bit output
    j, i = np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32))
    x = inv[0][0] * j + inv[0][1] * i + inv[0][2]
    y = inv[1][0] * j + inv[1][1] * i + inv[1][2]
    return x, y


def _draw_segments(segments: np.ndarray, pose: dict, size: int, scale: float) -> np.ndarray:
    """Antialiased lines (x0, y0, x1, y1, width, amplitude) in the patient frame, rendered at
    pixel level; returns float32 amplitude in attenuation units (amplitude * ``scale``)."""
    canvas = np.zeros((size, size), np.uint8)
    if len(segments) == 0:
        return canvas.astype(np.float32)
    m = _pose_matrix(pose, size)
    pts0 = segments[:, 0:2] @ m[:, :2].T + m[:, 2]
    pts1 = segments[:, 2:4] @ m[:, :2].T + m[:, 2]
    amp_max = float(segments[:, 5].max())
    # cv2 takes integer coordinates with ``shift`` fractional bits (here 4: 1/16 pixel)
    p0 = np.rint(pts0 * 16).astype(int).tolist()
    p1 = np.rint(pts1 * 16).astype(int).tolist()
    thickness = np.maximum(1, np.rint(segments[:, 4] * size * pose["scale"])).astype(int).tolist()
    color = np.rint(255 * segments[:, 5] / amp_max).astype(int).tolist()
    for a, b, t, c in zip(p0, p1, thickness, color):
        cv2.line(canvas, a, b, c, t, cv2.LINE_AA, 4)
    return canvas.astype(np.float32) * np.float32(scale * amp_max / 255.0)


def _costophrenic_y(anatomy: dict, side: int, inspiration: float) -> float:
    """Height of the costophrenic angle on ``side`` (-1 patient right, +1 patient left)."""
    return _dome_y(anatomy, side, inspiration) + anatomy["recess_depth"]


def _dome_y(anatomy: dict, side: int, inspiration: float) -> float:
    """Height of the top of the hemidiaphragm; the right one (side -1) is higher."""
    return anatomy["dome_right"] + (anatomy["dome_gap"] if side > 0 else 0.0) + inspiration


def _diaphragm(u, anatomy: dict, side: int, inspiration: float):
    """Lower lung border y(u) on one side: a dome peaking mid-hemithorax, dropping steeply to
    the costophrenic angle laterally and a little medially (cardiophrenic angle)."""
    ht = anatomy["half_thorax"]
    u_d = 0.5 * ht
    y_d = _dome_y(anatomy, side, inspiration)
    t = np.clip((u - u_d) / (ht - u_d), 0.0, None)
    lateral = y_d + anatomy["recess_depth"] * t * t * (0.7 + 0.3 * t)   # steeper than a parabola near the wall
    medial = y_d + 0.035 * np.clip((u_d - u) / u_d, 0.0, None) ** 2
    return np.where(u > u_d, lateral, medial)


def _tube(t):
    """Cross-section of a hollow bone at offset t in [-1, 1] of its half-width: bright cortex."""
    outer = np.sqrt(np.clip(1.0 - t * t, 0.0, None))
    inner = np.sqrt(np.clip(0.72 ** 2 - t * t, 0.0, None))
    return outer - 0.65 * inner


def _body(x, y, anatomy: dict):
    """Soft-tissue thickness: neck, shoulders, chest wall, flanks (elliptic cross-section)."""
    ht = anatomy["half_thorax"]
    # neck flaring into rounded shoulders, then the chest wall, widest at the lower ribs
    shoulder_y = np.linspace(0.0, 0.2, 21)
    shoulder_w = 0.085 + 0.375 * np.sin(0.5 * np.pi * np.clip((shoulder_y - 0.04) / 0.16, 0.0, 1.0)) ** 0.6
    knots_y = [*shoulder_y, 0.26, 0.34, 0.62, 0.85, 1.0]
    knots_w = [*shoulder_w, 0.45, ht + 0.045, ht + 0.065, ht + 0.04, ht + 0.01]
    hw = np.interp(y, knots_y, knots_w).astype(np.float32)
    u = np.abs(x - anatomy["x_m"])
    return _soft(hw - u, 0.004) * (0.35 + 0.65 * np.sqrt(np.clip(1.0 - (u / hw) ** 2, 0.0, None)))


def _lung(x, y, side: int, anatomy: dict, lateral, floor):
    """(mask, air): soft lung-field mask of one side and its air content (thinner at the edges);
    ``lateral`` is :func:`lung_lateral` and ``floor`` that side's diaphragm height at each pixel."""
    u = side * (x - anatomy["x_m"])
    d_lat = lateral - u
    knob = anatomy["aortic_knob"] * np.exp(-((y - 0.29) / 0.035) ** 2) if side > 0 else 0.0
    d_med = u - (anatomy["mediastinum"] + knob)
    d_top = y - (anatomy["y_apex"] + 5.0 * (u - anatomy["u_apex"]) ** 2)
    d_bot = floor - y
    mask = _soft(d_lat, 0.005) * _soft(d_med, 0.004) * _soft(d_top, 0.006) * _soft(d_bot, 0.003)
    depth = 0.5 + 0.5 * np.clip(np.minimum(np.minimum(d_lat, d_top), d_bot) / 0.09, 0.0, 1.0)
    return mask, mask * depth


def _effusion_fluid(x, y, effusion: dict, anatomy: dict, inspiration: float):
    """Fluid fraction (0-1) below a meniscus that is highest at the lateral wall."""
    side, size = effusion["side"], effusion["size"]
    ht = anatomy["half_thorax"]
    u = side * (x - anatomy["x_m"])
    y_lateral = _costophrenic_y(anatomy, side, inspiration) - (0.05 + 0.25 * size)
    # the meniscus climbs steeply along the lateral wall, and the layer thickens downwards
    sag = (0.04 + 0.10 * size) * np.clip((ht - u) / (ht - 0.05), 0.0, 1.0) ** 0.6
    below = y - (y_lateral + sag)
    return _soft(below, 0.008) * (0.4 + 0.6 * np.clip(below / 0.05, 0.0, 1.0)) * _soft(u, 0.004)


def _heart(x, y, phantom: dict):
    """(mask, depth) of the cardiac silhouette. Its widest horizontal extent is
    ``true_ctr * 2 * half_thorax * heart_mag``, placed ``heart_right_fraction`` right of the
    midline, sheared so the apex is low on the image right, sitting on the left dome."""
    a_ = phantom["anatomy"]
    width = phantom["true_ctr"] * 2.0 * a_["half_thorax"] * phantom["heart_mag"]
    half = width / 2.0
    b = 0.5 * half + 0.055
    k = phantom["heart_shear"]
    a = math.sqrt(max(half ** 2 - (k * b) ** 2, 1e-6))
    x_c = a_["x_m"] + (PARAMS["heart_right_fraction"] - 0.5) * width
    y_c = _dome_y(a_, 1, phantom["inspiration"]) - 0.07
    r = np.sqrt(((x - x_c - k * (y - y_c)) / a) ** 2 + ((y - y_c) / b) ** 2)
    mask = _soft((1.0 - r) * a, 0.003)
    return mask, np.sqrt(np.clip(1.0 - r * r, 0.0, 1.0))


def _ribs(x, y, anatomy: dict, below_fade):
    """Posterior ribs (arcs rising from the spine, then curving down laterally, bright cortex)
    and fainter anterior ribs (sloping down medially), both sides."""
    att = PARAMS["attenuation"]
    ht, sp, y0 = anatomy["half_thorax"], anatomy["rib_spacing"], anatomy["rib_y0"]
    u = np.abs(x - anatomy["x_m"])
    un = u * 0.35 / ht
    arc = y - (-0.35 * un + 1.7 * un ** 2)
    # rib k sits at y0 + k*sp + 0.0015*k^2 (spacing widens downwards); invert for continuous k
    qa = 0.0015
    k = (-sp + np.sqrt(np.clip(sp * sp + 4 * qa * (arc - y0), 0.0, None))) / (2 * qa)
    frac = k - np.floor(k)
    half_w = anatomy["rib_width"] / (2 * sp)
    posterior = _tube((frac - 0.5) / half_w) * ((k >= 0) & (k < 10))
    posterior = posterior * _soft(u - 0.03, 0.006) * _soft(ht + 0.035 - u, 0.01) * below_fade
    # anterior ribs: visible from the lateral wall to the costochondral junction
    arc_a = y + 0.5 * (u - ht)
    ka = (arc_a - (y0 + 0.02)) / 0.075
    fa = ka - np.floor(ka)
    anterior = np.sqrt(np.clip(1.0 - ((fa - 0.5) / 0.17) ** 2, 0.0, None)) * ((ka >= 0) & (ka < 6))
    anterior = anterior * _soft(u - 0.14, 0.03) * _soft(ht + 0.02 - u, 0.01) * below_fade
    return att["rib"] * posterior + att["anterior_rib"] * anterior


def _clavicles(x, y, anatomy: dict):
    """Two S-shaped clavicles from the sternal notch out to the shoulders."""
    u = np.abs(x - anatomy["x_m"])
    t = np.clip((u - 0.035) / 0.33, 0.0, 1.0)
    centre = anatomy["y_apex"] + 0.06 - 0.085 * t + 0.014 * np.sin(2 * np.pi * t)
    half_w = 0.013 - 0.004 * t
    along = _soft(u - 0.035, 0.004) * _soft(0.365 - u, 0.006)
    return PARAMS["attenuation"]["clavicle"] * _tube((y - centre) / half_w) * along


def _spine(x, y, anatomy: dict):
    """Vertebral column: bodies separated by disc spaces, with paired pedicles."""
    dx = x - anatomy["x_m"]
    column = _soft(0.032 - np.abs(dx), 0.004)
    phase = y / 0.05
    f = phase - np.floor(phase)
    disc = np.exp(-(np.minimum(f, 1.0 - f) / 0.09) ** 2)
    pedicles = np.exp(-(((np.abs(dx) - 0.023) / 0.0065) ** 2 + ((f - 0.4) / 0.14) ** 2))
    return PARAMS["attenuation"]["spine"] * (column * (1.0 - 0.55 * disc) + 0.5 * pedicles)


def _segment_distance(x, y, p0, p1):
    """Distance from each (x, y) to the segment p0-p1."""
    (x0, y0), (x1, y1) = p0, p1
    vx, vy = x1 - x0, y1 - y0
    t = np.clip(((x - x0) * vx + (y - y0) * vy) / (vx * vx + vy * vy), 0.0, 1.0)
    return np.hypot(x - x0 - t * vx, y - y0 - t * vy)


def _airways(x, y, anatomy: dict):
    """Trachea down to the carina and the two main bronchi (air: lowers attenuation)."""
    x_m = anatomy["x_m"]
    carina = (x_m + 0.004, 0.36)
    d = np.minimum.reduce([
        _segment_distance(x, y, (x_m, -0.05), carina),
        _segment_distance(x, y, carina, (x_m - 0.045, 0.41)) + 0.004,   # right: steeper, wider
        _segment_distance(x, y, carina, (x_m + 0.055, 0.395)) + 0.006,
    ])
    return PARAMS["attenuation"]["trachea"] * _soft(0.016 - d, 0.003)


def _breasts(x, y, x_m: float):
    """Two breast shadows over the lower zones, densest centrally, with a rounded lower edge."""
    total = np.zeros_like(x)
    for side in (-1, 1):
        r2 = ((x - x_m - side * 0.25) / 0.17) ** 2 + ((y - 0.55) / 0.15) ** 2
        total += _soft(1.0 - r2, 0.03) * np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))
    return total


def _gastric_bubble(x, y, x_m: float, dome_left: float):
    """Air under the left hemidiaphragm (image right), flat-topped by the dome."""
    r2 = ((x - x_m - 0.17) / 0.045) ** 2 + ((y - dome_left - 0.045) / 0.025) ** 2
    return _soft(1.0 - r2, 0.08) * _soft(y - dome_left - 0.03, 0.004)


def _perihilar(x, y, hila: dict):
    """Bilateral "bat wing" shape around the hila, peak 1, fading towards the periphery."""
    shape = np.zeros_like(x)
    for side, (hx, hy) in hila.items():
        shape += np.exp(-0.5 * (((x - hx - side * 0.03) / 0.075) ** 2 + ((y - hy - 0.02) / 0.11) ** 2))
    return shape


def _lateral_basal(x, y, anatomy: dict, inspiration: float, lateral):
    """A soft band along the lateral lung border (``lateral``, :func:`lung_lateral`) of the lower
    zones (both sides), peak 1: the region the Kerley-B-like lines occupy."""
    band = np.zeros_like(x)
    for side in (-1, 1):
        u = side * (x - anatomy["x_m"])
        inset = lateral - 0.03 - u
        bottom = _costophrenic_y(anatomy, side, inspiration) - 0.03
        rows = _soft(y - 0.5 - inspiration, 0.02) * _soft(bottom - y, 0.02)
        band += np.exp(-0.5 * (inset / 0.02) ** 2) * rows
    return band


def _attenuation(phantom: dict, size: int) -> np.ndarray:
    """Noise-free log-attenuation image of the phantom (float32, size x size)."""
    a_, att, insp = phantom["anatomy"], PARAMS["attenuation"], phantom["inspiration"]
    x, y = _patient_grid(phantom["pose"], size)
    x_m = a_["x_m"]

    mu = att["soft"] * _body(x, y, a_)
    heart, heart_depth = _heart(x, y, phantom)
    floors = {side: _diaphragm(side * (x - x_m), a_, side, insp) for side in (-1, 1)}
    y_floor = np.where(x > x_m, floors[1], floors[-1])
    heart = heart * _soft(y_floor + 0.01 - y, 0.004)
    mediastinum = (_soft(a_["mediastinum"] + 0.01 - np.abs(x - x_m), 0.006)
                   * _soft(y - 0.1, 0.02) * _soft(y_floor - y, 0.004))
    mu += att["mediastinum"] * mediastinum * (1.0 - heart) + att["heart"] * heart * (0.5 + 0.5 * heart_depth)

    lung_total, air_total = np.zeros_like(x), np.zeros_like(x)
    fluid_total = np.zeros_like(x)
    lateral = lung_lateral(y, a_, insp)  # the same border for both lungs and the basal band
    for side in (-1, 1):
        mask, air = _lung(x, y, side, a_, lateral, floors[side])
        for eff in phantom["effusions"]:
            if eff["side"] == side:
                fluid = _effusion_fluid(x, y, eff, a_, insp)
                air = air * (1.0 - fluid)
                fluid_total += fluid * mask
        lung_total += mask
        air_total += air
    aerated = air_total * (1.0 - 0.75 * heart)
    mu -= att["lung_air"] * aerated

    for side, (hx, hy) in a_["hila"].items():
        mu += att["hilum"] * np.exp(-(((x - hx) / 0.022) ** 2 + ((y - hy) / 0.05) ** 2))
    periphery = _soft(np.abs(x - x_m) - 0.06, 0.01)
    vessels = _draw_segments(a_["vessels"], phantom["pose"], size, att["vessel"])
    mu += cv2.GaussianBlur(vessels, (0, 0), 0.5) * lung_total * (1.0 - fluid_total) * periphery

    if phantom["breast"] > 0:
        mu += att["breast"] * phantom["breast"] * _breasts(x, y, x_m)
    if a_["gastric_bubble"]:
        mu -= att["gastric"] * _gastric_bubble(x, y, x_m, _dome_y(a_, 1, insp))
    haze = phantom["perihilar_density"] + (phantom["edema"]["haze"] if phantom["edema"] else 0.0)
    mu += haze * _perihilar(x, y, a_["hila"]) * lung_total
    mu += phantom["lateral_basal_density"] * _lateral_basal(x, y, a_, insp, lateral) * lung_total
    if phantom["edema"] is not None:
        lines = _draw_segments(phantom["edema"]["lines"], phantom["pose"], size, 1.0)
        mu += lines * lung_total * (1.0 - fluid_total)

    # lower ribs fade out over the upper abdomen
    mu += _ribs(x, y, a_, 0.25 + 0.75 * _soft(y_floor + 0.03 - y, 0.02))
    mu += _clavicles(x, y, a_) + _spine(x, y, a_) - _airways(x, y, a_)
    return mu


def _remove_thin_lines(image: np.ndarray) -> np.ndarray:
    """Median filter that erases the interstitial lines: at a scale where they are 1 px thick
    (2 rows once antialiased), a 5x5 median replaces them by their surroundings while broad
    structures keep their edges. Larger images are filtered at that scale and resized back,
    which low-passes them as well."""
    size = image.shape[0]
    work = max(32, round(size / max(1, round(PARAMS["kerley_width"] * size))))
    if work == size:
        return cv2.medianBlur(image, 5)
    small = cv2.medianBlur(cv2.resize(image, (work, work), interpolation=cv2.INTER_AREA), 5)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_LINEAR)


def _process(mu: np.ndarray, phantom: dict) -> np.ndarray:
    """Detector noise, then the site's filtering and contrast curve: float image in [0, 1]."""
    size = mu.shape[0]
    rng = np.random.default_rng(phantom["noise_seed"])
    # quantum noise grows where fewer photons get through (denser regions)
    noisy = mu + phantom["noise_sd"] * np.exp(0.5 * (mu - 0.5)) * rng.standard_normal(mu.shape)
    noisy = noisy.astype(np.float32)
    site = PARAMS["site"][phantom["site"]]
    if site["median"]:
        noisy = _remove_thin_lines(noisy)
    if site["lowpass_sigma"] > 0:
        noisy = cv2.GaussianBlur(noisy, (0, 0), site["lowpass_sigma"] * size)
    if site["unsharp"] > 0:
        blurred = cv2.GaussianBlur(noisy, (0, 0), PARAMS["unsharp_sigma"] * size)
        noisy = noisy + site["unsharp"] * (noisy - blurred)
    center, slope = site["window"]
    curve = _sigmoid(slope * phantom["window_gain"] * (noisy - center - phantom["window_shift"]))
    return np.clip(curve, 0.0, 1.0) ** site["gamma"]


def film_size(phantom: dict, size: int) -> int:
    """Side of the written film: ``size``, or ``size_ratio`` of it from the hidden device (mode
    4), so the films' original size describes that subset."""
    if phantom["collimator"] is None:
        return int(size)
    return int(round(size * PARAMS["hidden_device"]["size_ratio"]))


def _collimate(image: np.ndarray, collimator: dict) -> np.ndarray:
    """Failure mode 4: below the collimation line (image rows, after pose) the detector was not
    exposed: a bright, nearly uniform shadow with a soft edge of a pixel or two replaces the
    film, and with it all but the top of the heart's outline and every effusion."""
    device, size = PARAMS["hidden_device"], image.shape[0]
    rows = (np.arange(size, dtype=np.float32) + 0.5) / size
    # _soft ramps over 4 edges: edge_px / 4 pixels each
    inside = _soft(rows - collimator["cutoff"], device["edge_px"] / (4.0 * size))[:, None]
    rng = np.random.default_rng(collimator["noise_seed"])
    shadow = device["shadow"] + device["shadow_noise"] * rng.standard_normal(image.shape)
    return np.clip(image * (1.0 - inside) + shadow * inside, 0.0, 1.0)


def _burn_tag(image: np.ndarray, tag: dict) -> np.ndarray:
    """Failure mode 5: a white square with a dark letter burned into the top-left corner after
    processing, so it is pure white (255) on every film that carries it."""
    params, size = PARAMS["site_tag"], image.shape[0]
    side = max(4, int(round(params["width"] * size)))
    patch = np.full((side, side), 255, np.uint8)
    font, thickness = cv2.FONT_HERSHEY_SIMPLEX, max(1, int(round(side / 12)))
    (width, height), _ = cv2.getTextSize(params["letter"], font, 1.0, thickness)
    scale = 0.6 * side / height
    (width, height), _ = cv2.getTextSize(params["letter"], font, scale, thickness)
    origin = ((side - width) // 2, (side + height) // 2)
    cv2.putText(patch, params["letter"], origin, font, scale, 0, thickness, cv2.LINE_AA)
    x0, y0 = int(round(tag["x"] * size)), int(round(tag["y"] * size))
    out = image.copy()
    out[y0:y0 + side, x0:x0 + side] = patch.astype(np.float32) / 255.0
    return out


def render_phantom(phantom: dict, size: int = 256) -> np.ndarray:
    """The displayed film of a phantom: float32 in [0, 1], ``film_size`` square (``size`` unless
    the hidden device took it); pure and deterministic."""
    image = _process(_attenuation(phantom, film_size(phantom, size)), phantom)
    if phantom["collimator"] is not None:
        image = _collimate(image, phantom["collimator"])
    if phantom["tag"] is not None:
        image = _burn_tag(image, phantom["tag"])
    return image.astype(np.float32)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8 (rounded, clipped); the only conversion step."""
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def image_generators(n: int, seed: int) -> list:
    """One independent generator per image row, spawned from ``seed`` (stream 1; the table uses
    stream 0), so an image's pixels depend only on (seed, row)."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2)[1].spawn(n)]


def render_case(case, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """uint8 film for one table row."""
    return to_uint8(render_phantom(sample_phantom(case, rng), size))


# ====== DICOM films ======

def film_formats(n: int, seed: int, image_format: str = "png") -> list[str]:
    """The form each of ``n`` films is written in (``FORMAT_MIX``): the cycle repeated over a
    seeded shuffle of the rows (its own stream, 2, of ``seed``), so the shares are exact to a film
    and nothing else the seed draws changes."""
    cycle = FORMAT_MIX[image_format]
    if len(cycle) == 1:
        return [cycle[0]] * n
    order = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2,))).permutation(n)
    return [cycle[int(i) % len(cycle)] for i in order]


def film_path(png_path: str, form: str) -> str:
    """``image_path`` of a film written in ``form``: the PNG's name with the form's suffix."""
    if form == "png":
        return png_path
    return str(Path(png_path).with_suffix(DICOM_FORMS[form][3]))


def _ds(value: float) -> str:
    """A decimal string (DICOM VR DS, at most 16 characters)."""
    return f"{value:.10g}"


def dicom_attributes(row: dict, form: str, seed: int, side: int) -> dict:
    """The data elements of a film's DICOM file: patient, study, scanner, geometry, and for 12-bit
    forms the rescale and the window over the stored range (module docstring)."""
    from pydicom.uid import ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation, generate_uid

    params = PARAMS["dicom"]
    site = params["site"][row["site"]]
    photometric, bits, _, _ = DICOM_FORMS[form]
    key = f"cxr-demo:{seed}:{row['patient_id']}:{row['follow_up']}"
    date = params["study_date"].format(month=int(row["follow_up"]) + 1)
    spacing = _ds(params["field_mm"] / side)
    attributes = {
        "SOPClassUID": DigitalXRayImageStorageForPresentation if site["modality"] == "DX"
        else ComputedRadiographyImageStorage,
        # pydicom's generate_uid hashes the sources (SHA-512) under its root: same sources, same UID
        "SOPInstanceUID": generate_uid(entropy_srcs=[key, ":instance"]),
        "StudyInstanceUID": generate_uid(entropy_srcs=[key, ":study"]),
        "SeriesInstanceUID": generate_uid(entropy_srcs=[key, ":series"]),
        "StudyDate": date, "SeriesDate": date, "ContentDate": date, "StudyTime": params["study_time"],
        "Modality": site["modality"], "Manufacturer": site["manufacturer"],
        "ManufacturerModelName": site["model"], "InstitutionName": site["institution"],
        "PatientName": f"DEMO^{int(row['patient_id']):05d}", "PatientID": str(row["patient_id"]),
        "PatientSex": row["sex"], "PatientAge": f"{int(row['age']):03d}Y", "BodyPartExamined": "CHEST",
        "ViewPosition": row["view"], "SeriesNumber": 1, "InstanceNumber": 1,
        "PhotometricInterpretation": photometric, "BitsStored": bits, "PixelSpacing": [spacing, spacing],
    }
    if bits == 12:
        low, high = params["stored"] if photometric == "MONOCHROME2" else (4095 - params["stored"][1],
                                                                            4095 - params["stored"][0])
        black, white = (site["slope"] * v + site["intercept"] for v in (low, high))
        # LINEAR window (PS3.3 C.11.2.1.2.1): black -> 0 and white -> 1 when
        # centre - 0.5 = (black + white) / 2 and width - 1 = white - black
        attributes.update(RescaleSlope=_ds(site["slope"]), RescaleIntercept=_ds(site["intercept"]), RescaleType="US",
                          WindowCenter=_ds((black + white) / 2 + 0.5), WindowWidth=_ds(white - black + 1))
    return attributes


def dicom_stored(film: np.ndarray, form: str) -> np.ndarray:
    """The stored values of a rendered float film (module docstring)."""
    photometric, bits, _, _ = DICOM_FORMS[form]
    if bits == 8:
        return to_uint8(film)
    low, high = PARAMS["dicom"]["stored"]
    stored = np.rint(low + (high - low) * np.clip(film, 0.0, 1.0)).astype(np.uint16)
    return (4095 - stored).astype(np.uint16) if photometric == "MONOCHROME1" else stored


# ====== the data set ======

def _write_film(job) -> str | None:
    """Render one row and write its file (PNG or a DICOM form); return its ``image_path`` if the
    write failed."""
    out_dir, row, rng, size, form, seed = job
    path = Path(out_dir) / row["image_path"]
    if form == "png":
        return None if cv2.imwrite(str(path), render_case(row, rng, size)) else row["image_path"]
    from tools.dicom import write_dicom

    film = render_phantom(sample_phantom(row, rng), size)
    try:
        write_dicom(path, dicom_stored(film, form), dicom_attributes(row, form, seed, film.shape[0]),
                    DICOM_FORMS[form][2])
    except OSError:
        return row["image_path"]
    return None


def _check_counts(n, size, workers) -> None:
    """--n, --size and --workers of a demo set or a new site: each at least what a film needs."""
    if int(n) < 1:
        raise UserError(f"--n {n}: need at least 1 image")
    if int(size) < 32:
        raise UserError(f"--size {size}: need at least 32 pixels")
    if int(workers) < 1:
        raise UserError(f"--workers {workers}: need at least 1 process")


def _images_folder(out_dir) -> Path:
    """``out_dir`` as a Path, with its ``images/`` folder made; UserError when it cannot be."""
    out_dir = Path(out_dir)
    try:
        (out_dir / "images").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out {out_dir}: cannot create the folder ({err.strerror}); "
                        "pick a writable path") from err
    return out_dir


def _write_films(write, jobs: list, workers: int, out_dir: Path) -> None:
    """``write(job)`` for every job, in ``workers`` processes when more than one; each returns the
    ``image_path`` it could not write, or None. UserError naming the first failure."""
    if workers > 1:
        # spawn, not fork: a forked child inherits the parent's thread pools (OpenMP, OpenCV) broken
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            chunk = max(1, len(jobs) // (8 * workers))
            failed = [p for p in pool.map(write, jobs, chunksize=chunk) if p]
    else:
        failed = [p for p in map(write, jobs) if p]
    if failed:
        raise UserError(f"--out {out_dir}: cannot write {failed[0]} ({len(failed)} failed); "
                        "check free space and permissions")


def make_demo_dataset(out_dir, n: int = 1000, seed: int = 0, size: int = 256, workers: int = 1,
                      image_format: str = "png") -> Path:
    """Write ``out_dir/images/*`` (PNG, or DICOM forms with ``image_format`` dicom or mixed),
    ``out_dir/demo.csv`` (``CSV_COLUMNS``) and the ground truth of failure modes 4-6,
    ``out_dir/TRUTH_FILE`` (``TRUTH_COLUMNS``, plus ``image_format`` unless png; for tests, the
    suite never reads it); return the CSV path. Same ``seed``, ``n`` and format give
    byte-identical files, whatever ``workers`` is."""
    from tools.files import write_csv

    _check_counts(n, size, workers)
    if image_format not in FORMATS:
        raise UserError(f"--format {image_format}: choose one of {', '.join(FORMATS)}")
    if image_format != "png" and round(int(size) * PARAMS["hidden_device"]["size_ratio"]) < J2K_MIN_SIDE:
        raise UserError(f"--size {size} with --format {image_format}: the JPEG 2000 films need {J2K_MIN_SIDE} px "
                        f"and the hidden device writes {PARAMS['hidden_device']['size_ratio']:.3g} of --size; "
                        "pass --size 37 or more")
    out_dir = _images_folder(out_dir)
    cases = sample_cases(int(n), int(seed))
    forms = film_formats(len(cases), int(seed), image_format)
    cases["image_path"] = [film_path(p, form) for p, form in zip(cases["image_path"], forms)]
    jobs = [(str(out_dir), row, rng, int(size), form, int(seed))
            for row, rng, form in zip(cases.to_dict("records"), image_generators(len(cases), int(seed)), forms)]
    _write_films(_write_film, jobs, int(workers), out_dir)
    truth = truth_table(cases)
    if image_format != "png":
        truth["image_format"] = forms
    write_csv(out_dir / TRUTH_FILE, truth)
    return write_csv(out_dir / "demo.csv", cases[CSV_COLUMNS])


def build_parser() -> argparse.ArgumentParser:
    from tools.demo_sites import SHIFTS

    parser = argparse.ArgumentParser(
        prog="python -m tools.make_demo_data",
        description="Write a synthetic chest X-ray demo data set (phantoms with planted failure modes).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", required=True,
                        help="output folder (images/, demo.csv and the tests' demo_truth.csv)")
    parser.add_argument("--n", type=int, default=1000, help="number of images")
    parser.add_argument("--site-shift", choices=SHIFTS, default=None,
                        help="write a new site's export instead: --out/images/*.png only (no table), the tests' "
                             "site_truth.csv beside it; none = the demo's distribution (tools/demo_sites.py)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes rendering in parallel (the output does not depend on it)")
    parser.add_argument("--format", choices=FORMATS, default="png", dest="image_format",
                        help="png: 8-bit PNG films; dicom: every film DICOM (12-bit MONOCHROME2/MONOCHROME1, RLE, "
                             "JPEG 2000, no extension, 8-bit); mixed: half PNG, half those DICOM forms")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.site_shift:
        return site_main(args)
    start = time.perf_counter()
    try:
        csv_path = make_demo_dataset(args.out, n=args.n, seed=args.seed, size=args.size, workers=args.workers,
                                     image_format=args.image_format)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    df = pd.read_csv(csv_path)
    prevalence = ", ".join(f"{label} {df[label].mean():.2f}" for label in LABELS)
    print(f"wrote {len(df)} images and {csv_path} in {time.perf_counter() - start:.1f} s "
          f"(prevalence: {prevalence}; AP {(df['view'] == 'AP').mean():.2f})")
    return 0


# ====== a new site (--site-shift): the demo's phantoms as another hospital exports them ======

SITE_TRUTH_COLUMNS = ["image_path", "planted", "view", "site", "hidden_device", *[f"true_{label}" for label in LABELS]]


def render_site_film(case, rng: np.random.Generator, size: int, kind: str, planted: str = "") -> np.ndarray:
    """uint8 film of one ``sample_cases`` row as a new site of ``kind`` writes it
    (``tools.demo_sites``): the phantom is drawn as for the demo, so a row shows the same patient
    at every site; a planted lateral film goes through the row's own site processing."""
    from tools.demo_sites import lateral_attenuation, shift_film

    phantom = sample_phantom(case, rng)
    if planted == "lateral":
        image = _process(lateral_attenuation(rng, int(size)), phantom)
        if phantom["tag"] is not None:
            image = _burn_tag(image, phantom["tag"])
    else:
        image = render_phantom(phantom, size)
    return to_uint8(shift_film(image, kind, planted, rng))


def _write_site_film(job) -> str | None:
    """Render one row of a new site and write its PNG; its ``image_path`` if the write failed."""
    out_dir, row, rng, size, kind = job
    film = render_site_film(row, rng, size, kind, row["planted"])
    return None if cv2.imwrite(str(Path(out_dir) / row["image_path"]), film) else row["image_path"]


def site_cases(n: int, seed: int) -> pd.DataFrame:
    """``n`` rows of ``sample_cases`` of ``seed``, one film per patient (drawn at random among the
    patient's films), in patient order; ``row``: the film's row in that table, whose generator
    renders it, so a site's film is the demo's film of the same row."""
    m = 2 * n + 10
    while True:
        cases = sample_cases(m, seed)
        if cases["patient_id"].nunique() > n:  # the last patient's films may have been cut short
            break
        m *= 2
    pick = np.random.default_rng([seed, 8]).random(len(cases))
    chosen = cases.assign(row=np.arange(len(cases)), pick=pick).sort_values(["patient_id", "pick"]).groupby(
        "patient_id", sort=True).head(1)
    return chosen.head(n).drop(columns="pick").reset_index(drop=True)


def make_site(out_dir, kind: str, n: int = 300, seed: int = 0, size: int = 256, workers: int = 1) -> Path:
    """A new site's export of ``n`` films of ``n`` patients: ``out_dir/images/n<row>.png`` and
    nothing else in that folder (no table, no labels), and beside it ``out_dir/site_truth.csv``
    (``SITE_TRUTH_COLUMNS``: the true labels and which films were planted, for tests only).
    Patients, findings and sites are drawn as for the demo (``sample_cases``), one film of each
    (``site_cases``: the drift tests take a folder's films as films of different patients); with
    ``none`` the films are the demo's. Same ``seed``, same bytes, whatever ``workers`` is. Returns
    the images folder."""
    from tools.demo_sites import SHIFTS, SITE_TRUTH_FILE, planted_rows
    from tools.files import write_csv

    if kind not in SHIFTS:
        raise UserError(f"--site-shift {kind}: choose one of {', '.join(SHIFTS)}")
    _check_counts(n, size, workers)
    out_dir = _images_folder(out_dir)
    cases = site_cases(int(n), int(seed))
    cases["image_path"] = [f"images/n{row:05d}.png" for row in range(len(cases))]
    cases["planted"] = planted_rows(kind, len(cases), np.random.default_rng([int(seed), 7]))
    generators = image_generators(int(cases["row"].max()) + 1, int(seed))
    jobs = [(str(out_dir), row, generators[row["row"]], int(size), kind) for row in cases.to_dict("records")]
    _write_films(_write_site_film, jobs, int(workers), out_dir)
    write_csv(out_dir / SITE_TRUTH_FILE, cases[SITE_TRUTH_COLUMNS])
    return out_dir / "images"


def site_main(args) -> int:
    """``--site-shift``: write the new site and say where it is."""
    start = time.perf_counter()
    try:
        folder = make_site(args.out, args.site_shift, n=args.n, seed=args.seed, size=args.size, workers=args.workers)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.n} films of a new site ({args.site_shift}) to {folder} in {time.perf_counter() - start:.1f} s; "
          f"pass it as valtool --image-dir")
    return 0


if __name__ == "__main__":
    sys.exit(main())
