"""tools/check_data.py: exit 0 on clean data, 1 naming every problem, 2 on usage errors; the
report's numbers equal independent counts of the fixture."""
import json

import cv2
import numpy as np
import pandas as pd
import pytest

from tools.check_data import main

LABELS = ["Cardiomegaly", "Edema", "Effusion"]


def write_images(root, kinds):
    """One small image per (name, kind): g8 = 8-bit grey, g16 = 16-bit grey, rgb, rgba, jpg."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (kind, h, w) in kinds.items():
        if kind == "g8":
            image = rng.integers(0, 256, (h, w), dtype=np.uint8)
        elif kind == "g16":
            image = rng.integers(0, 4096, (h, w), dtype=np.uint16)
        elif kind in ("rgb", "jpg"):
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        else:
            image = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
        assert cv2.imwrite(str(root / name), image)


def clean_fixture(tmp_path):
    """12 rows, 6 patients (2 images each) split train/val/test by patient; both classes of
    every label in every split; images of mixed sizes and pixel types."""
    kinds = {}
    sizes = [(40, 30), (32, 32), (20, 50), (36, 28)]
    types = ["g8", "g8", "g8", "g16", "rgb", "rgba", "g8", "g8", "jpg", "g8", "g8", "g16"]
    rows = []
    for i, kind in enumerate(types):
        name = f"img{i:02d}.{'jpg' if kind == 'jpg' else 'png'}"
        kinds[name] = (kind, *sizes[i % 4])
        patient = f"p{i // 2}"
        split = ("train", "train", "val", "val", "test", "test")[i // 2]
        rows.append({"image_path": name, "Cardiomegaly": i % 2, "Edema": (i + 1) % 2,
                     "Effusion": "" if i == 5 else i % 2, "patient_id": patient, "split": split,
                     "age": 40 + i})
    write_images(tmp_path / "img", kinds)
    csv = tmp_path / "data.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv, tmp_path / "img", kinds


def run(capsys, *argv):
    code = main([*map(str, argv), "--no-progress"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_clean_data_exits_0_and_reports_true_counts(tmp_path, capsys):
    csv, root, kinds = clean_fixture(tmp_path)
    code, out, err = run(capsys, "--csv", csv, "--img-root", root, "--out", tmp_path / "report.json")
    assert code == 0, out
    assert "no problems found" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] is True and report["problems"] == []
    assert report["n_rows"] == 12 and report["splits"] == {"train": 4, "val": 4, "test": 4}

    # Prevalence per split equals a direct pandas count of the same CSV.
    df = pd.read_csv(csv)
    for r in report["prevalence"]:
        rows = df if r["split"] == "all" else df[df["split"] == r["split"]]
        known = rows[r["label"]].dropna()
        assert (r["n"], r["n_pos"]) == (len(known), int(known.sum()))
        assert r["prevalence"] == pytest.approx(known.mean())

    images = report["images"]
    heights = [h for _, h, _ in kinds.values()]
    widths = [w for _, _, w in kinds.values()]
    assert images["height"] == {"min": min(heights), "median": float(np.median(heights)), "max": max(heights)}
    assert images["width"] == {"min": min(widths), "median": float(np.median(widths)), "max": max(widths)}
    assert images["bit_depth"] == {"8-bit": 10, "16-bit": 2}
    assert images["channels"] == {"grayscale": 9, "RGB": 2, "RGBA": 1}
    assert images["missing"] == [] and images["undecodable"] == []


def test_missing_undecodable_and_leaking_patient_exit_1_naming_each(tmp_path, capsys):
    csv, root, _ = clean_fixture(tmp_path)
    df = pd.read_csv(csv)
    (root / "img03.png").unlink()  # missing
    (root / "img07.png").write_bytes((root / "img07.png").read_bytes()[:60])  # truncated
    df.loc[df["image_path"] == "img10.png", "patient_id"] = "p0"  # p0 now in train and test
    df.to_csv(csv, index=False)
    code, out, err = run(capsys, "--csv", csv, "--img-root", root, "--out", tmp_path / "r.json")
    assert code == 1
    assert "3 problem(s)" in out
    assert "1 of 12 image(s) not found" in out and "img03.png" in out
    assert "1 image(s) cannot be decoded" in out and "img07.png" in out
    assert "p0 in test, train" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] is False and len(report["problems"]) == 3
    assert report["images"]["missing"] == [str(root / "img03.png")]
    assert [u["path"] for u in report["images"]["undecodable"]] == [str(root / "img07.png")]
    assert report["patients_in_several_splits"] == {"p0": ["test", "train"]}
    assert report["images"]["decoded"] == 10


def test_bad_label_values_and_duplicates_are_problems_not_tracebacks(tmp_path, capsys):
    csv, root, _ = clean_fixture(tmp_path)
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    df.loc[3, "Edema"] = "yes"
    df.loc[6, "Effusion"] = "2"
    df.loc[9, "image_path"] = df.loc[8, "image_path"]
    df.to_csv(csv, index=False)
    code, out, _ = run(capsys, "--csv", csv, "--img-root", root)
    assert code == 1
    assert "column Edema, row 5: value 'yes'" in out
    # Effusion has an empty cell, so pandas reads the column as float: the value shows as '2.0'.
    assert "column Effusion, row 8: value '2.0'" in out
    assert "rows 10 and 11: duplicated path 'img08.jpg'" in out
    assert "prevalence not computed for Edema, Effusion" in out


def test_no_split_column_and_an_absent_split_are_fine(tmp_path, capsys):
    csv, root, _ = clean_fixture(tmp_path)
    df = pd.read_csv(csv)
    df.drop(columns="split").to_csv(tmp_path / "nosplit.csv", index=False)
    code, out, _ = run(capsys, "--csv", tmp_path / "nosplit.csv", "--img-root", root)
    assert code == 0 and "no split column" in out
    df[df["split"] != "val"].to_csv(tmp_path / "noval.csv", index=False)
    code, out, _ = run(capsys, "--csv", tmp_path / "noval.csv", "--img-root", root)
    assert code == 0 and "splits: train 4, test 4" in out


def test_one_class_label_in_a_split_is_a_warning(tmp_path, capsys):
    csv, root, _ = clean_fixture(tmp_path)
    df = pd.read_csv(csv)
    df.loc[df["split"] == "test", "Edema"] = 0
    df.to_csv(csv, index=False)
    code, out, _ = run(capsys, "--csv", csv, "--img-root", root, "--out", tmp_path / "r.json")
    assert code == 0
    assert "split test, label Edema: only negatives (4 known row(s))" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert any("split test, label Edema" in w for w in report["warnings"])


def test_usage_errors_exit_2_with_one_line(tmp_path, capsys):
    code, out, err = run(capsys, "--csv", tmp_path / "absent.csv", "--img-root", tmp_path)
    assert code == 2 and out == ""
    assert err.startswith("check_data: error: --csv ") and "absent.csv: file not found" in err
    assert err.count("\n") == 1

    csv, root, _ = clean_fixture(tmp_path)
    code, _, err = run(capsys, "--csv", csv, "--img-root", root, "--labels", "Cardiomegaly", "Pneumonia")
    assert code == 2 and "Pneumonia not found" in err and "columns are:" in err
    code, _, err = run(capsys, "--csv", csv, "--img-root", tmp_path / "nowhere")
    assert code == 2 and "--img-root" in err and "no such folder" in err


# ====== DICOM ======

def write_dicom_film(path, photometric="MONOCHROME2", bits=12, syntax="1.2.840.10008.1.2.1", window=True, **headers):
    """A 40 x 36 film (JPEG 2000's six wavelet levels need 32 px) with the given headers."""
    from tools.dicom import write_dicom

    stored = np.random.default_rng(len(str(path))).integers(0, 2**bits, (40, 36)).astype(np.uint16 if bits > 8 else np.uint8)
    attributes = {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.1", "SOPInstanceUID": f"1.2.3.{len(str(path))}",
                  "PhotometricInterpretation": photometric, "BitsStored": bits, **headers}
    if window:
        attributes.update(WindowCenter="2048", WindowWidth="4096")
    write_dicom(path, stored, attributes, syntax)
    return path


def test_dicom_audit_counts_the_headers_that_were_written(tmp_path, capsys):
    """Four DICOM films beside PNGs: counts per photometric interpretation, bits, transfer syntax,
    modality and view equal what was written; the film without a window is a note, the lateral
    one a warning; a transfer syntax nothing here decodes is a warning and its film a problem."""
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID

    csv, root, _ = clean_fixture(tmp_path)
    write_dicom_film(root / "d1.dcm", syntax="1.2.840.10008.1.2.5", Modality="DX", ViewPosition="PA")
    write_dicom_film(root / "d2.dcm", "MONOCHROME1", Modality="CR", ViewPosition="AP")
    write_dicom_film(root / "d3.dcm", bits=8, window=False, Modality="DX", ViewPosition="LL")
    write_dicom_film(root / "d4", syntax="1.2.840.10008.1.2.4.90", Modality="DX", ViewPosition="PA")  # no extension
    mpeg = pydicom.dcmread(write_dicom_film(root / "d5.dcm", Modality="DX", ViewPosition="PA"))
    mpeg.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2: no decoder here
    mpeg.PixelData = encapsulate([b"\0" * 16])
    mpeg["PixelData"].VR = "OB"
    mpeg.save_as(root / "d5.dcm", enforce_file_format=True)
    df = pd.read_csv(csv)
    extra = pd.DataFrame({"image_path": ["d1.dcm", "d2.dcm", "d3.dcm", "d4", "d5.dcm"], "Cardiomegaly": [0, 1, 0, 1, 0],
                          "Edema": 1, "Effusion": 0, "patient_id": ["p7", "p7", "p8", "p8", "p8"], "split": "test",
                          "age": 50})
    pd.concat([df, extra]).to_csv(csv, index=False)

    code, out, _ = run(capsys, "--csv", csv, "--img-root", root, "--out", tmp_path / "r.json")
    report = json.loads((tmp_path / "r.json").read_text())
    audit = report["dicom"]
    assert audit["files"] == 5
    assert audit["photometric"] == {"MONOCHROME2": 4, "MONOCHROME1": 1}
    assert audit["bits_stored"] == {"12": 4, "8": 1}
    assert audit["modality"] == {"DX": 4, "CR": 1}
    assert audit["view"] == {"PA": 3, "AP": 1, "LL": 1}
    syntaxes = {s["uid"]: (s["files"], s["decodable"]) for s in audit["transfer_syntax"]}
    assert syntaxes == {"1.2.840.10008.1.2.1": (2, True), "1.2.840.10008.1.2.5": (1, True),
                        "1.2.840.10008.1.2.4.90": (1, True), "1.2.840.10008.1.2.4.100": (1, False)}
    assert audit["without_window"] == {"count": 1, "first": [str(root / "d3.dcm")]}
    assert audit["lateral"] == [str(root / "d3.dcm")]
    assert any("1 DICOM film(s) carry no window" in n for n in report["notes"])
    assert any("1 DICOM film(s) have a lateral ViewPosition" in w for w in report["warnings"])
    assert any("MPEG2" in w and "cannot decode" in w for w in report["warnings"])
    # the MPEG2 film cannot be read: the image pass names it, and says why
    assert code == 1 and [u["path"] for u in report["images"]["undecodable"]] == [str(root / "d5.dcm")]
    assert "cannot be decoded by this installation" in report["images"]["undecodable"][0]["error"]
    assert report["images"]["decoded"] == 16
    assert "DICOM (5 of 17 images; headers)" in out and "NOT decodable here" in out


def test_no_dicom_no_audit(tmp_path, capsys):
    csv, root, _ = clean_fixture(tmp_path)
    code, out, _ = run(capsys, "--csv", csv, "--img-root", root, "--out", tmp_path / "r.json")
    assert code == 0 and json.loads((tmp_path / "r.json").read_text())["dicom"] is None and "DICOM" not in out
