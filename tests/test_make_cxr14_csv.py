"""Specification of make_cxr14_csv.py on small Data_Entry tables built in tmp_path."""

import os

import pandas as pd
import pytest

import make_cxr14_csv
from make_cxr14_csv import FINDINGS, main

HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
          "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")

# (patient, follow-up, finding labels, sex, view, age); image name is PPPPPPPP_FFF.png
ROWS = [
    (1, 0, "Cardiomegaly|Emphysema", "M", "PA", 58),
    (1, 1, "Cardiomegaly", "M", "PA", 58),
    (1, 2, "No Finding", "M", "AP", 59),
    (2, 0, "Edema|Effusion|Infiltration", "F", "AP", 71),
    (2, 1, "Effusion", "F", "AP", 71),
    (3, 0, "No Finding", "F", "PA", 33),
    (4, 0, "Hernia", "M", "PA", 80),
    (4, 1, "Pleural_Thickening|Effusion", "M", "PA", 81),
    (5, 0, "Edema", "F", "AP", 45),
    (6, 0, "Cardiomegaly|Edema|Effusion|Pneumonia", "M", "AP", 66),
    (7, 0, "No Finding", "M", "PA", 12),
    (8, 0, "Mass|Nodule", "F", "PA", 50),
    (8, 1, "Mass", "F", "PA", 51),
    (9, 0, "Atelectasis", "M", "AP", 29),
    (10, 0, "Pneumothorax|Fibrosis|Consolidation", "F", "PA", 40),
    (11, 0, "No Finding", "M", "PA", 62),
    (12, 0, "Effusion|Cardiomegaly", "F", "AP", 77),
    (12, 1, "No Finding", "F", "AP", 77),
]


def image_name(patient, follow_up):
    return f"{patient:08d}_{follow_up:03d}.png"


NAMES = [image_name(p, f) for p, f, *_ in ROWS]
FINDINGS_OF = {image_name(p, f): labels for p, f, labels, *_ in ROWS}
# Patients 4 and 8 form the official test list; images of patient 11 and one of patient 2 are missing.
TEST_NAMES = {name for name in NAMES if name.startswith(("00000004_", "00000008_"))}
MISSING = {image_name(11, 0), image_name(2, 1)}


def write_table(path, trailing_rows=False, trailing_header=False):
    lines = [HEADER + ("," if trailing_header else "")]
    for patient, follow_up, labels, sex, view, age in ROWS:
        line = f"{image_name(patient, follow_up)},{labels},{follow_up},{patient},{age},{sex},{view},2048,2500,0.168,0.168"
        lines.append(line + ("," if trailing_rows else ""))
    path.write_text("\n".join(lines) + "\n")


def make_dataset(root, test_list=True, **table_kwargs):
    """A ChestX-ray14-shaped folder: table in a subfolder, images over two images_0XX/images/ folders."""
    (root / "meta").mkdir(parents=True)
    write_table(root / "meta" / "Data_Entry_2017.csv", **table_kwargs)
    if test_list:
        (root / "meta" / "test_list.txt").write_text("\n".join(sorted(TEST_NAMES)) + "\n")
        train_val = sorted(set(NAMES) - TEST_NAMES)
        (root / "meta" / "train_val_list.txt").write_text("\n".join(train_val) + "\n")
    for index, name in enumerate(NAMES):
        if name in MISSING:
            continue
        folder = root / f"images_{1 + index % 2:03d}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")
    return root


def run(root, out, *extra):
    return main(["--hf-root", str(root), "--out", str(out), *extra])


@pytest.fixture
def dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return make_dataset(tmp_path / "cxr14")


def read_out(path):
    out = pd.read_csv(path, dtype={"num_findings_bin": str})
    out["name"] = out["image_path"].map(os.path.basename)
    return out


def test_label_columns_and_finding_counts_follow_finding_labels(dataset, tmp_path):
    labels = ["Cardiomegaly", "Edema", "Effusion", "Hernia"]
    assert run(dataset, tmp_path / "out.csv", "--labels", *labels) == 0
    out = read_out(tmp_path / "out.csv")
    assert list(out.columns[:-1]) == ["image_path", "split", *labels, "view", "sex", "age",
                                      "patient_id", "follow_up", "num_findings", "num_findings_bin"]
    assert sorted(out["name"]) == sorted(set(NAMES) - MISSING)
    for _, row in out.iterrows():
        named = [] if FINDINGS_OF[row["name"]] == "No Finding" else FINDINGS_OF[row["name"]].split("|")
        for label in labels:
            assert row[label] == int(label in named), (row["name"], label)
        assert row["num_findings"] == len(named)
        assert row["num_findings_bin"] == {0: "0", 1: "1"}.get(len(named), "2+")


def test_metadata_columns_copied_from_table(dataset, tmp_path):
    assert run(dataset, tmp_path / "out.csv") == 0
    out = read_out(tmp_path / "out.csv").set_index("name")
    for patient, follow_up, _, sex, view, age in ROWS:
        name = image_name(patient, follow_up)
        if name in MISSING:
            continue
        assert tuple(out.loc[name, ["patient_id", "follow_up", "sex", "view", "age"]]) == (
            patient, follow_up, sex, view, age)


def test_image_paths_relative_to_working_directory_and_usable(dataset, tmp_path):
    assert run(dataset, tmp_path / "out.csv") == 0
    out = read_out(tmp_path / "out.csv")
    for path in out["image_path"]:
        assert not os.path.isabs(path)
        assert path.startswith(os.path.join("cxr14", "images_00"))
        assert os.path.isfile(path)


def test_image_paths_absolute_when_root_outside_working_directory(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "cxr14")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert run(root, "out.csv") == 0
    out = read_out(elsewhere / "out.csv")
    assert all(os.path.isabs(path) and os.path.isfile(path) for path in out["image_path"])


def test_official_test_list_is_honoured_and_patients_do_not_cross_splits(dataset, tmp_path):
    assert run(dataset, tmp_path / "out.csv", "--val-frac", "0.3") == 0
    out = read_out(tmp_path / "out.csv")
    assert set(out.loc[out["split"] == "test", "name"]) == TEST_NAMES
    assert (out.groupby("patient_id")["split"].nunique() == 1).all()
    # --val-frac is a fraction of the train_val patients in the whole table (10 patients here).
    # Patient 11 has no image on disk, so 2 or 3 of the 3 val patients remain.
    val_patients = set(out.loc[out["split"] == "val", "patient_id"])
    assert 2 <= len(val_patients) <= round(0.3 * 10)
    assert not val_patients & {4, 8}
    assert set(out["split"]) == {"train", "val", "test"}


def test_without_test_list_split_is_patient_grouped_70_10_20(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = make_dataset(tmp_path / "cxr14", test_list=False)
    assert run(root, tmp_path / "out.csv", "--seed", "7") == 0
    out = read_out(tmp_path / "out.csv")
    assert (out.groupby("patient_id")["split"].nunique() == 1).all()
    # The split is drawn over the table's 12 patients (before images are looked up): cuts at
    # round(0.7 * 12) = 8 and round(0.8 * 12) = 10 give 8 / 2 / 2 patients.
    split_of = make_cxr14_csv.split_patients(pd.Series(range(1, 13)), {"train": 0.7, "val": 0.1, "test": 0.2}, 7)
    assert split_of.value_counts().to_dict() == {"train": 8, "test": 2, "val": 2}
    expected = dict(zip(range(1, 13), split_of))
    assert all(expected[p] == s for p, s in zip(out["patient_id"], out["split"]))


def test_same_seed_same_split_and_other_seed_can_differ(tmp_path):
    ids = pd.Series(range(1000))
    fractions = make_cxr14_csv.DEFAULT_FRACTIONS
    first = make_cxr14_csv.split_patients(ids, fractions, 1337)
    assert first.equals(make_cxr14_csv.split_patients(ids, fractions, 1337))
    assert not first.equals(make_cxr14_csv.split_patients(ids, fractions, 1338))
    assert first.value_counts().to_dict() == {"train": 700, "test": 200, "val": 100}


def test_age_accepts_plain_years_and_the_058Y_spelling():
    ages = make_cxr14_csv.parse_age(pd.Series(["058Y", "7Y", "101"]))
    assert ages.tolist() == [58, 7, 101]


def test_dropped_and_kept_rows_are_printed(dataset, tmp_path, capsys):
    assert run(dataset, tmp_path / "out.csv") == 0
    printed = capsys.readouterr().out
    assert f"kept {len(NAMES) - len(MISSING)} rows" in printed
    assert f"dropped {len(MISSING)} rows" in printed


def test_count_table_printed_per_split_and_label(dataset, tmp_path, capsys):
    assert run(dataset, tmp_path / "out.csv", "--labels", "Effusion") == 0
    printed = capsys.readouterr().out
    out = read_out(tmp_path / "out.csv")
    test_rows = out[out["split"] == "test"]
    # the test split is patients 4 and 8: 4 images, one with Effusion
    line = next(line for line in printed.splitlines() if line.startswith("| test"))
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    assert cells == ["test", str(len(test_rows)), "2", f"{int(test_rows['Effusion'].sum())} (25.0%)"]


@pytest.mark.parametrize("trailing_rows, trailing_header", [(False, False), (True, False), (True, True)])
def test_header_with_or_without_trailing_empty_column(tmp_path, monkeypatch, trailing_rows, trailing_header):
    monkeypatch.chdir(tmp_path)
    reference = make_dataset(tmp_path / "plain")
    assert run(reference, tmp_path / "plain.csv") == 0
    variant = make_dataset(tmp_path / "variant", trailing_rows=trailing_rows, trailing_header=trailing_header)
    assert run(variant, tmp_path / "variant.csv") == 0
    plain, other = read_out(tmp_path / "plain.csv"), read_out(tmp_path / "variant.csv")
    assert plain.drop(columns="image_path").equals(other.drop(columns="image_path"))


def test_unknown_label_exits_2_listing_valid_labels(dataset, tmp_path, capsys):
    assert run(dataset, tmp_path / "out.csv", "--labels", "Cardiomegaly", "Cardiomegally") == 2
    err = capsys.readouterr().err
    assert err.startswith("make_cxr14_csv.py: error: ")
    assert "Cardiomegally" in err
    assert all(name in err for name in FINDINGS)
    assert not (tmp_path / "out.csv").exists()


def test_no_table_names_root_and_pattern(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run(tmp_path / "empty", tmp_path / "out.csv") == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "empty") in err and "Data_Entry_2017*.csv" in err


def test_no_image_found_is_an_error(tmp_path, capsys):
    write_table_root = tmp_path / "cxr14"
    write_table_root.mkdir()
    write_table(write_table_root / "Data_Entry_2017_v2020.csv")
    assert run(write_table_root, tmp_path / "out.csv") == 2
    assert "none of the 18 images" in capsys.readouterr().err


def test_missing_columns_are_named(tmp_path, capsys):
    root = make_dataset(tmp_path / "cxr14")
    table = root / "meta" / "Data_Entry_2017.csv"
    table.write_text(table.read_text().replace("Patient ID", "PatientID").replace("View Position", "View"))
    assert run(root, tmp_path / "out.csv") == 2
    err = capsys.readouterr().err
    assert "Patient ID" in err and "View Position" in err and str(table) in err


def test_output_written_atomically_without_leftovers(dataset, tmp_path):
    out_dir = tmp_path / "outputs"
    assert run(dataset, out_dir / "cxr14.csv") == 0
    assert os.listdir(out_dir) == ["cxr14.csv"]
