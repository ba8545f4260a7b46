"""Other collections: ``python -m tools.datasets`` on small CheXpert- and MIMIC-CXR-JPG-shaped
trees written here, uncertain labels (--uncertain), lateral films (--views), the label-name map,
and valtool's internal-vs-external table."""
import gzip
import json
import logging
import re

import cv2
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from conftest import run_main
from tools.compare import internal_vs_external
from tools.datasets import CHEXPERT_OBSERVATIONS, main
from tools.errors import UserError
from tools.splits import read_source
from tools.table import ReadRules, pick_labels, read_table

POLICY = {"ignore": np.nan, "zeros": 0.0, "ones": 1.0}
VARIED = ("Cardiomegaly", "Edema", "Pleural Effusion", "Enlarged Cardiomediastinum")
WRITTEN = {"Pleural Effusion": "Effusion"}  # CheXpert's name -> the name the CSV carries


def expected_value(raw: str, policy: str) -> float:
    """The value a raw table cell must be written as, from the datasets' own definitions."""
    return {"1.0": 1.0, "0.0": 0.0, "": np.nan, "-1.0": POLICY[policy]}[raw]


def film(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (16, 16), dtype=np.uint8)
    assert cv2.imwrite(str(path), pixels)


def build(collection, root, out, *extra):
    return main([collection, "--root", str(root), "--out", str(out), *map(str, extra)])


def printed(capsys) -> str:
    return capsys.readouterr().out


def number_before(text: str, words: str) -> int:
    return int(re.search(rf"(\d+) {words}", text).group(1))


# ====== a CheXpert-shaped tree ======

def chexpert_rows(rng):
    """(table, patient, study, view, Frontal/Lateral, AP/PA, sex, age, {observation: raw}) rows:
    train.csv with uncertain and blank values and laterals, valid.csv with 0/1 only."""
    rows = []
    for patient in range(1, 9):
        for study in range(1, 1 + int(rng.integers(1, 4))):
            values = {o: str(rng.choice(["1.0", "0.0", "-1.0", ""])) for o in VARIED}
            projection = str(rng.choice(["AP", "PA"]))
            rows.append(("train", patient, study, 1, "Frontal", projection, "Male", 40 + patient, values))
            if rng.random() < 0.5:
                rows.append(("train", patient, study, 2, "Lateral", "", "Male", 40 + patient, values))
    for patient in range(64541, 64545):
        values = {o: str(rng.choice(["1.0", "0.0"])) for o in VARIED}
        rows.append(("valid", patient, 1, 1, "Frontal", "PA", "Female", 70, values))
        rows.append(("valid", patient, 1, 2, "Lateral", "", "Female", 70, values))
    return rows


def chexpert_path(row):
    table, patient, study, view, frontal_lateral = row[:5]
    kind = "frontal" if frontal_lateral == "Frontal" else "lateral"
    return f"CheXpert-v1.0-small/{table}/patient{patient:05d}/study{study}/view{view}_{kind}.jpg"


def write_chexpert(root, rows, missing=(), bad_value=None):
    folder = root / "CheXpert-v1.0-small"
    header = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(CHEXPERT_OBSERVATIONS)
    for table in ("train", "valid"):
        lines = [header]
        for row in rows:
            if row[0] != table:
                continue
            _, _, _, _, frontal_lateral, projection, sex, age, values = row
            cells = [values.get(o, "") for o in CHEXPERT_OBSERVATIONS]
            lines.append(",".join([chexpert_path(row), sex, str(age), frontal_lateral, projection, *cells]))
            if chexpert_path(row) not in missing:
                film(root / chexpert_path(row), seed=len(lines))
        if bad_value and table == "train":
            line = lines[bad_value[0] - 1].split(",")
            line[5 + CHEXPERT_OBSERVATIONS.index(bad_value[1])] = bad_value[2]
            lines[bad_value[0] - 1] = ",".join(line)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{table}.csv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def chexpert(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = chexpert_rows(np.random.default_rng(3))
    frontal_train = [chexpert_path(r) for r in rows if r[0] == "train" and r[4] == "Frontal"]
    missing = {frontal_train[1], frontal_train[4]}
    write_chexpert(tmp_path / "chexpert", rows, missing)
    return {"root": tmp_path / "chexpert", "rows": rows, "missing": missing, "dir": tmp_path}


def chexpert_expectation(rows, missing, policy, views="frontal"):
    """{image_path as written: (row, {written label: value})} for the rows that must be kept."""
    out = {}
    for row in rows:
        if chexpert_path(row) in missing or (views == "frontal" and row[4] == "Lateral"):
            continue
        values = {WRITTEN.get(o, o): expected_value(row[8][o], policy) for o in VARIED}
        out[f"chexpert/{chexpert_path(row)}"] = (row, values)
    return out


@pytest.mark.parametrize("policy", ["ignore", "zeros", "ones"])
def test_chexpert_labels_under_each_uncertain_policy(chexpert, capsys, policy):
    out = chexpert["dir"] / "chexpert.csv"
    assert build("chexpert", chexpert["root"], out, "--uncertain", policy) == 0
    text = printed(capsys)
    table = pd.read_csv(out)
    expected = chexpert_expectation(chexpert["rows"], chexpert["missing"], policy)
    assert sorted(table["image_path"]) == sorted(expected)
    for _, written in table.iterrows():
        row, values = expected[written["image_path"]]
        for label, value in values.items():
            assert (np.isnan(value) and np.isnan(written[label])) or written[label] == value, (label, row)
    # the map writes ChestX-ray14's name; Enlarged Cardiomediastinum stays apart from Cardiomegaly
    assert "Effusion" in table.columns and "Pleural Effusion" not in table.columns
    assert {"Cardiomegaly", "Enlarged Cardiomediastinum"} <= set(table.columns)
    assert list(table.columns[:2]) == ["image_path", "split"]
    n_uncertain = sum(raw == "-1.0" for row, _ in expected.values() for raw in row[8].values())
    assert n_uncertain > 0
    assert f"{n_uncertain} uncertain (-1) label value(s)" in text and f"--uncertain {policy}" in text


def test_chexpert_views_splits_metadata_and_dropped_counts(chexpert, capsys):
    out = chexpert["dir"] / "chexpert.csv"
    assert build("chexpert", chexpert["root"], out, "--seed", 5, "--val-frac", 0.25) == 0
    text = printed(capsys)
    table = pd.read_csv(out)
    rows = chexpert["rows"]
    laterals = sum(r[4] == "Lateral" for r in rows)
    assert number_before(text, r"lateral film\(s\)") == laterals
    assert number_before(text, "whose image was not found") == len(chexpert["missing"])
    assert set(table["view"]) <= {"AP", "PA"}
    # valid.csv is the test split; val is carved from train.csv by patient; every patient in one split
    assert set(table.loc[table["split"] == "test", "patient_id"]) == {f"patient{p:05d}" for p in range(64541, 64545)}
    assert set(table["split"]) == {"train", "val", "test"}
    assert (table.groupby("patient_id")["split"].nunique() == 1).all()
    assert table.loc[table["split"] == "val", "patient_id"].nunique() == 2  # 0.25 of 8 training patients
    first = table[table["image_path"].str.endswith("patient00003/study1/view1_frontal.jpg")].iloc[0]
    assert first["study_id"] == "patient00003/study1" and first["sex"] == "M" and first["age"] == 43
    # the count table's positives/known for Effusion in test, computed from the rows written
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in text.splitlines() if line.startswith("|")}
    test = table[table["split"] == "test"]["Effusion"]
    column = cells["positives/known"].index("test")
    assert cells["Effusion"][column] == f"{int(test.sum())}/{int(test.notna().sum())}"
    assert cells["images"][column] == str(len(test))


def test_chexpert_all_views_keeps_laterals_as_LL(chexpert):
    out = chexpert["dir"] / "chexpert.csv"
    assert build("chexpert", chexpert["root"], out, "--views", "all") == 0
    table = pd.read_csv(out)
    expected = chexpert_expectation(chexpert["rows"], chexpert["missing"], "ignore", views="all")
    assert sorted(table["image_path"]) == sorted(expected)
    lateral = table["image_path"].str.contains("_lateral.jpg")
    assert lateral.sum() == sum(r[4] == "Lateral" for r in chexpert["rows"])
    assert (table.loc[lateral, "view"] == "LL").all() and set(table.loc[~lateral, "view"]) <= {"AP", "PA"}


def test_built_csv_is_read_by_the_suite_under_either_label_name(chexpert, caplog):
    caplog.set_level(logging.INFO, logger="cxr")
    out = chexpert["dir"] / "chexpert.csv"
    assert build("chexpert", chexpert["root"], out, "--views", "all") == 0
    built = pd.read_csv(out)
    frontal = read_table(out, ["Cardiomegaly", "Effusion"])  # default --views frontal
    assert len(frontal) == int((built["view"] != "LL").sum())
    assert "lateral film(s) (view LL)" in caplog.text and "--views all keeps them" in caplog.text
    # the CSV says Effusion; asking for CheXpert's name reads that column under the name asked for
    source = read_source(out, ".", ["Pleural Effusion", "Edema"], rules=ReadRules(views="all"))
    np.testing.assert_array_equal(source.table["Pleural Effusion"].to_numpy(), built["Effusion"].to_numpy())
    assert len(source.table) == len(built)


def test_chexpert_patient_in_both_tables_goes_to_test(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rows = chexpert_rows(np.random.default_rng(4))
    rows.append(("valid", 2, 9, 1, "Frontal", "PA", "Male", 42, {o: "1.0" for o in VARIED}))
    write_chexpert(tmp_path / "c", rows)
    assert build("chexpert", tmp_path / "c", tmp_path / "c.csv") == 0
    table = pd.read_csv(tmp_path / "c.csv")
    moved = sum(r[0] == "train" and r[1] == 2 and r[4] == "Frontal" for r in rows)
    assert (table.loc[table["patient_id"] == "patient00002", "split"] == "test").all()
    assert f"{moved} of their rows moved to the later split" in printed(capsys)
    assert (table.groupby("patient_id")["split"].nunique() == 1).all()


def test_chexpert_bad_value_is_one_line_naming_file_column_and_row(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_chexpert(tmp_path / "c", chexpert_rows(np.random.default_rng(3)), bad_value=(4, "Edema", "2.0"))
    assert build("chexpert", tmp_path / "c", tmp_path / "c.csv") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m tools.datasets: error: ")
    assert "train.csv: column Edema, row 4: value '2.0'" in err[0] and "Traceback" not in err[0]


@pytest.mark.parametrize("argv,expected", [
    (["chexpert", "--root", "nowhere"], ["--root nowhere: no such folder"]),
    (["chexpert", "--root", "."], ["neither train.csv nor valid.csv found"]),
    (["mimic", "--root", "."], ["mimic-cxr-2.0.0-chexpert.csv", "not found"]),
    (["chexpert", "--root", "c", "--labels", "Mass"], ["--labels Mass: not a CheXpert label",
                                                       "Pleural Effusion (written Effusion)"]),
])
def test_builder_usage_errors_are_one_line(tmp_path, monkeypatch, capsys, argv, expected):
    monkeypatch.chdir(tmp_path)
    write_chexpert(tmp_path / "c", chexpert_rows(np.random.default_rng(3))[:3])
    assert main([*argv, "--out", "o.csv"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    for text in expected:
        assert text in err[0], (text, err[0])


# ====== a MIMIC-CXR-JPG-shaped tree ======

SUBJECTS = {"10000032": "train", "10000764": "train", "11000011": "validate", "12000012": "test",
            "15000015": "train", "19000019": "validate"}


def mimic_rows(rng):
    """Per image: (subject, study, dicom, ViewPosition, {observation: raw}); several studies per
    subject, laterals as LATERAL and LL."""
    rows = []
    for k, subject in enumerate(SUBJECTS):
        for s in range(1 + k % 2 + 1):
            study = str(50000000 + 1000 * k + s)
            values = {o: str(rng.choice(["1.0", "0.0", "-1.0", ""])) for o in VARIED}
            rows.append((subject, study, f"d{k}{s}-frontal", str(rng.choice(["PA", "AP"])), values))
            if s % 2 == 0:
                rows.append((subject, study, f"d{k}{s}-lateral", "LATERAL" if k % 2 else "LL", values))
    return rows


def mimic_image(root, row):
    subject, study, dicom = row[:3]
    return root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"


def write_gz(path, text):
    with gzip.open(path, "wt") as handle:
        handle.write(text)


@pytest.fixture
def mimic(tmp_path, monkeypatch):
    """Labels and metadata gzipped, the split plain. One study has no label row, one image is not
    in the split table, one frontal image is missing."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "mimic"
    root.mkdir()
    rows = mimic_rows(np.random.default_rng(8))
    unlabelled_study = rows[-1][1]
    unsplit = rows[2][2]
    missing = next(r[2] for r in rows[3:] if r[3] in ("PA", "AP") and r[1] != unlabelled_study)
    studies = {}
    for subject, study, _, _, values in rows:
        studies[(subject, study)] = values
    lines = ["subject_id,study_id," + ",".join(sorted(CHEXPERT_OBSERVATIONS))]
    for (subject, study), values in studies.items():
        if study != unlabelled_study:
            lines.append(f"{subject},{study}," + ",".join(values.get(o, "") for o in sorted(CHEXPERT_OBSERVATIONS)))
    write_gz(root / "mimic-cxr-2.0.0-chexpert.csv.gz", "\n".join(lines) + "\n")
    meta = ["dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,"
            "StudyTime"]
    meta += [f"{d},{s},{t},CHEST (PA AND LAT),{v},3056,2544,2180{i:04d},120000" for i, (s, t, d, v, _) in enumerate(rows)]
    write_gz(root / "mimic-cxr-2.0.0-metadata.csv.gz", "\n".join(meta) + "\n")
    split = ["dicom_id,study_id,subject_id,split"]
    split += [f"{d},{t},{s},{SUBJECTS[s]}" for s, t, d, _, _ in rows if d != unsplit]
    (root / "mimic-cxr-2.0.0-split.csv").write_text("\n".join(split) + "\n")
    for i, row in enumerate(rows):
        if row[2] != missing:
            film(mimic_image(root, row), seed=i)
    return {"root": root, "rows": rows, "unlabelled": unlabelled_study, "unsplit": unsplit, "missing": missing,
            "dir": tmp_path}


@pytest.mark.parametrize("policy", ["ignore", "ones"])
def test_mimic_labels_paths_splits_and_drops(mimic, capsys, policy):
    out = mimic["dir"] / "mimic.csv"
    assert build("mimic", mimic["root"], out, "--uncertain", policy) == 0
    text = printed(capsys)
    table = pd.read_csv(out, dtype={"patient_id": str, "study_id": str})
    rows = mimic["rows"]
    kept = [r for r in rows if r[3] in ("PA", "AP") and r[1] != mimic["unlabelled"] and r[2] != mimic["unsplit"]
            and r[2] != mimic["missing"]]
    expected = {str(mimic_image(mimic["root"], r).relative_to(mimic["dir"])): r for r in kept}
    assert sorted(table["image_path"]) == sorted(expected)
    for _, written in table.iterrows():
        subject, study, dicom, view, values = expected[written["image_path"]]
        assert written["patient_id"] == subject and written["study_id"] == study and written["view"] == view
        assert written["split"] == {"train": "train", "validate": "val", "test": "test"}[SUBJECTS[subject]]
        for observation in VARIED:
            value = expected_value(values[observation], policy)
            got = written[WRITTEN.get(observation, observation)]
            assert (np.isnan(value) and np.isnan(got)) or got == value, (observation, dicom)
    assert (table.groupby("patient_id")["split"].nunique() == 1).all()
    assert {"rows", "columns", "study_date", "dicom_id"} <= set(table.columns)
    unlabelled_images = sum(r[1] == mimic["unlabelled"] for r in rows)
    assert re.search(rf"dropped {unlabelled_images} image\(s\) whose study has no row", text)
    assert "and 1 image(s) not listed in mimic-cxr-2.0.0-split.csv" in text
    laterals = sum(r[3] in ("LATERAL", "LL") for r in rows if r[1] != mimic["unlabelled"] and r[2] != mimic["unsplit"])
    assert number_before(text, r"lateral film\(s\)") == laterals
    assert number_before(text, "whose image was not found") == 1
    n_uncertain = sum(raw == "-1.0" for r in kept for o, raw in r[4].items())
    assert f"{n_uncertain} uncertain (-1) label value(s)" in text


def test_mimic_bad_split_value_names_file_column_row(mimic, capsys):
    split = mimic["root"] / "mimic-cxr-2.0.0-split.csv"
    lines = split.read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0] + ",holdout"
    split.write_text("\n".join(lines) + "\n")
    assert build("mimic", mimic["root"], mimic["dir"] / "m.csv") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mimic-cxr-2.0.0-split.csv: column split, row 4: value 'holdout'" in err[0]


def test_mimic_subject_in_two_official_splits_is_moved_to_the_later(mimic, capsys):
    split = mimic["root"] / "mimic-cxr-2.0.0-split.csv"
    table = pd.read_csv(split, dtype=str)
    first = table.index[table["subject_id"] == "10000032"][0]
    table.loc[first, "split"] = "test"
    table.to_csv(split, index=False)
    assert build("mimic", mimic["root"], mimic["dir"] / "m.csv", "--views", "all") == 0
    out = pd.read_csv(mimic["dir"] / "m.csv", dtype={"patient_id": str})
    assert (out.loc[out["patient_id"] == "10000032", "split"] == "test").all()
    assert (out.groupby("patient_id")["split"].nunique() == 1).all()
    assert "patient(s) were in several splits" in printed(capsys)


def test_nih_is_the_make_cxr14_csv_builder(tmp_path, monkeypatch):
    from test_make_cxr14_csv import make_dataset

    import make_cxr14_csv

    monkeypatch.chdir(tmp_path)
    root = make_dataset(tmp_path / "cxr14")
    assert make_cxr14_csv.main(["--hf-root", str(root), "--out", "script.csv"]) == 0
    assert main(["nih", "--root", str(root), "--out", "module.csv"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv("script.csv"), pd.read_csv("module.csv"))
    assert main(["nih", "--root", str(root), "--out", "pe.csv", "--labels", "Pleural Effusion"]) == 0
    assert pd.read_csv("pe.csv")["Effusion"].equals(pd.read_csv("script.csv")["Effusion"])


# ====== reading -1, laterals and label names wherever a CSV is read ======

TABLE = ("image_path,Cardiomegaly,Edema,Effusion,view\n"
         "a.png,-1,0,1,PA\n"
         "b.png,1,-1.0,,AP\n"
         "c.png,0,1,-1,LL\n"
         "d.png,-1,,0,PA\n")


@pytest.mark.parametrize("policy", ["ignore", "zeros", "ones"])
def test_read_table_reads_uncertain_as_the_policy_says(tmp_path, caplog, policy):
    caplog.set_level(logging.INFO, logger="cxr")
    csv = tmp_path / "t.csv"
    csv.write_text(TABLE)
    df = read_table(csv, ["Cardiomegaly", "Edema", "Effusion"], rules=ReadRules(uncertain=policy, views="all"))
    u = POLICY[policy]
    expected = {"Cardiomegaly": [u, 1, 0, u], "Edema": [0, u, 1, np.nan], "Effusion": [1, np.nan, u, 0]}
    for label, values in expected.items():
        np.testing.assert_array_equal(df[label].to_numpy(), np.array(values, float), err_msg=label)
    assert "4 uncertain (-1) label value(s)" in caplog.text and f"--uncertain {policy}" in caplog.text


def test_read_table_leaves_laterals_out_and_counts_only_kept_uncertain_values(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cxr")
    csv = tmp_path / "t.csv"
    csv.write_text(TABLE)
    df = read_table(csv, ["Cardiomegaly", "Edema", "Effusion"])
    assert df["image_path"].tolist() == ["a.png", "b.png", "d.png"]
    assert "1 lateral film(s) (view LL) of 4 rows left out" in caplog.text
    assert "3 uncertain (-1) label value(s) read as unknown" in caplog.text  # the lateral's -1 is not counted


def test_other_bad_values_keep_their_error(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text(TABLE.replace("d.png,-1,,0", "d.png,-2,,0"))
    with pytest.raises(UserError, match=r"t\.csv: column Cardiomegaly, row 5: value '-2' is not 0, 1 or empty"):
        read_table(csv, ["Cardiomegaly"], rules=ReadRules(views="all"))


def test_label_names_map_between_collections(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("image_path,Pleural Effusion,Enlarged Cardiomediastinum\na.png,1,0\nb.png,0,1\n")
    assert read_table(csv, ["Effusion"])["Effusion"].tolist() == [1.0, 0.0]
    with pytest.raises(UserError) as err:  # Enlarged Cardiomediastinum is not Cardiomegaly
        read_table(csv, ["Cardiomegaly"])
    assert "Cardiomegaly not found" in str(err.value)
    assert "columns are: image_path, Pleural Effusion, Enlarged Cardiomediastinum" in str(err.value)
    assert pick_labels(["Cardiomegaly", "Effusion"], ["Pleural Effusion"], None, "", "", "") == ["Effusion"]
    with pytest.raises(UserError, match="named twice"):
        pick_labels(["Cardiomegaly", "Effusion"], ["Effusion", "Pleural Effusion"], None, "", "", "")


@pytest.fixture
def uncertain_predictions(tmp_path):
    """A table with -1 labels and a lateral film, and predictions for every row."""
    rng = np.random.default_rng(2)
    n = 60
    y = rng.choice(["1", "0", "-1", ""], size=(n, 2), p=[0.35, 0.35, 0.2, 0.1])
    view = np.where(np.arange(n) % 7 == 0, "LL", "PA")
    table = pd.DataFrame({"image_path": [f"f{i}.png" for i in range(n)], "split": "test",
                          "Cardiomegaly": y[:, 0], "Pleural Effusion": y[:, 1], "view": view,
                          "patient_id": np.arange(n) // 2})
    table.to_csv(tmp_path / "t.csv", index=False)
    probs = rng.uniform(0, 1, (n, 2))
    pd.DataFrame({"image_path": table["image_path"], "Cardiomegaly_prob": probs[:, 0],
                  "Effusion_prob": probs[:, 1]}).to_csv(tmp_path / "p.csv", index=False)
    return {"dir": tmp_path, "y": y, "view": view, "probs": probs}


@pytest.mark.parametrize("policy,views", [("ignore", "frontal"), ("zeros", "all"), ("ones", "frontal")])
def test_eval_reads_uncertain_labels_and_views(uncertain_predictions, capsys, policy, views):
    d = uncertain_predictions
    out = d["dir"] / f"eval_{policy}"
    assert run_main("eval", "--csv", d["dir"] / "t.csv", "--predictions", d["dir"] / "p.csv", "--outdir", out,
                    "--bootstrap", 0, "--uncertain", policy, "--views", views) == 0
    err = capsys.readouterr().err
    keep = d["view"] != "LL" if views == "frontal" else np.ones(len(d["view"]), bool)
    metrics = json.loads((out / "metrics_test.json").read_text())
    assert metrics["labels"] == ["Cardiomegaly", "Effusion"] and metrics["n"] == int(keep.sum())
    for j, label in enumerate(["Cardiomegaly", "Effusion"]):
        y = np.array([expected_value({"1": "1.0", "0": "0.0", "-1": "-1.0", "": ""}[v], policy) for v in d["y"][:, j]])
        known = keep & ~np.isnan(y)
        assert metrics["per_class"][label]["n"] == int(known.sum())
        assert metrics["per_class"][label]["auroc"] == pytest.approx(roc_auc_score(y[known], d["probs"][known, j]))
    n_uncertain = int((d["y"][keep] == "-1").sum())
    assert f"{n_uncertain} uncertain (-1) label value(s)" in err and f"--uncertain {policy}" in err
    assert ("lateral film(s) (view LL)" in err) == (views == "frontal")


def test_check_data_counts_uncertain_values_as_a_warning(uncertain_predictions, capsys):
    from tools.check_data import main as check_main

    d = uncertain_predictions
    for k in range(len(d["y"])):
        film(d["dir"] / f"f{k}.png", seed=k)
    assert check_main(["--csv", str(d["dir"] / "t.csv"), "--img-root", str(d["dir"]), "--labels", "Cardiomegaly",
                       "Effusion", "--no-progress"]) == 0
    text = capsys.readouterr().out
    keep = d["view"] != "LL"
    assert f"{int((d['y'][keep] == '-1').sum())} uncertain (-1) label value(s) read as unknown" in text
    assert f"{int((~keep).sum())} lateral film(s) (view LL)" in text


# ====== internal vs external ======

def metrics_block(auroc, ci, n=100, n_pos=30):
    return {"auroc": auroc, "auprc": None, "f1@0.5": None, "sens@95spec": None, "n": n, "n_pos": n_pos,
            "ci95": {"auroc": ci, "auprc": None, "f1@0.5": None, "sens@95spec": None}}


def test_internal_vs_external_differences_intervals_and_verdicts():
    external = {"split": "test", "n": 100, "per_class": {
        "Cardiomegaly": metrics_block(0.86, [0.83, 0.89]),   # about the same: kept
        "Edema": metrics_block(0.70, [0.64, 0.76]),          # far below: dropped
        "Effusion": metrics_block(0.84, [0.70, 0.95]),       # wide: unclear
        "Hernia": metrics_block(0.80, [0.70, 0.90])}}
    internal = {"split": "test", "n": 400, "per_class": {
        "Cardiomegaly": metrics_block(0.87, [0.85, 0.89]), "Edema": metrics_block(0.88, [0.86, 0.90]),
        "Pleural Effusion": metrics_block(0.90, [0.88, 0.92])}}
    result = internal_vs_external(external, internal, ["Cardiomegaly", "Edema", "Effusion", "Hernia"])
    for label, name in [("Cardiomegaly", "Cardiomegaly"), ("Edema", "Edema"), ("Effusion", "Pleural Effusion")]:
        e, (el, eh) = external["per_class"][label]["auroc"], external["per_class"][label]["ci95"]["auroc"]
        i, (il, ih) = internal["per_class"][name]["auroc"], internal["per_class"][name]["ci95"]["auroc"]
        d = e - i
        low, high = d - np.hypot(e - el, ih - i), d + np.hypot(eh - e, i - il)
        row = result["per_class"][label]["auroc"]
        assert row["difference"] == pytest.approx(d)
        assert row["difference_ci95"] == pytest.approx([low, high])
        assert result["per_class"][label]["internal_label"] == name
    assert result["kept"] == ["Cardiomegaly"] and result["dropped"] == ["Edema"] and result["unclear"] == ["Effusion"]
    assert "Hernia" in result["not_compared"] and result["per_class"]["Cardiomegaly"]["auprc"]["difference"] is None


def test_internal_without_intervals_uses_score_intervals():
    external = {"per_class": {"Edema": {**metrics_block(0.80, None), "ci95": None}}}
    internal = {"per_class": {"Edema": {**metrics_block(0.85, None), "ci95": None}}}
    row = internal_vs_external(external, internal, ["Edema"])["per_class"]["Edema"]["auroc"]
    low, high = row["difference_ci95"]
    assert low < -0.05 < high and row["external_ci95"][0] < 0.80 < row["external_ci95"][1]


@pytest.mark.slow
def test_valtool_internal_on_a_built_chexpert_csv(demo, trained, tmp_path, monkeypatch):
    """The demo films in CheXpert's layout (valid.csv = the demo test split, some laterals and -1
    values), built with the module, then valtool --internal with the NIH-named demo model."""
    root, csv = demo
    monkeypatch.chdir(tmp_path)
    table = pd.read_csv(csv)
    assert run_main("eval", "--csv", csv, "--img-root", root, "--weights", trained / "best.pt", "--outdir", "internal",
                    "--bootstrap", 50, "--precision", "fp32", "--num-workers", 0) == 0
    rows, rng = [], np.random.default_rng(0)
    for k, r in table.iterrows():
        kind = "valid" if r["split"] == "test" else "train"
        values = {"Cardiomegaly": r["Cardiomegaly"], "Edema": r["Edema"], "Pleural Effusion": r["Effusion"]}
        values = {o: "" if pd.isna(v) else f"{float(v):.1f}" for o, v in values.items()}
        if kind == "train" and rng.random() < 0.2:
            values["Edema"] = "-1.0"
        rows.append((kind, int(k), 1, 1, "Frontal", r["view"], "Male", 50, values, root / r["image_path"]))
        if k % 5 == 0:
            rows.append((kind, int(k), 1, 2, "Lateral", "", "Male", 50, values, root / r["image_path"]))
    folder = tmp_path / "chexpert" / "CheXpert-v1.0-small"
    header = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(CHEXPERT_OBSERVATIONS)
    for kind in ("train", "valid"):
        lines = [header]
        for row in (r for r in rows if r[0] == kind):
            path = chexpert_path(row)
            cells = [row[8].get(o, "") for o in CHEXPERT_OBSERVATIONS]
            lines.append(",".join([path, row[6], str(row[7]), row[4], row[5], *cells]))
            (tmp_path / "chexpert" / path).parent.mkdir(parents=True, exist_ok=True)
            assert cv2.imwrite(str(tmp_path / "chexpert" / path), cv2.imread(str(row[9]), cv2.IMREAD_GRAYSCALE))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{kind}.csv").write_text("\n".join(lines) + "\n")
    assert main(["chexpert", "--root", "chexpert", "--out", "chexpert.csv"]) == 0
    assert run_main("valtool", "--csv", "chexpert.csv", "--weights", trained / "best.pt", "--outdir", "vt",
                    "--internal", "internal/metrics_test.json", "--bootstrap", 50, "--precision", "fp32",
                    "--num-workers", 0, "--mc-samples", 0, "--tta-samples", 0, "--corruptions", "jpeg",
                    "--no-discover") == 0
    summary = json.loads((tmp_path / "vt" / "summary.json").read_text())
    internal = json.loads((tmp_path / "internal" / "metrics_test.json").read_text())
    result = summary["internal_vs_external"]
    preds = pd.read_csv(tmp_path / "vt" / "eval" / "predictions_test.csv")
    assert len(preds) == int((table["split"] == "test").sum())  # valid.csv's frontal films
    for label in ["Cardiomegaly", "Edema", "Effusion"]:
        known = preds[label].notna()
        external = roc_auc_score(preds.loc[known, label], preds.loc[known, f"{label}_prob"])
        row = result["per_class"][label]["auroc"]
        assert row["external"] == pytest.approx(external)
        assert row["internal"] == pytest.approx(internal["per_class"][label]["auroc"])
        assert row["difference"] == pytest.approx(external - internal["per_class"][label]["auroc"])
        (el, eh), (il, ih) = row["external_ci95"], row["internal_ci95"]
        d = row["difference"]
        expected = [d - np.hypot(row["external"] - el, ih - row["internal"]),
                    d + np.hypot(eh - row["external"], row["internal"] - il)]
        assert row["difference_ci95"] == pytest.approx(expected)
        verdict = "kept" if expected[0] >= -0.05 else ("dropped" if expected[1] < 0 else "unclear")
        assert result["per_class"][label]["verdict"] == verdict and label in result[verdict]
    written = pd.read_csv(tmp_path / "vt" / "eval" / "internal_vs_external.csv")
    auroc = written[written["metric"] == "auroc"].set_index("label")
    assert auroc.loc["Effusion", "difference"] == pytest.approx(result["per_class"]["Effusion"]["auroc"]["difference"])
    report = (tmp_path / "vt" / "report.html").read_text()
    assert "Internal vs external" in report and "external - internal [95% CI]" in report
