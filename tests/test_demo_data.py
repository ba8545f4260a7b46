"""tools/make_demo_data.py: the demo table's contract, determinism, and the planted failure modes
measured on rendered pixels (small images, so the whole file runs in seconds)."""
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from tools.errors import UserError
from tools.make_demo_data import (
    CSV_COLUMNS,
    LABELS,
    PARAMS,
    TRUTH_COLUMNS,
    TRUTH_FILE,
    film_size,
    image_generators,
    label_flip_count,
    main,
    make_demo_dataset,
    render_phantom,
    sample_cases,
    sample_phantom,
    to_uint8,
    truth_table,
)

N, SIZE, SEED = 60, 128, 0


@pytest.fixture(scope="module")
def demo_set(tmp_path_factory):
    """One generated data set shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("demo")
    csv = make_demo_dataset(out, n=N, seed=SEED, size=SIZE)
    return out, pd.read_csv(csv, dtype={"num_findings_bin": str})


@pytest.fixture(scope="module")
def demo_truth(demo_set):
    """The demo set's CSV joined with its ground-truth file (modes 4-6), row for row."""
    out, df = demo_set
    truth = pd.read_csv(out / TRUTH_FILE)
    assert truth["image_path"].tolist() == df["image_path"].tolist()
    return df.merge(truth, on="image_path", validate="one_to_one")


def folder_bytes(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def read_gray(path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def high_pass(image: np.ndarray) -> np.ndarray:
    """Image minus its Gaussian blur (sigma 1 px): fine detail such as 1-2 px lines and noise."""
    f = image.astype(np.float32)
    return f - cv2.GaussianBlur(f, (0, 0), 1.0)


def lung_boxes(image: np.ndarray) -> np.ndarray:
    """Pixels of two boxes inside the lung fields (upper/mid zones, lateral to the hila)."""
    s = image.shape[0]
    rows = slice(int(0.30 * s), int(0.55 * s))
    return np.concatenate([image[rows, int(0.18 * s):int(0.36 * s)].ravel(),
                           image[rows, int(0.64 * s):int(0.82 * s)].ravel()])


def silhouette_columns(with_part: np.ndarray, without_part: np.ndarray, level: int = 8) -> np.ndarray:
    """Columns where removing a structure changes some pixel by more than ``level`` gray levels."""
    changed = np.abs(with_part.astype(int) - without_part.astype(int)) > level
    return np.flatnonzero(changed.any(axis=0))


def render(phantom: dict, **changes) -> np.ndarray:
    return to_uint8(render_phantom(dict(phantom, **changes), SIZE)).astype(np.float32)


# ====== contract ======

def test_csv_schema_and_value_domains(demo_set):
    out, df = demo_set
    assert LABELS == ["Cardiomegaly", "Edema", "Effusion"]
    assert list(df.columns) == CSV_COLUMNS == [
        "image_path", "split", "Cardiomegaly", "Edema", "Effusion", "view", "sex", "age", "site",
        "patient_id", "follow_up", "num_findings", "num_findings_bin"]
    assert len(df) == N
    for label in LABELS:
        assert df[label].dtype.kind == "i" and set(df[label]) <= {0, 1}
    assert set(df["view"]) <= {"PA", "AP"} and set(df["sex"]) <= {"M", "F"}
    assert set(df["site"]) <= {"A", "B", "C"} and set(df["split"]) == {"train", "val", "calib", "test"}
    assert df["age"].dtype.kind == "i" and df["age"].between(20, 90).all()
    assert (df["num_findings"] == df[LABELS].sum(axis=1)).all()
    expected_bin = df["num_findings"].map(lambda c: "2+" if c >= 2 else str(c))
    assert (df["num_findings_bin"] == expected_bin).all()
    expected_path = [f"images/p{p:05d}_f{f}.png" for p, f in zip(df["patient_id"], df["follow_up"])]
    assert df["image_path"].tolist() == expected_path


def test_images_are_8bit_grayscale_of_the_requested_size(demo_set, demo_truth):
    """The requested size, except the hidden device's films (failure mode 4): 7/8 of it."""
    out, df = demo_set
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(Path(p).name for p in df["image_path"])
    small = round(SIZE * 7 / 8)
    for path, device in zip(demo_truth["image_path"], demo_truth["hidden_device"]):
        image = read_gray(out / path)
        assert image.dtype == np.uint8 and image.shape == ((small, small) if device else (SIZE, SIZE))
        assert image.std() > 20          # a film, not a blank


def test_follow_ups_are_numbered_per_patient(demo_truth):
    for _, group in demo_truth.groupby("patient_id"):
        assert group["follow_up"].tolist() == list(range(len(group)))
        assert len(group) <= 4
        # patient-level attributes never change between follow-ups (the true Cardiomegaly label:
        # the CSV's may be flipped on one test film, failure mode 6)
        assert group[["sex", "age", "site", "true_Cardiomegaly", "split"]].nunique().max() == 1


def test_splits_are_grouped_by_patient_and_near_60_10_10_20():
    df = sample_cases(2000, seed=1)
    assert (df.groupby("patient_id")["split"].nunique() == 1).all()
    fractions = df["split"].value_counts(normalize=True)
    assert fractions["train"] == pytest.approx(0.6, abs=0.03)
    assert fractions["val"] == pytest.approx(0.1, abs=0.03)
    assert fractions["calib"] == pytest.approx(0.1, abs=0.03)
    assert fractions["test"] == pytest.approx(0.2, abs=0.03)
    assert df["patient_id"].nunique() < len(df)          # some patients have follow-ups
    assert df["follow_up"].max() == 3


def test_labels_and_views_co_occur_like_a_sick_population():
    df = sample_cases(4000, seed=2)
    edema = df["Edema"] == 1
    assert df["Effusion"][edema].mean() > df["Effusion"][~edema].mean() + 0.15
    assert df["Cardiomegaly"][edema].mean() > df["Cardiomegaly"][~edema].mean() + 0.10
    ap = df["view"] == "AP"
    assert 0.28 <= ap.mean() <= 0.40
    assert ap[edema].mean() > ap[~edema].mean() + 0.15
    for label in LABELS:
        assert 0.10 <= df[label].mean() <= 0.35
    # the (true) label is the true anatomical CTR, whatever the view; the CSV's may be flipped (mode 6)
    assert ((df["true_ctr"] > 0.5) == (df["true_Cardiomegaly"] == 1)).all()
    normal = df.loc[df["true_Cardiomegaly"] == 0, "true_ctr"]
    assert normal.between(0.38, 0.49).all() and normal.mean() == pytest.approx(0.44, abs=0.01)
    assert (df.loc[df["true_Cardiomegaly"] == 1, "true_ctr"] >= 0.52).all()


def test_bad_arguments_raise_user_errors(tmp_path):
    with pytest.raises(UserError, match="--n"):
        make_demo_dataset(tmp_path, n=0)
    with pytest.raises(UserError, match="--size"):
        make_demo_dataset(tmp_path, n=2, size=8)
    with pytest.raises(UserError, match="--workers"):
        make_demo_dataset(tmp_path, n=2, workers=0)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="--out"):
        make_demo_dataset(blocker, n=2, size=32)


def test_cli_writes_the_data_set(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "d"), "--n", "3", "--seed", "5", "--size", "64"]) == 0
    df = pd.read_csv(tmp_path / "d" / "demo.csv")
    truth = pd.read_csv(tmp_path / "d" / TRUTH_FILE)
    expected = 56 if truth["hidden_device"][0] else 64
    assert len(df) == 3 and read_gray(tmp_path / "d" / df["image_path"][0]).shape == (expected, expected)
    assert "wrote 3 images" in capsys.readouterr().out
    assert main(["--out", str(tmp_path / "e"), "--n", "0"]) == 2


# ====== determinism ======

def test_same_seed_gives_identical_bytes_and_another_seed_differs(demo_set, tmp_path):
    """The repeat run renders in two processes: parallelism must not change a byte."""
    out, _ = demo_set
    make_demo_dataset(tmp_path / "again", n=N, seed=SEED, size=SIZE, workers=2)
    assert folder_bytes(tmp_path / "again") == folder_bytes(out)
    make_demo_dataset(tmp_path / "other", n=N, seed=SEED + 1, size=SIZE)
    other = folder_bytes(tmp_path / "other")
    assert other["demo.csv"] != folder_bytes(out)["demo.csv"]
    assert other["images/p00000_f0.png"] != (out / "images/p00000_f0.png").read_bytes()


def test_each_image_depends_only_on_seed_and_row(demo_set):
    """Rendering in reverse order, one generator per row, reproduces the written pixels."""
    out, _ = demo_set
    cases = sample_cases(N, SEED).to_dict("records")
    generators = image_generators(N, SEED)
    for i in reversed(range(0, N, 7)):
        pixels = to_uint8(render_phantom(sample_phantom(cases[i], generators[i]), SIZE))
        np.testing.assert_array_equal(pixels, read_gray(out / cases[i]["image_path"]))


# ====== planted mechanisms, measured on pixels ======

def test_ap_films_magnify_the_heart_for_the_same_true_ctr(demo_set):
    """Failure mode 1. The heart silhouette (columns that change when the heart is removed from
    the same phantom) of label-negative AP films is ~15-20 % wider than on PA films relative to
    the true CTR, so AP normals look enlarged (apparent CTR > 0.5) while PA normals do not.
    (True labels; the hidden device's smaller, collimated films are left to mode 4's tests.)"""
    out, _ = demo_set
    cases = sample_cases(N, SEED).to_dict("records")
    generators = image_generators(N, SEED)
    stats = {"AP": [], "PA": []}
    for i, case in enumerate(cases):
        if case["true_Cardiomegaly"] or case["hidden_device"]:
            continue
        phantom = sample_phantom(case, generators[i])
        film = read_gray(out / case["image_path"])
        cols = silhouette_columns(film, to_uint8(render_phantom(dict(phantom, true_ctr=0.0), SIZE)))
        width = cols.max() - cols.min() + 1
        thorax = 2 * phantom["anatomy"]["half_thorax"] * phantom["pose"]["scale"] * SIZE
        assert cols.mean() > SIZE / 2              # the heart lies mostly on the image right
        stats[case["view"]].append((width, width / thorax, width / (thorax * case["true_ctr"]), case["true_ctr"]))
    ap, pa = np.array(stats["AP"]), np.array(stats["PA"])
    assert len(ap) >= 8 and len(pa) >= 20
    assert ap[:, 3].mean() == pytest.approx(pa[:, 3].mean(), abs=0.02)    # same true CTRs
    low, high = PARAMS["ap_heart_magnification"]
    assert low - 0.04 <= ap[:, 2].mean() / pa[:, 2].mean() <= high + 0.04
    assert ap[:, 0].mean() > 1.1 * pa[:, 0].mean()
    assert ap[:, 1].mean() > 0.5 > pa[:, 1].mean()


@pytest.fixture(scope="module")
def edema_cases():
    cases = sample_cases(300, seed=4)
    generators = image_generators(len(cases), 4)
    rows = cases.to_dict("records")
    # true labels (mode 6 flips some), and not the hidden device's collimated films (mode 4)
    return [(row, sample_phantom(row, generators[i])) for i, row in enumerate(rows)
            if row["true_Edema"] and not row["hidden_device"]]


def test_site_c_films_of_edema_have_less_fine_detail_in_the_lungs(edema_cases):
    """Failure mode 2, as a data set property: high-frequency energy in the lung fields of
    Edema-positive films is much lower at site C than at sites A and B."""
    energy = {"A": [], "B": [], "C": []}
    for row, phantom in edema_cases:
        energy[row["site"]].append(np.mean(lung_boxes(high_pass(render(phantom))) ** 2))
    assert min(len(v) for v in energy.values()) >= 5
    assert np.mean(energy["C"]) < 0.25 * min(np.mean(energy["A"]), np.mean(energy["B"]))


def test_site_c_erases_the_interstitial_lines_but_keeps_the_faint_haze(edema_cases):
    """Failure mode 2, as a mechanism: the same Edema phantoms shown at each site. What Edema adds
    in fine detail (high-pass energy of with-minus-without) nearly vanishes at site C; the haze it
    adds (mean brightening of the lungs) survives at C; the haze alone is faint next to the lines."""
    added_detail, added_haze, haze_peak, lines_peak = {}, {}, [], []
    for site in ("A", "B", "C"):
        detail, haze = [], []
        for _, phantom in edema_cases[:12]:
            on = render(phantom, site=site)
            off = render(phantom, site=site, edema=None)
            detail.append(np.mean(high_pass(on - off) ** 2))
            haze.append(np.mean(lung_boxes(on - off)))
            if site == "A":
                haze_only = render(phantom, site=site, edema=dict(phantom["edema"], lines=np.zeros((0, 6))))
                haze_peak.append(np.abs(haze_only - off).max())
                lines_peak.append(np.abs(on - off).max())
        added_detail[site], added_haze[site] = np.mean(detail), np.mean(haze)
    assert added_detail["C"] < 0.15 * min(added_detail["A"], added_detail["B"])
    assert added_haze["C"] > 0.5 * added_haze["A"] > 0
    assert np.mean(haze_peak) < 0.5 * np.mean(lines_peak)


def test_edema_is_bilateral(edema_cases):
    for _, phantom in edema_cases[:6]:
        change = np.abs(render(phantom) - render(phantom, edema=None))
        left, right = change[:, :SIZE // 2].sum(), change[:, SIZE // 2:].sum()
        assert min(left, right) > 0.3 * (left + right)


def test_effusion_opacifies_the_base_on_its_side():
    """Fluid sits in the costophrenic recess: removing it changes the lower chest on the labelled
    side (side -1 = patient right = image left), not the upper lung or the other side."""
    cases = sample_cases(200, seed=6)
    generators = image_generators(len(cases), 6)
    checked = 0
    for i, row in enumerate(cases.to_dict("records")):
        if not row["true_Effusion"] or row["site"] == "C" or row["hidden_device"]:
            continue
        phantom = sample_phantom(row, generators[i])
        if len(phantom["effusions"]) != 1:
            continue
        change = np.abs(render(phantom) - render(phantom, effusions=[]))
        side = phantom["effusions"][0]["side"]
        own = change[:, :SIZE // 2] if side < 0 else change[:, SIZE // 2:]
        assert own.sum() > 0.95 * change.sum()
        assert own[int(0.55 * SIZE):].sum() > 0.9 * own.sum()
        checked += 1
    assert checked >= 5


# ====== failure modes 4-6: the ground-truth file, the table, and pixels ======

@pytest.fixture(scope="module")
def tiny_films(tmp_path_factory):
    """A few hundred 32 px films: enough rows for shares, cheap to write."""
    out = tmp_path_factory.mktemp("tiny")
    csv = make_demo_dataset(out, n=300, seed=3, size=32)
    return out, pd.read_csv(csv).merge(pd.read_csv(out / TRUTH_FILE), on="image_path", validate="one_to_one")


def test_truth_file_holds_what_the_csv_hides(demo_set, demo_truth):
    """The ground truth of modes 4-6 lives in its own file; the CSV keeps its columns, and its
    labels are the true ones except where flipped."""
    out, df = demo_set
    truth = pd.read_csv(out / TRUTH_FILE)
    assert list(truth.columns) == TRUTH_COLUMNS == [
        "image_path", "hidden_device", "true_Cardiomegaly", "flipped_Cardiomegaly", "true_Edema",
        "flipped_Edema", "true_Effusion", "flipped_Effusion"]
    assert list(df.columns) == CSV_COLUMNS
    for column in TRUTH_COLUMNS[1:]:
        assert set(truth[column]) <= {0, 1}
    pd.testing.assert_frame_equal(truth, truth_table(sample_cases(N, SEED)).reset_index(drop=True),
                                  check_dtype=False)
    for label in LABELS:
        assert (demo_truth[label] == demo_truth[f"true_{label}"] ^ demo_truth[f"flipped_{label}"]).all()


def test_hidden_device_share_is_near_its_rate_and_its_films_are_smaller(tiny_films):
    """Mode 4: about 25 % of the films (binomial tolerance, 4 sd), and exactly those are 7/8 size."""
    out, df = tiny_films
    p, n = PARAMS["hidden_device"]["p"], len(df)
    assert p == 0.25
    assert abs(df["hidden_device"].mean() - p) <= 4 * np.sqrt(p * (1 - p) / n)
    sizes = np.array([read_gray(out / path).shape[0] for path in df["image_path"]])
    np.testing.assert_array_equal(sizes, np.where(df["hidden_device"] == 1, 28, 32))


def test_hidden_device_is_independent_of_the_csv_columns():
    """Mode 4 is drawn per image after everything else: its share is the same in every site, view
    and label group, so no metadata column can stand in for it."""
    df = sample_cases(4000, seed=7)
    p = PARAMS["hidden_device"]["p"]
    for column in ("site", "view", "Effusion", "Edema", "split"):
        shares = df.groupby(column)["hidden_device"].mean()
        assert (shares - p).abs().max() < 0.05, (column, shares.to_dict())


def test_device_films_have_a_bright_uniform_band_below_the_cutoff(demo_truth, demo_set):
    """Mode 4 on the written films: the bottom rows (below the highest possible line) are the
    nearly uniform collimator shadow, far brighter than the same rows of other films."""
    out, _ = demo_set
    device, other = [], []
    for path, is_device in zip(demo_truth["image_path"], demo_truth["hidden_device"]):
        image = read_gray(out / path).astype(np.float32)
        band = image[int(0.70 * image.shape[0]):]
        (device if is_device else other).append((band.mean(), band.std()))
    device, other = np.array(device), np.array(other)
    assert len(device) >= 3 and len(other) >= 30
    assert (np.abs(device[:, 0] - 255 * PARAMS["hidden_device"]["shadow"]) < 8).all()
    assert (device[:, 1] < 8).all()                      # nearly uniform
    assert device[:, 0].min() > other[:, 0].max() + 40


def test_collimator_replaces_only_the_rows_below_its_line():
    """Mode 4 as a mechanism: the same phantom with and without the collimator, at the device's
    film size, is identical above the line and the shadow below it (an edge of a pixel or two)."""
    cases = sample_cases(200, seed=9)
    generators = image_generators(len(cases), 9)
    checked = 0
    for i, row in enumerate(cases.to_dict("records")):
        if not row["hidden_device"]:
            continue
        phantom = sample_phantom(row, generators[i])
        film = render_phantom(phantom, SIZE)
        size = film_size(phantom, SIZE)
        assert film.shape == (size, size) == (112, 112)
        plain = render_phantom(dict(phantom, collimator=None), size)
        line = phantom["collimator"]["cutoff"] * size
        device = PARAMS["hidden_device"]
        assert abs(phantom["collimator"]["cutoff"] - device["cutoff"]) <= device["cutoff_jitter"]
        above, below = slice(0, int(line) - 2), slice(int(line) + 3, size)
        mask = np.ones_like(film, bool)
        if phantom["tag"] is not None:                   # the tag is drawn on both
            mask[:20, :20] = False
        np.testing.assert_array_equal(film[above][mask[above]], plain[above][mask[above]])
        assert np.abs(film[below] - PARAMS["hidden_device"]["shadow"]).max() < 0.07
        checked += 1
    assert checked >= 3


def test_collimator_hides_the_heart_and_the_effusions():
    """Mode 4, what it is for: on device films, removing the heart changes (by more than 10 gray
    levels) under a third as many pixels as on the same film without the collimator (about a tenth
    on average), so its width cannot be read; no effusion, however large, changes a pixel by more
    than 10 gray levels, though every one changes some by 5 or more without the collimator (the
    smallest, a blunted angle on a smoothed site-C film, by about 10)."""
    cases = sample_cases(300, seed=8)
    generators = image_generators(len(cases), 8)
    heart_ratio, effusion_hidden, effusion_seen_plain = [], [], []
    for i, row in enumerate(cases.to_dict("records")):
        phantom = dict(sample_phantom(dict(row, hidden_device=1), generators[i]), tag=None)
        plain = dict(phantom, collimator=None)   # the same film without the device

        def film(p, **changes):
            # both at the device's film size: 64 asked, 56 written
            return to_uint8(render_phantom(dict(p, **changes), 64 if p["collimator"] else 56)).astype(int)

        def changed(p, **changes):
            return np.abs(film(p) - film(p, **changes))

        heart_ratio.append((changed(phantom, true_ctr=0.0) > 10).sum() / (changed(plain, true_ctr=0.0) > 10).sum())
        if row["true_Effusion"]:
            effusion_hidden.append(changed(phantom, effusions=[]).max() <= 10)
            effusion_seen_plain.append(changed(plain, effusions=[]).max() >= 5)
        if len(heart_ratio) >= 40:
            break
    assert len(effusion_hidden) >= 8
    assert np.mean(heart_ratio) <= 0.15 and max(heart_ratio) < 1 / 3
    assert all(effusion_hidden) and all(effusion_seen_plain)


def tag_box(image: np.ndarray) -> np.ndarray:
    """The top-left corner where site B's tag sits (its square, jitter included, lies inside)."""
    s = image.shape[0]
    return image[:int(0.16 * s), :int(0.16 * s)]


def test_site_b_films_carry_a_white_tag_and_the_others_do_not(demo_truth, demo_set):
    """Mode 5 on the written films: pure white (255) in the top-left corner on every site-B film
    (a dark letter takes part of the square), nothing near white there on the others."""
    out, _ = demo_set
    for path, site in zip(demo_truth["image_path"], demo_truth["site"]):
        image = read_gray(out / path)
        box = tag_box(image)
        if site == "B":
            side = round(PARAMS["site_tag"]["width"] * image.shape[0])
            assert (box == 255).sum() >= 0.4 * side * side
            assert box.min() < 100                       # the letter
        else:
            assert (box >= 200).sum() == 0
    assert (demo_truth["site"] == "B").sum() >= 5


def test_site_b_has_a_higher_effusion_prevalence():
    """Mode 5 in the table: site B's Effusion prevalence (given labels) is well above A's and C's."""
    df = sample_cases(4000, seed=10)
    prevalence = df.groupby("site")["Effusion"].mean()
    assert PARAMS["site_effusion"] == {"A": 0.0, "B": 0.35, "C": 0.0}
    assert prevalence["B"] > max(prevalence["A"], prevalence["C"]) + 0.08
    assert abs(prevalence["A"] - prevalence["C"]) < 0.05


def test_label_flip_count_rounds_half_up_and_keeps_one_from_ten_test_rows():
    assert PARAMS["test_label_flips"] == 0.05
    assert [label_flip_count(n) for n in (0, 9, 10, 20, 29, 30, 200, 210)] == [0, 0, 1, 1, 1, 2, 10, 11]


@pytest.mark.parametrize("n, seed", [(40, 1), (60, 0), (120, 5), (1000, 2)])
def test_label_flips_only_in_the_test_split(n, seed):
    """Mode 6 in the table: per label, exactly ``label_flip_count(n_test)`` flipped rows (5 %
    rounded; at least one once the test split has 10 rows: n=40 has 6, none flipped), all in the
    test split; CSV label = true XOR flipped; ``num_findings`` counts the CSV's labels."""
    cases = sample_cases(n, seed)
    truth = truth_table(cases)
    test = (cases["split"] == "test").to_numpy()
    for label in LABELS:
        flipped = truth[f"flipped_{label}"].to_numpy() == 1
        assert flipped.sum() == label_flip_count(test.sum())
        assert flipped.sum() == (max(1, int(np.floor(0.05 * test.sum() + 0.5))) if test.sum() >= 10 else 0)
        assert not flipped[~test].any()
        assert (cases[label] == (truth[f"true_{label}"] ^ truth[f"flipped_{label}"])).all()
    assert (cases["num_findings"] == cases[LABELS].sum(axis=1)).all()


def test_images_show_the_true_labels_not_the_flipped_ones():
    """Mode 6: a flipped row's phantom carries its TRUE findings (the pixels are right, the CSV is
    wrong)."""
    cases = sample_cases(1000, seed=2)
    generators = image_generators(len(cases), 2)
    checked = 0
    for i, row in enumerate(cases.to_dict("records")):
        if row["Effusion"] == row["true_Effusion"] and row["Edema"] == row["true_Edema"]:
            continue
        phantom = sample_phantom(row, generators[i])
        assert bool(phantom["effusions"]) == bool(row["true_Effusion"])
        assert (phantom["edema"] is not None) == bool(row["true_Edema"])
        checked += 1
    assert checked >= 10


# ====== --format dicom | mixed ======

@pytest.fixture(scope="module")
def mixed_and_png(tmp_path_factory):
    """The same 36 films (64 px) written --format png and --format mixed."""
    out = tmp_path_factory.mktemp("formats")
    make_demo_dataset(out / "png", n=36, seed=SEED, size=64)
    make_demo_dataset(out / "mixed", n=36, seed=SEED, size=64, image_format="mixed")
    return out / "png", out / "mixed"


def test_mixed_writes_exact_shares_of_each_form_and_only_image_path_changes(mixed_and_png):
    from tools.make_demo_data import DICOM_FORMS

    png, mixed = mixed_and_png
    a, b = pd.read_csv(png / "demo.csv"), pd.read_csv(mixed / "demo.csv")
    truth = pd.read_csv(mixed / TRUTH_FILE)
    assert list(truth.columns) == [*TRUTH_COLUMNS, "image_format"]
    assert list(pd.read_csv(png / TRUTH_FILE).columns) == TRUTH_COLUMNS  # png: the truth file as before
    counts = truth["image_format"].value_counts().to_dict()
    assert counts == {"png": 18, **{form: 3 for form in DICOM_FORMS}}  # 36 films: 6/12 PNG, 1/12 each form
    pd.testing.assert_frame_equal(a.drop(columns="image_path"), b.drop(columns="image_path"))
    for path, stem, form in zip(b["image_path"], a["image_path"], truth["image_format"]):
        suffix = ".png" if form == "png" else DICOM_FORMS[form][3]
        assert path == stem.removesuffix(".png") + suffix and (mixed / path).is_file()
    # every PNG of the mixed set is the PNG set's file, byte for byte
    for path in b["image_path"][truth["image_format"] == "png"]:
        assert (mixed / path).read_bytes() == (png / path).read_bytes()


def test_mixed_films_give_the_png_films_model_input(mixed_and_png):
    """The planted failures and the model see the same pixels whatever the format: every film's
    model input at make demo's 128 px within one grey level (tests/test_dicom.py: 64 px)."""
    from tools.dataset import model_image

    png, mixed = mixed_and_png
    diffs = []
    for a, b in zip(pd.read_csv(png / "demo.csv")["image_path"], pd.read_csv(mixed / "demo.csv")["image_path"]):
        diffs.append(np.abs(model_image(png / a, 128).astype(int) - model_image(mixed / b, 128)))
        assert diffs[-1].max() <= 1, b
    assert np.mean(diffs) < 0.1


def test_mixed_is_deterministic_and_its_uids_come_from_the_seed(mixed_and_png, tmp_path):
    import pydicom

    _, mixed = mixed_and_png
    make_demo_dataset(tmp_path / "again", n=36, seed=SEED, size=64, image_format="mixed", workers=2)
    assert folder_bytes(tmp_path / "again") == folder_bytes(mixed)
    uids = []
    for seed in (SEED, SEED + 1):
        make_demo_dataset(tmp_path / f"s{seed}", n=4, seed=seed, size=48, image_format="dicom")
        ds = pydicom.dcmread(next((tmp_path / f"s{seed}" / "images").glob("p00000_f0*")))
        assert (ds.StudyDate, ds.StudyTime, ds.PatientID) == ("20240115", "093000", "0")  # fixed, follow-up 0
        uids.append((ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))
    assert len(set(uids[0])) == 3 and not set(uids[0]) & set(uids[1])  # another seed, other UIDs


def test_dicom_format_writes_every_film_as_dicom_and_refuses_sizes_too_small(tmp_path):
    from tools.make_demo_data import DICOM_FORMS

    make_demo_dataset(tmp_path / "d", n=12, seed=SEED, size=48, image_format="dicom")
    truth = pd.read_csv(tmp_path / "d" / TRUTH_FILE)
    assert truth["image_format"].value_counts().to_dict() == {form: 2 for form in DICOM_FORMS}
    assert not list((tmp_path / "d" / "images").glob("*.png"))
    with pytest.raises(UserError, match="--size 32 with --format mixed"):
        make_demo_dataset(tmp_path / "e", n=2, size=32, image_format="mixed")
    assert main(["--out", str(tmp_path / "f"), "--n", "2", "--size", "40", "--format", "dicom"]) == 0
