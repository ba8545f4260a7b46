"""tools/corruptions.py: each severity means exactly the SPEC "stress" table, measured on images."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tools.figures import plot_corruption_examples
from tools.corruptions import (
    CHOICES,
    CORRUPTIONS,
    FAMILIES,
    MARKER_TEXTS,
    PARAM_NAMES,
    PARAM_TEXTS,
    SEVERITIES,
    apply_corruption,
    corruption_names,
    image_rng,
    param_label,
)

REPO = Path(__file__).resolve().parents[1]
ALL = [(name, sev) for name in SEVERITIES for sev in (1, 2, 3)]


def textured_image(size=96, seed=0):
    """Smooth structure plus pixel noise, mid-range, so no corruption is trivially the identity."""
    yy, xx = np.mgrid[0:size, 0:size]
    rng = np.random.default_rng(seed)
    image = 110 + 60 * np.sin(xx / 7.0) * np.cos(yy / 11.0) + rng.normal(0, 15, (size, size))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def test_table_is_the_spec():
    default = {name: SEVERITIES[name] for name in FAMILIES["default"]}
    assert default == {
        "gaussian_noise": [10, 25, 50],
        "gaussian_blur": [3, 5, 9],
        "jpeg": [70, 50, 30],
        "brightness_contrast": [0.15, 0.30, 0.45],
    }
    assert {name: SEVERITIES[name] for name in FAMILIES["acquisition"]} == {
        "inversion": [0.25, 0.50, 1.00],
        "window": [0.60, 0.40, 0.25],
        "bit_depth": [6, 4, 3],
        "rotation": [5, 10, 15],
        "collimation": [0.05, 0.10, 0.20],
        "markers": [0.05, 0.08, 0.12],
    }
    assert list(SEVERITIES) == [*FAMILIES["default"], *FAMILIES["acquisition"]]
    assert set(PARAM_NAMES) == set(SEVERITIES) == set(CORRUPTIONS) == set(PARAM_TEXTS)
    assert PARAM_NAMES["gaussian_noise"] == "variance" and PARAM_NAMES["gaussian_blur"] == "kernel"
    assert PARAM_NAMES["jpeg"] == "quality"


@pytest.mark.parametrize("severity", [1, 2, 3])
def test_noise_variance_on_flat_grey(severity):
    variance = SEVERITIES["gaussian_noise"][severity - 1]
    flat = np.full((256, 256), 128, np.uint8)
    out = apply_corruption(flat, "gaussian_noise", severity, seed=1337).astype(np.float64)
    # Rounding adds 1/12 to the variance; the sample variance of 65536 pixels is within ~0.6% (1 sd).
    assert out.var() == pytest.approx(variance, rel=0.03)
    assert out.mean() == pytest.approx(128, abs=0.2)
    diff = out - 128
    assert abs(np.mean(diff**3)) / variance**1.5 < 0.05  # symmetric, like a Gaussian


@pytest.mark.parametrize("severity", [1, 2, 3])
def test_blur_support_is_k_by_k_and_matches_opencv(severity):
    k = SEVERITIES["gaussian_blur"][severity - 1]
    sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8  # OpenCV's sigma for a k x k kernel
    impulse = np.zeros((31, 31), np.uint8)
    impulse[15, 15] = 255
    out = apply_corruption(impulse, "gaussian_blur", severity, seed=0)

    rows, cols = np.nonzero(out)
    r = k // 2
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (15 - r, 15 + r, 15 - r, 15 + r)
    assert out[15, 15 - r] > 0 and out[15 - r, 15] > 0  # the kernel's edge is reached on both axes
    # Mass is preserved up to rounding each nonzero pixel by at most one half.
    assert abs(int(out.sum()) - 255) <= 0.5 * np.count_nonzero(out)

    reference = cv2.GaussianBlur(impulse, (k, k), sigmaX=sigma, sigmaY=sigma)
    assert np.abs(out.astype(int) - reference).max() <= 1
    image = textured_image()
    reference = cv2.GaussianBlur(image, (k, k), sigmaX=sigma, sigmaY=sigma)
    assert np.abs(apply_corruption(image, "gaussian_blur", severity, seed=0).astype(int) - reference).max() <= 1


@pytest.mark.parametrize("severity", [1, 2, 3])
def test_jpeg_is_an_opencv_round_trip_at_the_quality(severity):
    quality = SEVERITIES["jpeg"][severity - 1]
    image = textured_image()
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    reference = cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(apply_corruption(image, "jpeg", severity, seed=0), reference)


def test_jpeg_error_grows_as_quality_falls():
    image = textured_image()
    errors = [np.abs(apply_corruption(image, "jpeg", s, seed=0).astype(int) - image).mean() for s in (1, 2, 3)]
    assert 0 < errors[0] < errors[1] < errors[2]


def fit_contrast_brightness(x, y):
    """Least squares y = (1 + c) x + 255 b over pixels the output did not clip; returns (c, b)."""
    keep = (y > 0) & (y < 255)
    slope, intercept = np.polyfit(x[keep].astype(float), y[keep].astype(float), 1)
    return slope - 1, intercept / 255


@pytest.mark.parametrize("severity", [1, 2, 3])
def test_brightness_contrast_factors_lie_within_the_limit(severity):
    limit = SEVERITIES["brightness_contrast"][severity - 1]
    ramp = np.tile(np.arange(256, dtype=np.uint8), (4, 1))
    fits = np.array([
        fit_contrast_brightness(ramp[0], apply_corruption(ramp, "brightness_contrast", severity, seed=s)[0])
        for s in range(120)
    ])
    contrast, brightness = fits[:, 0], fits[:, 1]
    tol = 0.01  # rounding to integer grey levels
    for factor in (contrast, brightness):
        assert np.all(np.abs(factor) <= limit + tol)
        assert factor.min() < -limit / 2 and factor.max() > limit / 2  # both signs, spread over the range
        assert abs(factor.mean()) < limit / 4  # uniform on a symmetric interval
    assert abs(np.corrcoef(contrast, brightness)[0, 1]) < 0.3  # drawn independently

    value = 100
    constant = np.full((8, 8), value, np.uint8)
    low = np.floor((1 - limit) * value - 255 * limit)
    high = np.ceil((1 + limit) * value + 255 * limit)
    for s in range(120):
        out = apply_corruption(constant, "brightness_contrast", severity, seed=s)
        assert np.unique(out).size == 1
        assert max(low, 0) <= out[0, 0] <= min(high, 255)


@pytest.mark.parametrize("name,severity", ALL)
def test_shape_and_dtype_are_preserved(name, severity):
    image = textured_image(size=40)[:, :33]  # not square
    out = apply_corruption(image, name, severity, seed=3, index=5)
    assert out.shape == image.shape and out.dtype == np.uint8
    direct = CORRUPTIONS[name](image, severity, image_rng(3, 5, name, severity))
    np.testing.assert_array_equal(out, direct)


@pytest.mark.parametrize("name,severity", ALL)
def test_same_key_same_output(name, severity):
    image = textured_image()
    first = apply_corruption(image, name, severity, seed=7, index=11)
    np.testing.assert_array_equal(first, apply_corruption(image, name, severity, seed=7, index=11))


def test_random_corruptions_differ_by_index_and_seed():
    image = textured_image()
    for name in ("gaussian_noise", "brightness_contrast"):
        base = apply_corruption(image, name, 2, seed=7, index=0)
        assert not np.array_equal(base, apply_corruption(image, name, 2, seed=7, index=1))
        assert not np.array_equal(base, apply_corruption(image, name, 2, seed=8, index=0))
    noise = [apply_corruption(image, "gaussian_noise", 2, seed=7, index=i).astype(int) - image for i in range(3)]
    assert abs(np.corrcoef(noise[0].ravel(), noise[1].ravel())[0, 1]) < 0.05


def test_result_does_not_depend_on_call_order():
    images = [textured_image(seed=i) for i in range(4)]
    keys = [(i, name, sev) for i in range(4) for name, sev in ALL]
    forward = {key: apply_corruption(images[key[0]], key[1], key[2], seed=5, index=key[0]) for key in keys}
    order = np.random.default_rng(0).permutation(len(keys))
    for j in order:
        i, name, sev = keys[j]
        np.testing.assert_array_equal(apply_corruption(images[i], name, sev, seed=5, index=i), forward[keys[j]])


def digest_all(seed):
    image = textured_image()
    digest = hashlib.sha256()
    for name, sev in ALL:
        digest.update(apply_corruption(image, name, sev, seed=seed, index=3).tobytes())
    return digest.hexdigest()


def test_result_is_the_same_in_another_process():
    """A fresh interpreter with another string-hash salt gives the same bytes (no hash(), no global state)."""
    code = "from tests.test_corruptions import digest_all; print(digest_all(11))"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == digest_all(11)


def test_image_rng_depends_on_each_part_of_the_key():
    draw = lambda *key: image_rng(*key).integers(0, 2**62, size=4).tolist()
    base = draw(1, 2, "jpeg", 1)
    assert draw(1, 2, "jpeg", 1) == base
    for other in [(2, 2, "jpeg", 1), (1, 3, "jpeg", 1), (1, 2, "gaussian_blur", 1), (1, 2, "jpeg", 2)]:
        assert draw(*other) != base


@pytest.mark.parametrize("name,severity", [("fog", 1), ("GaussNoise", 2), ("jpeg", 0), ("jpeg", 4), ("jpeg", 1.0)])
def test_bad_name_or_severity_is_a_value_error_naming_the_choices(name, severity):
    with pytest.raises(ValueError) as info:
        apply_corruption(textured_image(), name, severity, seed=0)
    message = str(info.value)
    assert ("gaussian_noise" in message and "brightness_contrast" in message) or "1, 2 or 3" in message


def test_registry_functions_reject_bad_severity_too():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        CORRUPTIONS["gaussian_noise"](textured_image(), 0, rng)  # not silently the last severity


@pytest.mark.parametrize("image", [
    np.zeros((8, 8), np.float32), np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 1), np.uint8),
])
def test_non_uint8_grayscale_input_is_a_value_error(image):
    with pytest.raises(ValueError, match="uint8 grayscale HxW"):
        apply_corruption(image, "jpeg", 1, seed=0)


def test_input_is_not_modified():
    image = textured_image()
    before = image.copy()
    for name, sev in ALL:
        apply_corruption(image, name, sev, seed=0)
    np.testing.assert_array_equal(image, before)


def test_plot_corruption_examples_writes_one_png_atomically(tmp_path):
    out = plot_corruption_examples(textured_image(size=64), tmp_path / "corruptions.png", seed=0, title="demo")
    assert Path(out) == tmp_path / "corruptions.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corruptions.png"]  # no temp file left behind
    picture = cv2.imread(str(out))
    assert picture is not None and picture.shape[0] > 400 and picture.shape[1] > 400
    assert picture.std() > 5  # not blank


# ====== the two families and --corruptions ======

def test_corruptions_flag_values_expand_to_names_in_table_order():
    assert corruption_names(["default"]) == ["gaussian_noise", "gaussian_blur", "jpeg", "brightness_contrast"]
    assert corruption_names(["acquisition"]) == list(FAMILIES["acquisition"])
    assert corruption_names(["all"]) == list(SEVERITIES)
    # single names, as --corruptions always accepted, and mixtures, each name once
    assert corruption_names(["jpeg"]) == ["jpeg"]
    assert corruption_names(["markers", "default", "jpeg"]) == [*FAMILIES["default"], "markers"]
    assert set(CHOICES) == {"default", "acquisition", "all", *SEVERITIES}
    with pytest.raises(ValueError, match="--corruptions fog"):
        corruption_names(["fog"])


def test_parameter_labels_name_each_severity():
    assert [param_label("inversion", k) for k in (1, 2, 3)] == [
        "25% of films inverted", "50% of films inverted", "100% of films inverted"]
    assert param_label("window", 3) == "width x0.25"
    assert param_label("bit_depth", 2) == "4 bits"
    assert param_label("rotation", 1) == "\u00b15\u00b0"
    assert param_label("collimation", 3) == "20% cropped per border"
    assert param_label("markers", 2) == "2 marks, 8% high"


# ====== acquisition faults, each parameter measured on images ======

def film(size=96, seed=0):
    """A mid-grey textured film with no pixel at 0 or 255 (no content line is mistaken for padding)."""
    return np.clip(textured_image(size, seed), 20, 235).astype(np.uint8)


@pytest.mark.parametrize("severity", [1, 2, 3])
def test_inversion_inverts_whole_films_with_the_tables_share(severity):
    share = SEVERITIES["inversion"][severity - 1]
    image = film(32)
    inverted = 0
    for index in range(400):
        out = apply_corruption(image, "inversion", severity, seed=1, index=index)
        if np.array_equal(out, image):
            continue
        np.testing.assert_array_equal(out, 255 - image)  # every pixel 255 - x, nothing in between
        inverted += 1
    if share == 1.0:
        assert inverted == 400
    else:  # binomial(400, share): 4 standard deviations
        assert abs(inverted / 400 - share) < 4 * np.sqrt(share * (1 - share) / 400)


def test_inversion_leaves_the_letterbox_padding_black():
    image = np.zeros((40, 40), np.uint8)
    image[10:30, :] = film(40)[10:30, :]  # a wide film letterboxed: black bands above and below
    out = apply_corruption(image, "inversion", 3, seed=0)
    assert (out[:10] == 0).all() and (out[30:] == 0).all()
    np.testing.assert_array_equal(out[10:30], 255 - image[10:30])


@pytest.mark.parametrize("severity", [1, 2, 3])
def test_window_width_and_centre_measured_on_a_ramp(severity):
    width = SEVERITIES["window"][severity - 1]
    ramp = np.tile(np.arange(256, dtype=np.uint8), (2, 1))
    out = apply_corruption(ramp, "window", severity, seed=0)[0].astype(float)
    inside = np.flatnonzero((out > 0) & (out < 255))
    # the unclipped inputs span the new window: width x 255 grey levels about 127.5
    assert inside[-1] - inside[0] + 1 == pytest.approx(width * 255, abs=2)
    assert (inside[0] + inside[-1]) / 2 == pytest.approx(127.5, abs=1)
    slope = np.polyfit(inside, out[inside], 1)[0]
    assert slope == pytest.approx(1 / width, rel=0.02)
    assert (out[: inside[0]] == 0).all() and (out[inside[-1] + 1:] == 255).all()


@pytest.mark.parametrize("severity", [1, 2, 3])
def test_bit_depth_leaves_two_to_the_bits_grey_levels(severity):
    bits = SEVERITIES["bit_depth"][severity - 1]
    ramp = np.tile(np.arange(256, dtype=np.uint8), (2, 1))
    out = apply_corruption(ramp, "bit_depth", severity, seed=0)
    levels = np.unique(out)
    assert len(levels) == 2**bits and levels[0] == 0 and levels[-1] == 255
    assert np.abs(out.astype(int) - ramp).max() <= 256 // 2**bits  # within one step of the original
    # the levels are evenly spaced, as b bits spread over 0-255
    assert np.allclose(np.diff(levels), 255 / (2**bits - 1), atol=1)


def line_angle(image) -> float:
    """Angle in degrees (counter-clockwise, image y up) of the bright line in ``image``, from the
    principal axis of its bright pixels."""
    ys, xs = np.nonzero(image > 128)
    coords = np.stack([xs - xs.mean(), -(ys - ys.mean())])
    _, vectors = np.linalg.eigh(np.cov(coords))
    dx, dy = vectors[:, -1]
    return float(np.degrees(np.arctan2(dy, dx)) + 180) % 180


@pytest.mark.parametrize("severity", [1, 2, 3])
def test_rotation_angle_recovered_from_a_rotated_line(severity):
    degrees = SEVERITIES["rotation"][severity - 1]
    image = np.zeros((129, 129), np.uint8)
    image[63:66, 20:109] = 255  # a horizontal line through the centre
    assert line_angle(image) == pytest.approx(0, abs=0.2) or line_angle(image) == pytest.approx(180, abs=0.2)
    signs = set()
    for index in range(12):
        out = apply_corruption(image, "rotation", severity, seed=2, index=index)
        angle = line_angle(out)
        angle = angle - 180 if angle > 90 else angle
        assert abs(angle) == pytest.approx(degrees, abs=0.5)
        signs.add(np.sign(angle))
    assert signs == {-1.0, 1.0}  # both directions occur
    flat = np.full((64, 64), 200, np.uint8)
    out = apply_corruption(flat, "rotation", severity, seed=2)
    assert out[0, 0] == 0 and out[-1, -1] == 0 and out[32, 32] == 200  # corners black, centre kept


@pytest.mark.parametrize("severity", [1, 2, 3])
def test_collimation_crops_the_tables_share_of_each_border(severity):
    share = SEVERITIES["collimation"][severity - 1]
    size = 200
    ramp = np.tile(np.linspace(0, 255, size), (size, 1))  # value = 255 x column / (size - 1)
    out = apply_corruption(np.rint(ramp).astype(np.uint8), "collimation", severity, seed=0).astype(float)
    # the first and last columns now show the columns share x size in from each border
    removed_left = out[:, 0].mean() / 255 * (size - 1) / size
    removed_right = 1 - out[:, -1].mean() / 255 * (size - 1) / size
    assert removed_left == pytest.approx(share, abs=0.01)
    assert removed_right == pytest.approx(share, abs=0.01)
    # vertically the same: a ramp down the rows
    out_t = apply_corruption(np.rint(ramp.T).astype(np.uint8), "collimation", severity, seed=0).astype(float)
    assert out_t[0].mean() / 255 == pytest.approx(share, abs=0.01)
    # magnified by 1 / (1 - 2 share): the slope across the film
    slope = np.polyfit(np.arange(size), out[size // 2], 1)[0]
    assert slope == pytest.approx(255 / (size - 1) * (1 - 2 * share), rel=0.02)


def test_markers_are_saturated_white_and_grow_with_severity():
    image = np.full((128, 128), 100, np.uint8)
    counts = []
    for severity in (1, 2, 3):
        per_film = []
        for index in range(6):
            out = apply_corruption(image, "markers", severity, seed=4, index=index)
            changed = out != image
            assert (out[changed] == 255).all()  # burned in: saturated, no anti-aliased edge
            per_film.append(int(changed.sum()))
        counts.append(np.mean(per_film))
    assert 0 < counts[0] < counts[1] < counts[2]
    # the marks sit in the film's corners: nothing in the central half
    out = apply_corruption(image, "markers", 3, seed=4)
    assert (out[32:96, 32:96] == 100).all()
    assert [len(texts) for texts in MARKER_TEXTS] == [1, 2, 3]


def test_markers_stay_inside_the_film_box():
    image = np.zeros((128, 128), np.uint8)
    image[:, 32:96] = 100  # a tall film letterboxed: black bands left and right
    for index in range(6):
        out = apply_corruption(image, "markers", 3, seed=1, index=index)
        assert (out[:, :32] == 0).all() and (out[:, 96:] == 0).all()
        assert (out[:, 32:96] == 255).any()


def test_laterality_letter_is_drawn_per_film():
    image = np.full((128, 128), 100, np.uint8)
    shapes = {apply_corruption(image, "markers", 1, seed=0, index=i).tobytes() for i in range(12)}
    assert len(shapes) > 2  # letter and corner vary from film to film


def test_plot_corruption_examples_draws_the_rows_asked_for(tmp_path):
    default = cv2.imread(str(plot_corruption_examples(textured_image(size=64), tmp_path / "a.png", seed=0)))
    acquisition = cv2.imread(str(plot_corruption_examples(textured_image(size=64), tmp_path / "b.png", seed=0,
                                                          names=FAMILIES["acquisition"])))
    assert acquisition.shape[0] / default.shape[0] == pytest.approx(6 / 4, rel=0.05)  # one row per corruption
