"""tools/table.py, tools/dataset.py and tools/cache.py: the input contract (SPEC "Input CSV"), image decoding,
letterboxing, patient-grouped splits, the dataset items, seeded augmentation and the pixel cache."""
import os
import signal
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT
from tools import cache, dataset
from tools.dataset import CXRDataset, SeededAugment, content_stats, letterbox, load_image, read_raw
from tools.table import auto_split, check_images_exist, read_table, select_split
from tools.errors import UserError

LABELS = ["Cardiomegaly", "Edema", "Effusion"]


def write_csv(path, text):
    path.write_text(text)
    return path


def grey_png(path, value=100, shape=(40, 30), dtype=np.uint8):
    assert cv2.imwrite(str(path), np.full(shape, value, dtype))
    return path


# ====== read_table ======

def test_read_table_parses_labels_empty_as_nan_and_decimal_ones(tmp_path):
    csv = write_csv(tmp_path / "t.csv",
                    "image_path,Cardiomegaly,Edema,Effusion,age\n"
                    "a.png,1.0,0,,70\n"
                    "b.png,0,,1,55\n")
    df = read_table(csv, LABELS)
    assert df["Cardiomegaly"].tolist() == [1.0, 0.0]
    assert df["Edema"].iloc[0] == 0.0 and np.isnan(df["Edema"].iloc[1])
    assert np.isnan(df["Effusion"].iloc[0]) and df["Effusion"].iloc[1] == 1.0
    assert df["Cardiomegaly"].dtype == float
    assert df["age"].tolist() == [70, 55]  # metadata is carried unchanged


def test_read_table_missing_file_names_it(tmp_path):
    with pytest.raises(UserError, match=r"--csv .*nope\.csv: file not found"):
        read_table(tmp_path / "nope.csv", LABELS)


def test_read_table_empty_file_names_it(tmp_path):
    csv = write_csv(tmp_path / "empty.csv", "")
    with pytest.raises(UserError, match=r"empty\.csv: the file is empty"):
        read_table(csv, LABELS)


def test_read_table_missing_label_column_lists_columns(tmp_path):
    csv = write_csv(tmp_path / "t.csv", "image_path,Cardiomegaly,Effusion,sex\na.png,0,1,F\n")
    with pytest.raises(UserError) as err:
        read_table(csv, LABELS)
    message = str(err.value)
    assert "t.csv" in message and "Edema not found" in message
    assert "columns are: image_path, Cardiomegaly, Effusion, sex" in message


@pytest.mark.parametrize("value", ["2", "yes"])
def test_read_table_bad_label_names_file_column_row_value(tmp_path, value):
    # Header = row 1, so the third data line is row 4.
    csv = write_csv(tmp_path / "t.csv",
                    "image_path,Cardiomegaly,Edema,Effusion\n"
                    "a.png,0,0,0\n"
                    "b.png,1,0,1\n"
                    f"c.png,0,{value},0\n")
    with pytest.raises(UserError) as err:
        read_table(csv, LABELS)
    message = str(err.value)
    assert "t.csv" in message
    assert "column Edema" in message
    assert "row 4" in message
    assert repr(value) in message


def test_read_table_duplicated_path_names_rows_and_value(tmp_path):
    csv = write_csv(tmp_path / "t.csv",
                    "image_path,Cardiomegaly,Edema,Effusion\n"
                    "a.png,0,0,0\n"
                    "b.png,1,0,1\n"
                    "a.png,0,1,0\n")
    with pytest.raises(UserError) as err:
        read_table(csv, LABELS)
    message = str(err.value)
    assert "t.csv" in message and "column image_path" in message
    assert "rows 2 and 4" in message and "'a.png'" in message


# ====== select_split ======

def test_select_split_without_rows_lists_present_splits(tmp_path):
    df = pd.DataFrame({"image_path": ["a", "b", "c"], "split": ["train", "test", "train"]})
    with pytest.raises(UserError) as err:
        select_split(df, "val", tmp_path / "t.csv")
    assert "'val' has no rows" in str(err.value)
    assert "splits present: test, train" in str(err.value)


def test_select_split_picks_rows_and_resets_index():
    df = pd.DataFrame({"image_path": ["a", "b", "c"], "split": ["train", "test", "train"]})
    rows = select_split(df, "train", "t.csv")
    assert rows["image_path"].tolist() == ["a", "c"] and rows.index.tolist() == [0, 1]


def test_select_split_without_split_column_uses_every_row():
    df = pd.DataFrame({"image_path": ["a", "b", "c"]})
    assert select_split(df, "test", "t.csv")["image_path"].tolist() == ["a", "b", "c"]


# ====== check_images_exist ======

def test_check_images_exist_gives_count_and_first_missing(tmp_path):
    present = grey_png(tmp_path / "here.png")
    paths = [str(present), str(tmp_path / "gone1.png"), str(tmp_path / "gone2.png")]
    with pytest.raises(UserError) as err:
        check_images_exist(paths, "t.csv", tmp_path)
    assert "2 of 3 image(s) not found" in str(err.value)
    assert f"first: {tmp_path / 'gone1.png'}" in str(err.value)
    check_images_exist([str(present)], "t.csv", tmp_path)  # all present: no error


# ====== load_image ======

def test_load_8bit_grey_is_unchanged(tmp_path):
    pixels = np.arange(40 * 30, dtype=np.uint32).reshape(40, 30) % 256
    path = tmp_path / "g8.png"
    cv2.imwrite(str(path), pixels.astype(np.uint8))
    out = load_image(path)
    assert out.dtype == np.uint8 and out.shape == (40, 30)
    np.testing.assert_array_equal(out, pixels)


def test_load_16bit_12bit_range_scales_by_4095(tmp_path):
    values = np.array([[0, 1, 1000, 2048, 4095]], np.uint16)
    path = tmp_path / "g12.png"
    cv2.imwrite(str(path), values)
    assert read_raw(path).dtype == np.uint16  # stored as 16 bits, not reduced by the writer
    # rint(v * 255 / 4095): 1 -> 0.06 -> 0, 1000 -> 62.27 -> 62, 2048 -> 127.53 -> 128
    np.testing.assert_array_equal(load_image(path), [[0, 0, 62, 128, 255]])


def test_load_16bit_full_range_scales_by_65535(tmp_path):
    values = np.array([[0, 1000, 4096, 32768, 65535]], np.uint16)
    path = tmp_path / "g16.png"
    cv2.imwrite(str(path), values)
    # max > 4095, so rint(v * 255 / 65535): 1000 -> 3.89 -> 4, 4096 -> 15.94 -> 16, 32768 -> 127.5 -> 128
    np.testing.assert_array_equal(load_image(path), [[0, 4, 16, 128, 255]])


def bgr_luma(b, g, r):
    """ITU-R BT.601 luma, the weights of OpenCV's BGR2GRAY."""
    return 0.299 * r + 0.587 * g + 0.114 * b


def test_load_rgb_and_rgba_give_luma(tmp_path):
    b, g, r = 10, 200, 50
    expected = round(bgr_luma(b, g, r))  # 133.49 -> 133
    rgb = np.zeros((12, 16, 3), np.uint8) + np.array([b, g, r], np.uint8)
    rgba = np.zeros((12, 16, 4), np.uint8) + np.array([b, g, r, 77], np.uint8)
    cv2.imwrite(str(tmp_path / "rgb.png"), rgb)
    cv2.imwrite(str(tmp_path / "rgba.png"), rgba)
    assert read_raw(tmp_path / "rgba.png").shape == (12, 16, 4)
    for name in ("rgb.png", "rgba.png"):
        out = load_image(tmp_path / name)
        assert out.shape == (12, 16) and out.dtype == np.uint8
        assert np.all(np.abs(out.astype(int) - expected) <= 1)


def test_load_jpeg(tmp_path):
    path = tmp_path / "x.jpg"
    cv2.imwrite(str(path), np.full((24, 40), 128, np.uint8))
    out = load_image(path)
    assert out.shape == (24, 40) and out.dtype == np.uint8
    assert np.all(np.abs(out.astype(int) - 128) <= 2)  # lossy, but a flat field survives


def test_load_truncated_png_names_path(tmp_path):
    whole = (tmp_path / "whole.png")
    cv2.imwrite(str(whole), np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    truncated = tmp_path / "truncated.png"
    data_bytes = whole.read_bytes()
    truncated.write_bytes(data_bytes[: len(data_bytes) // 2])
    with pytest.raises(UserError, match=r"truncated\.png: cannot be decoded"):
        load_image(truncated)


def test_load_text_file_named_png_names_path(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    with pytest.raises(UserError, match=r"notes\.png: cannot be decoded"):
        load_image(path)


def test_load_missing_file_names_path(tmp_path):
    with pytest.raises(UserError, match=r"nothing\.png: file not found"):
        load_image(tmp_path / "nothing.png")


def test_16bit_film_stays_float_through_the_resize(tmp_path):
    """A 12-bit ramp halved in size: the model input is the float average rounded once, not the
    average of values already rounded to 8 bits (which can be off by one grey level)."""
    values = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (4, 1))  # 4 x 256
    path = tmp_path / "ramp.png"
    cv2.imwrite(str(path), values)
    film = dataset.read_film(path)
    assert film.dtype == np.float32 and film.max() == pytest.approx(4080 / 4095)
    boxed = letterbox(film, 128)
    rows = slice(63, 65)  # the 2 x 128 content band, centred
    expected = np.rint(values.astype(np.float64).reshape(4, 128, 2).mean(axis=2)[::2] / 4095 * 255)
    np.testing.assert_array_equal(boxed[rows], expected)
    assert (boxed[:63] == 0).all() and (boxed[65:] == 0).all()


# ====== letterbox ======

def test_letterbox_keeps_aspect_and_centres_on_black():
    wide = np.full((50, 100), 255, np.uint8)  # height 50, width 100
    out = letterbox(wide, 64)
    assert out.shape == (64, 64) and out.dtype == np.uint8
    # Longer side 100 -> 64, so the shorter 50 -> 32, centred: rows 16..47 white, the rest 0.
    np.testing.assert_array_equal(out[16:48], 255)
    np.testing.assert_array_equal(out[:16], 0)
    np.testing.assert_array_equal(out[48:], 0)
    tall = letterbox(wide.T.copy(), 64)
    np.testing.assert_array_equal(tall, out.T)


# ====== auto_split ======

def patients_table(n_patients=300, seed=0):
    rng = np.random.default_rng(seed)
    per_patient = rng.integers(1, 4, n_patients)
    ids = np.repeat([f"p{i:03d}" for i in range(n_patients)], per_patient)
    return pd.DataFrame({"image_path": [f"{i}.png" for i in range(len(ids))], "patient_id": ids})


@pytest.mark.parametrize("fractions", [(0.7, 0.1, 0.1), (0.5, 0.6, -0.1), (0.5, 0.5)])
def test_auto_split_fractions_must_be_three_or_four_nonnegative_summing_to_one(fractions):
    with pytest.raises(UserError, match="sum to 1"):
        auto_split(patients_table(10), fractions, seed=0)


def test_auto_split_keeps_each_patient_in_one_split_and_is_seeded():
    df = patients_table()
    out = auto_split(df, (0.7, 0.1, 0.2), seed=3)
    assert out.groupby("patient_id")["split"].nunique().max() == 1
    assert "split" not in df.columns  # a copy
    again = auto_split(df, (0.7, 0.1, 0.2), seed=3)
    assert out["split"].tolist() == again["split"].tolist()
    other = auto_split(df, (0.7, 0.1, 0.2), seed=4)
    assert out["split"].tolist() != other["split"].tolist()


def test_auto_split_proportions_are_close_to_the_fractions():
    df = patients_table()
    share = auto_split(df, (0.7, 0.1, 0.2), seed=0)["split"].value_counts(normalize=True)
    # Whole patients of 1-3 images are assigned, so the image shares miss by at most a few images.
    assert share["train"] == pytest.approx(0.7, abs=0.02)
    assert share["val"] == pytest.approx(0.1, abs=0.02)
    assert share["test"] == pytest.approx(0.2, abs=0.02)


# ====== CXRDataset and SeededAugment ======

@pytest.fixture
def three_images(tmp_path):
    sizes = [(40, 30), (20, 50), (32, 32)]
    paths = []
    for i, shape in enumerate(sizes):
        paths.append(str(grey_png(tmp_path / f"im{i}.png", value=60 + 60 * i, shape=shape)))
    return paths


def test_dataset_items_follow_the_documented_contract(three_images):
    y = np.array([[1, 0, np.nan], [0, np.nan, 1], [np.nan, np.nan, np.nan]])
    seen = []

    def transform(image, index):
        seen.append((image.shape, image.dtype, index))
        return image

    ds = CXRDataset(three_images, y, image_size=24, transform=transform)
    assert len(ds) == 3
    for i in range(3):
        item = ds[i]
        assert set(item) == {"image", "labels", "index"}
        assert item["index"] == i
        assert item["image"].dtype == torch.uint8 and tuple(item["image"].shape) == (24, 24)
        assert item["labels"].dtype == torch.float32
        np.testing.assert_array_equal(item["labels"].numpy(), y[i].astype(np.float32))  # NaN kept
        np.testing.assert_array_equal(item["image"].numpy(), letterbox(load_image(three_images[i]), 24))
    assert seen == [((24, 24), np.uint8, 0), ((24, 24), np.uint8, 1), ((24, 24), np.uint8, 2)]


def test_dataset_without_labels_has_empty_label_vectors(three_images):
    item = CXRDataset(three_images, None, image_size=16)[1]
    assert item["labels"].shape == (0,)


def test_seeded_augment_depends_only_on_seed_stream_draw_index():
    image = np.random.default_rng(1).integers(0, 256, (48, 48), dtype=np.uint8)
    a = SeededAugment(seed=7, stream=0, draw=2)(image, 5)
    np.testing.assert_array_equal(a, SeededAugment(seed=7, stream=0, draw=2)(image, 5))
    assert a.dtype == np.uint8 and a.shape == image.shape
    assert not np.array_equal(a, SeededAugment(seed=7, stream=0, draw=3)(image, 5))
    assert not np.array_equal(a, SeededAugment(seed=7, stream=0, draw=2)(image, 6))
    assert not np.array_equal(a, SeededAugment(seed=7, stream=1, draw=2)(image, 5))


def test_training_batches_do_not_depend_on_loader_workers(three_images):
    """Training on the CPU augments in the main process (Run.pass_workers is 0 there), on a GPU in
    loader workers: both must see the same augmented films in the same shuffled order."""
    from tools.dataset import make_loader
    from tools.runtime import Run

    y = np.zeros((3, 1), np.float32)
    ds = CXRDataset(three_images * 4, np.tile(y, (4, 1)), image_size=24, transform=SeededAugment(3, stream=0, draw=1))
    batches = {}
    for workers in (0, 1):
        loader = make_loader(ds, 5, workers, torch.device("cpu"), shuffle=True, seed=4, persistent=False)
        batches[workers] = [(b["index"].tolist(), b["image"].numpy()) for b in loader]
    assert [i for i, _ in batches[0]] == [i for i, _ in batches[1]]
    assert sorted(sum((i for i, _ in batches[0]), [])) == list(range(12))  # shuffled, each once
    for (_, a), (_, b) in zip(batches[0], batches[1]):
        np.testing.assert_array_equal(a, b)
    assert Run(outdir=".", device=torch.device("cpu")).pass_workers == 0
    assert Run(outdir=".", device=torch.device("cpu"), num_workers=2).pass_workers == 2


# ====== the pixel cache ======

def test_build_store_in_memory_matches_letterbox_and_lists_bad(tmp_path, three_images):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    paths = three_images + [str(bad)]
    store = cache.build_store(paths, 20, cache_dir=None, progress=False)
    assert store.bad == [3]
    assert len(store) == 4
    for i, path in enumerate(three_images):
        np.testing.assert_array_equal(store[i], letterbox(load_image(path), 20))
    np.testing.assert_array_equal(store[3], 0)


def test_build_store_disk_cache_is_built_once_and_reused(tmp_path, three_images, monkeypatch):
    cache_dir = tmp_path / "cache"
    first = cache.build_store(three_images, 20, cache_dir=cache_dir, progress=False)
    assert len(list(cache_dir.glob("*.npy"))) == 1
    expected = [letterbox(load_image(p), 20) for p in three_images]

    def no_decoding(path, dicom_window="file"):
        raise AssertionError("the second build must read the cache, not decode")

    monkeypatch.setattr(dataset, "read_film", no_decoding)
    second = cache.build_store(three_images, 20, cache_dir=cache_dir, progress=False)
    assert second.path == first.path and second.bad == []
    for i in range(3):
        np.testing.assert_array_equal(second[i], expected[i])


def test_cache_key_changes_with_mtime_image_size_and_window_mode(three_images):
    key = cache.cache_key(three_images, 20)
    assert cache.cache_key(three_images, 20) == key == cache.cache_key(three_images, 20, "file")
    assert cache.cache_key(three_images, 24) != key
    assert len({cache.cache_key(three_images, 20, mode) for mode in ("file", "bits", "minmax", "percentile")}) == 4
    stat = os.stat(three_images[1])
    os.utime(three_images[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert cache.cache_key(three_images, 20) != key


def test_build_store_disk_cache_records_bad_rows(tmp_path, three_images):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    store = cache.build_store([str(bad)] + three_images, 16, cache_dir=tmp_path / "c", progress=False)
    assert store.bad == [0]
    again = cache.build_store([str(bad)] + three_images, 16, cache_dir=tmp_path / "c", progress=False)
    assert again.bad == [0]
    assert store.errors == again.errors == {0: "cannot be decoded (truncated or not a PNG/JPEG/DICOM)"}
    np.testing.assert_array_equal(again[2], letterbox(load_image(three_images[1]), 16))


# ====== content statistics ======

@pytest.mark.parametrize("shape", [(40, 64), (64, 40)])
def test_content_stats_exclude_letterbox_padding_only(shape):
    """A film whose long side is already the target size is padded, not resized: its statistics
    over the content must equal the film's own. Zero pixels inside the film still count."""
    rng = np.random.default_rng(3)
    film = rng.integers(1, 256, size=shape).astype(np.uint8)
    film[10:14, 10:14] = 0
    boxed = letterbox(film, 64)
    assert (boxed == 0).sum() > 16  # padding is there
    mean, std = content_stats(boxed[None])
    assert mean[0] == pytest.approx(film.mean())
    assert std[0] == pytest.approx(film.std())
    blank_mean, blank_std = content_stats(np.zeros((1, 8, 8), np.uint8))
    assert np.isnan(blank_mean[0]) and np.isnan(blank_std[0])


def test_image_quality_measures_intensity_over_the_same_content(tmp_path):
    """valtool's per-image intensity uses the same padding rule: zeros inside the film count."""
    from tools.image_stats import image_quality

    film = np.random.default_rng(4).integers(1, 256, size=(40, 64)).astype(np.uint8)
    film[5:25, 5:25] = 0
    path = str(tmp_path / "film.png")
    assert cv2.imwrite(path, film)
    store = cache.build_store([path], 64, cache_dir=None, progress=False)
    row = image_quality([path], store, 64).iloc[0]
    assert (row["height"], row["width"]) == (40, 64) and bool(row["flag_small"])
    assert row["mean_intensity"] == pytest.approx(film.mean())
    assert row["std_intensity"] == pytest.approx(film.std())


# ====== loader workers ======

WORKERS_AFTER_OPENCV_POOL = """
import cv2, numpy as np, torch
from tools.dataset import make_loader
image = np.random.default_rng(0).integers(0, 255, (512, 512), dtype=np.uint8)
for _ in range(10):  # the parent starts OpenCV's thread pool before the workers are forked
    cv2.GaussianBlur(cv2.resize(image, (1024, 1024)), (9, 9), 0)
class Blurred(torch.utils.data.Dataset):
    def __len__(self):
        return 16
    def __getitem__(self, i):
        return torch.from_numpy(cv2.resize(cv2.GaussianBlur(image, (9, 9), 0), (32, 32)))
for _ in range(3):
    loader = make_loader(Blurred(), 4, 2, torch.device("cpu"), persistent=False)
    assert sum(len(batch) for batch in loader) == 16
print("done")
"""


def test_loader_workers_do_not_hang_after_the_parent_used_opencv_threads():
    # A worker told cv2.setNumThreads(1) after fork waits forever for the parent's pool threads.
    process = subprocess.Popen([sys.executable, "-c", WORKERS_AFTER_OPENCV_POOL], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the hung workers too
        process.communicate()
        pytest.fail("the loader's workers hung")
    assert process.returncode == 0, err
    assert out.strip() == "done"


def test_auto_split_with_four_fractions_sets_a_calib_split_aside():
    df = patients_table()
    out = auto_split(df, (0.6, 0.1, 0.1, 0.2), seed=0)
    share = out["split"].value_counts(normalize=True)
    for name, fraction in (("train", 0.6), ("val", 0.1), ("calib", 0.1), ("test", 0.2)):
        assert share[name] == pytest.approx(fraction, abs=0.02)
    assert out.groupby("patient_id")["split"].nunique().max() == 1
