"""tools/dicom.py and DICOM wherever the suite reads films: the reading order (modality LUT,
window, MONOCHROME1), each --dicom-window mode, every stored form against the same film as a
PNG, pydicom's own test files, the one-line errors through main.py, the decode cache, image
folders and tools.dicom_index."""
import json
import shutil

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from conftest import run_main
from tools import cache, dicom
from tools.dataset import load_image, model_image, read_film, read_raw
from tools.dicom_index import COLUMNS
from tools.dicom_index import main as index_main
from tools.errors import ImageError
from tools.make_demo_data import (DICOM_FORMS, PARAMS, dicom_attributes, dicom_stored, film_path, make_demo_dataset,
                                  render_phantom, sample_cases, sample_phantom, to_uint8)
from tools.model import build_model, checkpoint_dict, to_model_input
from tools.splits import find_images
from tools.files import save_torch

SIZE = 64
LABELS = ["Cardiomegaly", "Edema", "Effusion"]
SEED = 11
# pydicom's bundled test files (pydicom.data.get_testdata_file finds these without a download)
MR = "MR_small.dcm"          # MONOCHROME2, signed 16-bit, WindowCenter 600 / WindowWidth 1600
CT = "CT_small.dcm"          # signed 16-bit, RescaleSlope 1 / RescaleIntercept -1024, no window
RGB = "SC_rgb_rle.dcm"       # RGB, RLE Lossless
MULTI = "SC_rgb_rle_2frame.dcm"
REPORT = "test-SR.dcm"       # a structured report: no pixel data
TRUNCATED = "MR_truncated.dcm"


def bundled(name):
    return get_testdata_file(name)


def write_synthetic(path, stored, photometric="MONOCHROME2", bits=12, **extra):
    """A minimal single-frame film (Secondary Capture) with ``stored`` as pixel data."""
    attributes = {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7", "SOPInstanceUID": "1.2.3.4." + str(len(str(path))),
                  "Modality": "OT", "PhotometricInterpretation": photometric, "BitsStored": bits, **extra}
    dicom.write_dicom(path, stored, attributes, "1.2.840.10008.1.2.1")
    return path


# ====== the same film as PNG and in every DICOM form ======

@pytest.fixture(scope="module")
def films(tmp_path_factory):
    """Four rendered demo films (float, before 8-bit conversion), each written as the demo's PNG
    and in every DICOM form the demo generator writes. Returns (root, table): one row per file
    with ``film`` (row number), ``form`` and ``path``."""
    root = tmp_path_factory.mktemp("films")
    cases = sample_cases(8, SEED).to_dict("records")
    rng = np.random.default_rng(0)
    rows = []
    for i, case in enumerate(cases[:4]):
        film = render_phantom(sample_phantom(case, rng), 96)
        png = root / f"film{i}.png"
        assert cv2.imwrite(str(png), to_uint8(film))
        rows.append({"film": i, "form": "png", "path": str(png)})
        np.save(root / f"film{i}.npy", film)
        for form in DICOM_FORMS:
            path = root / film_path(f"film{i}_{form}.png", form)
            dicom.write_dicom(path, dicom_stored(film, form), dicom_attributes(case, form, SEED, film.shape[0]),
                              DICOM_FORMS[form][2])
            rows.append({"film": i, "form": form, "path": str(path)})
    return root, pd.DataFrame(rows)


def test_every_form_decodes_to_the_rendered_film(films):
    root, table = films
    for _, row in table.iterrows():
        truth = np.load(root / f"film{row['film']}.npy")
        got = read_film(row["path"])
        assert got.shape == truth.shape
        if DICOM_FORMS.get(row["form"], ("", 8))[1] == 12:
            # 12 bits hold 3000 steps over the film: the float film back to 1/6000
            assert got.dtype == np.float32 and np.abs(got - truth).max() <= 1 / 6000 + 1e-6, row["form"]
        else:  # 8-bit PNG and DICOM: the rounded film
            np.testing.assert_array_equal(load_image(row["path"]), to_uint8(truth))


def test_every_form_gives_the_pngs_model_input_within_one_grey_level(films):
    root, table = films
    for film, group in table.groupby("film"):
        png = model_image(group["path"].iloc[0], SIZE)
        for _, row in group.iloc[1:].iterrows():
            diff = np.abs(model_image(row["path"], SIZE).astype(int) - png)
            assert diff.max() <= 1, (row["form"], diff.max())
            assert diff.mean() < 0.25
    # the extension-less form is a DICOM file by its DICM prefix
    noext = table.loc[table["form"] == "dicom_mono2_12bit_noext", "path"].iloc[0]
    assert "." not in noext.rsplit("/", 1)[-1] and dicom.has_preamble(noext)


def test_every_form_gives_the_same_prediction(films):
    """A DenseNet-121 (random weights, fixed seed) sees the same films through the decode cache:
    probabilities equal to 1e-3 for every form."""
    root, table = films
    torch.manual_seed(0)
    model = build_model(len(LABELS), 0.0).eval()
    store = cache.build_store(table["path"].tolist(), SIZE, cache_dir=None, progress=False)
    assert store.bad == []
    with torch.no_grad():
        images = torch.from_numpy(np.stack([store[i] for i in range(len(table))]))
        probs = torch.sigmoid(model(to_model_input(images))).numpy()
    for film, rows in table.groupby("film").indices.items():
        assert np.abs(probs[rows] - probs[rows[0]]).max() < 1e-3
    # the films differ, so equal predictions are not a constant model
    assert np.abs(probs[table["film"] == 0].mean(0) - probs[table["film"] == 1].mean(0)).max() > 1e-4


def test_monochrome1_read_without_the_inversion_is_caught(films):
    """The MONOCHROME1 file stores the film inverted. The modality LUT and window alone (pydicom's
    pipeline, no inversion) give a film far from the PNG; the reader's inversion brings it back."""
    root, table = films
    path = table.loc[(table["form"] == "dicom_mono1_12bit") & (table["film"] == 0), "path"].iloc[0]
    png = load_image(table.loc[(table["form"] == "png") & (table["film"] == 0), "path"].iloc[0]).astype(float)
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    shown = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    black, white = apply_voi_lut(np.array([-np.inf, np.inf]), ds)
    uninverted = np.rint(np.clip((shown - black) / (white - black), 0, 1) * 255)
    assert np.abs(uninverted - png).mean() > 60
    assert np.corrcoef(uninverted.ravel(), png.ravel())[0, 1] < -0.9
    assert np.abs(load_image(path).astype(float) - png).max() <= 1
    # and the stored values really are inverted against the MONOCHROME2 file of the same film
    mono2 = pydicom.dcmread(table.loc[(table["form"] == "dicom_mono2_12bit") & (table["film"] == 0), "path"].iloc[0])
    np.testing.assert_array_equal(ds.pixel_array.astype(int), 4095 - mono2.pixel_array.astype(int))


def test_12bit_forms_carry_rescale_and_a_window_that_maps_back(films):
    _, table = films
    for form in ("dicom_mono2_12bit", "dicom_rle_12bit", "dicom_j2k_12bit"):
        path = table.loc[table["form"] == form, "path"].iloc[0]
        ds = pydicom.dcmread(path)
        assert ds.BitsStored == 12 and "RescaleSlope" in ds and "WindowCenter" in ds
        assert ds.file_meta.TransferSyntaxUID == DICOM_FORMS[form][2]
        # without the window (the full 12-bit range) the film is a much flatter picture
        bits = read_film(path, "bits")
        assert bits.max() - bits.min() < 0.75 * (read_film(path).max() - read_film(path).min())


# ====== --dicom-window: the documented mapping on a synthetic file ======

@pytest.fixture(scope="module")
def ramp_files(tmp_path_factory):
    """64 x 64 stored values 1000..3047 (each twice), rescale slope 0.5 / intercept -100, window
    centre 500 / width 400, as MONOCHROME2 and MONOCHROME1; and the same without a window."""
    root = tmp_path_factory.mktemp("ramp")
    stored = (1000 + np.arange(4096) // 2).reshape(64, 64).astype(np.uint16)
    rescale = {"RescaleSlope": "0.5", "RescaleIntercept": "-100"}
    window = {"WindowCenter": "500", "WindowWidth": "400"}
    return {"stored": stored,
            "mono2": write_synthetic(root / "mono2.dcm", stored, **rescale, **window),
            "mono1": write_synthetic(root / "mono1.dcm", stored, "MONOCHROME1", **rescale, **window),
            "nowindow": write_synthetic(root / "nowindow.dcm", stored, **rescale)}


def test_window_modes_give_the_documented_mapping(ramp_files):
    stored = ramp_files["stored"].astype(np.float64)
    modality = 0.5 * stored - 100  # 400 .. 1423.5
    expected = {
        # LINEAR (PS3.3 C.11.2.1.2.1): centre - 0.5 and width - 1
        "file": np.clip((modality - 499.5) / 399 + 0.5, 0, 1),
        # every value 12 bits hold, through the rescale: modality -100 .. 1947.5
        "bits": (modality + 100) / (0.5 * 4095),
        "minmax": (modality - modality.min()) / (modality.max() - modality.min()),
        "percentile": np.clip((modality - np.percentile(modality, 0.5))
                              / (np.percentile(modality, 99.5) - np.percentile(modality, 0.5)), 0, 1),
    }
    for mode, film in expected.items():
        got = read_film(ramp_files["mono2"], mode)
        np.testing.assert_allclose(got, film, atol=1e-6, err_msg=mode)
        np.testing.assert_allclose(read_film(ramp_files["mono1"], mode), 1 - film, atol=1e-6, err_msg=mode)
    # the percentile window clips 0.5% of the pixels at each end
    clipped = read_film(ramp_files["mono2"], "percentile")
    assert (clipped == 0).mean() == pytest.approx(0.005, abs=0.001)
    assert (clipped == 1).mean() == pytest.approx(0.005, abs=0.001)


def test_a_voi_lut_sequence_comes_before_the_window(tmp_path):
    """``file``: the VOI LUT Sequence (here a square-root curve over stored values 1000-2023) wins
    over a WindowCenter/WindowWidth pair, and its output range is shown black to white."""
    from pydicom.dataset import Dataset

    lut = (np.sqrt(np.arange(1024) / 1023) * 60000).astype(int)
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [1024, 1000, 16])
    item.add_new("LUTData", "US", lut.tolist())
    stored = (900 + np.arange(64 * 20)).reshape(20, 64).astype(np.uint16)
    path = write_synthetic(tmp_path / "voi.dcm", stored, VOILUTSequence=[item], WindowCenter="10", WindowWidth="20")
    expected = lut[np.clip(stored.astype(int) - 1000, 0, 1023)] / lut.max()
    np.testing.assert_allclose(read_film(path), expected, atol=1e-6)


def test_a_file_without_a_window_is_read_with_its_bits(ramp_files):
    np.testing.assert_array_equal(read_film(ramp_files["nowindow"], "file"), read_film(ramp_files["nowindow"], "bits"))
    assert not np.allclose(read_film(ramp_files["mono2"], "file"), read_film(ramp_files["mono2"], "bits"))
    with pytest.raises(ValueError, match="--dicom-window 'auto'"):
        read_film(ramp_files["mono2"], "auto")


def test_the_cache_is_not_reused_across_window_modes(ramp_files, tmp_path):
    paths = [str(ramp_files["mono2"])]
    stores = {mode: cache.build_store(paths, 32, cache_dir=tmp_path, progress=False, dicom_window=mode)
              for mode in ("file", "bits", "minmax")}
    assert len(list(tmp_path.glob("*.npy"))) == 3
    for mode, store in stores.items():
        np.testing.assert_array_equal(store[0], model_image(paths[0], 32, mode))
    assert not np.array_equal(stores["file"][0], stores["bits"][0])
    assert not np.array_equal(stores["bits"][0], stores["minmax"][0])
    again = cache.build_store(paths, 32, cache_dir=tmp_path, progress=False, dicom_window="minmax")
    assert again.path == stores["minmax"].path and len(list(tmp_path.glob("*.npy"))) == 3


# ====== pydicom's own test files ======

def test_grey_test_files_match_pydicoms_pipeline():
    for name in (MR, CT, "JPEG2000.dcm"):
        ds = pydicom.dcmread(bundled(name))
        shown = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)  # unchanged without a window
        if "WindowCenter" in ds:
            black, white = apply_voi_lut(np.array([-np.inf, np.inf]), ds)
        else:  # the bits fallback: the signed 16-bit range through the modality LUT
            black, white = apply_modality_lut(np.array([-32768, 32767]), ds)
        expected = np.clip((shown - black) / (white - black), 0, 1)
        np.testing.assert_allclose(read_film(bundled(name)), expected, atol=1e-6, err_msg=name)
    # MR_small by the standard's formula: centre 600, width 1600
    pixels = pydicom.dcmread(bundled(MR)).pixel_array.astype(np.float64)
    np.testing.assert_allclose(read_film(bundled(MR)), np.clip((pixels - 599.5) / 1599 + 0.5, 0, 1), atol=1e-6)


def test_compressed_copies_of_a_test_file_decode_identically():
    reference = read_film(bundled(MR))
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"):
        np.testing.assert_array_equal(read_film(bundled(name)), reference, err_msg=name)


def test_rgb_becomes_grey_with_a_warning(caplog):
    with caplog.at_level("WARNING", logger="cxr"):
        film = read_film(bundled(RGB))
    assert "RGB DICOM read as grey" in caplog.text and RGB in caplog.text
    rgb = pydicom.dcmread(bundled(RGB)).pixel_array.astype(np.float64)
    luma = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255
    assert film.shape == rgb.shape[:2]
    np.testing.assert_allclose(film, luma, atol=1e-6)
    # YBR: pydicom converts it to RGB first; the same luma then
    ybr = "SC_ybr_full_422_uncompressed.dcm"
    with caplog.at_level("WARNING", logger="cxr"):
        film = read_film(bundled(ybr))
    assert "YBR_FULL_422 DICOM read as grey" in caplog.text
    rgb = pydicom.dcmread(bundled(ybr)).pixel_array.astype(np.float64)
    np.testing.assert_allclose(film, (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255, atol=1e-6)


@pytest.mark.parametrize("name, words", [
    (MULTI, ["a multi-frame DICOM (2 frames", "Secondary Capture Image Storage", "export the frame"]),
    ("rtdose.dcm", ["a multi-frame DICOM (15 frames", "RT Dose Storage"]),
    (REPORT, ["a structured report without pixel data", "Comprehensive SR Storage", "modality SR"]),
    (TRUNCATED, ["cannot be decoded (truncated or corrupt DICOM", "--skip-bad-images"]),
    ("examples_palette.dcm", ["PALETTE COLOR", "not supported"]),
])
def test_what_is_not_a_film_is_one_line_naming_the_file_and_what_it_is(name, words):
    for reader in (read_film, read_raw):
        with pytest.raises(ImageError) as info:
            reader(bundled(name))
        message = str(info.value)
        assert message.startswith(f"image {bundled(name)}: ") and "\n" not in message
        for text in words:
            assert text in message


def test_truncated_bytes_of_a_written_film_are_undecodable(films, tmp_path):
    _, table = films
    for form in ("dicom_mono2_12bit", "dicom_rle_12bit", "dicom_j2k_12bit"):
        whole = open(table.loc[table["form"] == form, "path"].iloc[0], "rb").read()
        cut = tmp_path / f"{form}.dcm"
        cut.write_bytes(whole[: len(whole) * 2 // 3])
        with pytest.raises(ImageError, match="cannot be decoded"):
            read_film(cut)


def test_read_raw_gives_the_stored_values(films):
    _, table = films
    path = table.loc[table["form"] == "dicom_mono2_12bit", "path"].iloc[0]
    raw = read_raw(path)
    assert raw.dtype == np.uint16 and raw.min() >= 500 and raw.max() <= 3500
    np.testing.assert_array_equal(raw, pydicom.dcmread(path).pixel_array)


# ====== image folders ======

def test_image_folders_list_dcm_and_extension_less_dicom_files(films, tmp_path):
    _, table = films
    source = table.loc[table["form"] == "dicom_mono2_12bit", "path"].iloc[0]
    shutil.copy(table.loc[table["form"] == "png", "path"].iloc[0], tmp_path / "a.png")
    shutil.copy(source, tmp_path / "b.dcm")
    (tmp_path / "sub").mkdir()
    shutil.copy(source, tmp_path / "sub" / "c")
    shutil.copy(source, tmp_path / "sub" / "1.2.840.5")  # named by its UID
    (tmp_path / "sub" / "notes").write_text("not a film")
    (tmp_path / "readme.txt").write_text("x")
    found = [p.removeprefix(str(tmp_path) + "/") for p in find_images(tmp_path)]
    assert found == ["a.png", "b.dcm", "sub/1.2.840.5", "sub/c"]


# ====== through main.py ======

@pytest.fixture(scope="module")
def cli_set(films, tmp_path_factory):
    """A labelled CSV of the films (every form), a random-weight checkpoint, and broken DICOM
    files to put in it: truncated, multi-frame, a structured report."""
    root, table = films
    out = tmp_path_factory.mktemp("cli")
    df = pd.DataFrame({"image_path": table["path"], "patient_id": table["film"],
                       **{label: (table.index + k) % 2 for k, label in enumerate(LABELS)}})
    df.to_csv(out / "films.csv", index=False)
    whole = open(table.loc[table["form"] == "dicom_rle_12bit", "path"].iloc[0], "rb").read()
    (out / "truncated.dcm").write_bytes(whole[: len(whole) // 2])
    shutil.copy(bundled(MULTI), out / "multiframe.dcm")
    shutil.copy(bundled(REPORT), out / "report.dcm")
    torch.manual_seed(0)
    save_torch(checkpoint_dict(build_model(len(LABELS), 0.0), LABELS, SIZE, 0.0, 0, None), out / "random.pt")
    return out, df


def with_file(cli_set, name, tmp_path):
    out, df = cli_set
    rows = pd.concat([df, pd.DataFrame({"image_path": [str(out / name)], "patient_id": [99],
                                        **{label: [1] for label in LABELS}})])
    rows.to_csv(tmp_path / "with.csv", index=False)
    return tmp_path / "with.csv"


def eval_argv(cli_set, csv, outdir, *extra):
    out, _ = cli_set
    return ["eval", "--csv", csv, "--weights", out / "random.pt", "--outdir", outdir, "--bootstrap", 0,
            "--precision", "fp32", "--num-workers", 0, "--no-cache", *extra]


@pytest.mark.parametrize("name, words", [
    ("truncated.dcm", ["cannot be decoded (truncated or corrupt DICOM"]),
    ("multiframe.dcm", ["a multi-frame DICOM (2 frames"]),
    ("report.dcm", ["a structured report without pixel data", "modality SR"]),
])
def test_eval_stops_with_one_line_naming_the_dicom_and_what_it_is(cli_set, name, words, tmp_path, capsys):
    csv = with_file(cli_set, name, tmp_path)
    assert run_main(*eval_argv(cli_set, csv, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    print(f"\nmatrix | {name} | {last}")  # pytest -s shows the user-facing message (README "DICOM")
    assert last.startswith("main.py eval: error: --csv ") and "1 image(s) cannot be decoded" in last
    assert name in last and "--skip-bad-images" in last
    for text in words:
        assert text in last


def test_skip_bad_images_drops_a_corrupt_dicom(cli_set, tmp_path, capsys):
    out, df = cli_set
    csv = with_file(cli_set, "truncated.dcm", tmp_path)
    assert run_main(*eval_argv(cli_set, csv, tmp_path / "out", "--skip-bad-images")) == 0
    preds = pd.read_csv(tmp_path / "out" / "predictions_test.csv")
    assert preds["image_path"].tolist() == df["image_path"].tolist()
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["skipped_images"]["test"]["paths"] == [str(out / "truncated.dcm")]
    assert config["args"]["dicom_window"] == "file"
    assert "skipping 1 undecodable image(s)" in capsys.readouterr().err


def test_stress_runs_the_acquisition_family_into_its_files_and_the_report(cli_set, tmp_path):
    from tools.html_report import stress_section

    _, df = cli_set
    df.head(8).to_csv(tmp_path / "eight.csv", index=False)  # one film in every form, and a second one
    out = tmp_path / "stress"
    assert run_main("stress", "--csv", tmp_path / "eight.csv", "--weights", cli_set[0] / "random.pt",
                    "--outdir", out, "--bootstrap", 20, "--precision", "fp32", "--num-workers", 0,
                    "--corruptions", "acquisition") == 0
    summary = pd.read_csv(out / "stress_summary.csv")
    acquisition = ["inversion", "window", "bit_depth", "rotation", "collimation", "markers"]
    assert summary["corruption"].tolist() == ["clean"] + [n for n in acquisition for _ in range(3)]
    assert summary.loc[summary["corruption"] == "bit_depth", "param"].tolist() == [6, 4, 3]
    assert json.loads((out / "rotation_sev2.json").read_text())["param"] == 10
    page = str(stress_section(tmp_path, {"labels": LABELS}))
    assert "Acquisition faults" in page and "20% cropped per border" in page and "3 marks, 12% high" in page


# ====== tools.dicom_index ======

@pytest.fixture(scope="module")
def dicom_tree(tmp_path_factory):
    """The demo generator's --format dicom set (12 films at 64 px), plus what a DICOM folder also
    holds: a structured report, a multi-frame object, a text file."""
    root = tmp_path_factory.mktemp("tree")
    make_demo_dataset(root, n=12, seed=SEED, size=SIZE, image_format="dicom")
    shutil.copy(bundled(REPORT), root / "images" / "report.dcm")
    shutil.copy(bundled(MULTI), root / "images" / "cine.dcm")
    (root / "images" / "notes.txt").write_text("x")
    return root


def test_index_columns_hold_the_headers_that_were_written(dicom_tree, tmp_path, capsys):
    root = dicom_tree
    assert index_main(["--root", str(root), "--out", str(tmp_path / "index.csv")]) == 0
    printed = capsys.readouterr().out
    assert "wrote 12 film(s)" in printed and "1 multi-frame" in printed and "1 not an image (modality SR)" in printed
    index = pd.read_csv(tmp_path / "index.csv", dtype={"patient_id": str})
    assert list(index.columns) == COLUMNS
    demo = pd.read_csv(root / "demo.csv").merge(pd.read_csv(root / "demo_truth.csv"), on="image_path")
    merged = demo.merge(index, on="image_path", validate="one_to_one", suffixes=("", "_dicom"))
    assert len(merged) == 12
    assert (merged["patient_id_dicom"] == merged["patient_id"].astype(str)).all()
    assert (merged["view_dicom"] == merged["view"]).all() and (merged["sex_dicom"] == merged["sex"]).all()
    assert (merged["age_dicom"] == merged["age"]).all()
    sites = PARAMS["dicom"]["site"]
    for column, key in (("manufacturer", "manufacturer"), ("model", "model"), ("institution", "institution"),
                        ("modality", "modality")):
        assert (merged[column] == merged["site"].map(lambda s, k=key: sites[s][k])).all()
    forms = merged["image_format"].map(DICOM_FORMS)
    assert (merged["photometric"] == forms.str[0]).all() and (merged["bits_stored"] == forms.str[1]).all()
    assert (merged["transfer_syntax"] == forms.str[2]).all()
    sides = merged["hidden_device"].map({0: SIZE, 1: round(SIZE * 7 / 8)})
    assert (merged["rows"] == sides).all() and (merged["columns"] == sides).all()
    assert np.allclose(merged["pixel_spacing"], PARAMS["dicom"]["field_mm"] / sides, rtol=1e-8)
    # one study per film, UIDs from the seed: the same on a second generation
    assert merged["study_uid"].is_unique
    for path in merged["image_path"]:
        ds = pydicom.dcmread(root / path, stop_before_pixels=True)
        assert index.set_index("image_path").loc[path, "study_uid"] == ds.StudyInstanceUID


def test_age_is_read_in_years():
    assert [dicom.age_in_years(t) for t in ("045Y", "006M", "052W", "010D", "", None, "45")] == [
        45.0, 0.5, round(52 / (365.25 / 7), 3), round(10 / 365.25, 3), None, None, None]


def test_index_lateral_views_become_ll(tmp_path):
    write_synthetic(tmp_path / "lat.dcm", np.zeros((8, 8), np.uint16), ViewPosition="RL")
    write_synthetic(tmp_path / "pa.dcm", np.zeros((8, 8), np.uint16), ViewPosition="PA")
    assert index_main(["--root", str(tmp_path), "--out", str(tmp_path / "i.csv")]) == 0
    assert pd.read_csv(tmp_path / "i.csv")["view"].tolist() == ["LL", "PA"]


def test_index_errors_are_one_line(tmp_path, capsys):
    assert index_main(["--root", str(tmp_path / "none"), "--out", str(tmp_path / "i.csv")]) == 2
    assert "--root" in capsys.readouterr().err
    (tmp_path / "a.txt").write_text("x")
    assert index_main(["--root", str(tmp_path), "--out", str(tmp_path / "i.csv")]) == 2
    err = capsys.readouterr().err
    assert "no DICOM file found" in err and err.count("\n") == 1
    shutil.copy(bundled(REPORT), tmp_path / "report.dcm")
    assert index_main(["--root", str(tmp_path), "--out", str(tmp_path / "i.csv")]) == 2
    err = capsys.readouterr().err
    assert "none of the 1 DICOM file(s) is a single-frame film (1 not an image (modality SR))" in err
    assert not (tmp_path / "i.csv").exists()


def test_auroc_by_scanner_model_is_one_command_on_an_indexed_folder(dicom_tree, cli_set, tmp_path):
    """dicom_index, the labels joined by image_path, then eval --group-col model."""
    root = dicom_tree
    assert index_main(["--root", str(root), "--out", str(tmp_path / "index.csv")]) == 0
    labels = pd.read_csv(root / "demo.csv")[["image_path", *LABELS]]
    joined = pd.read_csv(tmp_path / "index.csv").merge(labels, on="image_path")
    joined.to_csv(tmp_path / "films.csv", index=False)
    out = tmp_path / "eval"
    assert run_main("eval", "--csv", tmp_path / "films.csv", "--img-root", root, "--weights", cli_set[0] / "random.pt",
                    "--group-col", "model", "--min-group-size", 2, "--bootstrap", 0, "--precision", "fp32",
                    "--num-workers", 0, "--outdir", out) == 0
    groups = json.loads((out / "group_metrics_model.json").read_text())["groups"]
    assert {g: block["n"] for g, block in groups.items()} == joined["model"].value_counts().to_dict()
