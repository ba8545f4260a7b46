"""NIH ChestX-ray14, as downloaded, to the project's input CSV: the builder behind
``make_cxr14_csv.py`` and ``python -m tools.datasets nih``.

The dataset (Wang et al., CVPR 2017; https://nihcc.app.box.com/v/ChestXray-NIHCC, also mirrored
on the Hugging Face hub) ships a table `Data_Entry_2017*.csv`, the official `train_val_list.txt` /
`test_list.txt`, and the PNG images spread over `images_0XX/images/` folders. The builder finds the
table, the test list (train_val is every other image) and the images anywhere under the root folder
(`--hf-root` of the script, `--root` of tools.datasets), keeps the rows whose image is on disk, assigns a patient-disjoint train/val/test split and writes
one row per image:

    image_path, split, <one 0/1 column per --labels>, view, sex, age, patient_id, follow_up,
    num_findings, num_findings_bin

Research use only, not for clinical use.
"""

from __future__ import annotations

import fnmatch
import os
from typing import NamedTuple

import numpy as np
import pandas as pd
from tabulate import tabulate

from tools.errors import UserError

# The 14 findings of ChestX-ray14, spelled as in the `Finding Labels` column.
FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis",
    "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax",
)
NO_FINDING = "No Finding"

TABLE_PATTERN = "Data_Entry_2017*.csv"
TEST_LIST = "test_list.txt"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")

# Table column -> output column, for the columns the builder needs.
COLUMNS = {
    "Image Index": "image_name",
    "Finding Labels": "finding_labels",
    "Follow-up #": "follow_up",
    "Patient ID": "patient_id",
    "Patient Age": "age",
    "Patient Gender": "sex",
    "View Position": "view",
}
METADATA_COLUMNS = ("view", "sex", "age", "patient_id", "follow_up")

# Used when there is no official test list: fractions of patients per split.
DEFAULT_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}


class DatasetFiles(NamedTuple):
    """What one walk over the dataset root found.

    `images` maps an image file name to its path (relative to the working directory when the
    root is under it, else absolute); `tables` and `test_lists` are sorted paths.
    """

    images: dict[str, str]
    tables: list[str]
    test_lists: list[str]


# ====== finding the files ======


def walk_start(root: str) -> str:
    """The spelling of `root` to walk from: relative to the working directory when `root` is under
    it, else absolute. Paths built by joining onto it are then usable from there as they are.
    """
    cwd = os.getcwd()
    root_abs = os.path.abspath(root)
    if os.path.commonpath([cwd, root_abs]) == cwd:
        return os.path.relpath(root_abs, cwd)
    return root_abs


def scan_dataset(root: str, flag: str = "--hf-root") -> DatasetFiles:
    """Index the files under `root` in one recursive walk (symlinked folders followed once each).

    An image name found twice keeps the first path in sorted walk order, so reruns agree. Errors
    name `root` as the flag `flag` that gave it.
    """
    if not os.path.isdir(root):
        raise UserError(f"{flag} {root}: no such folder; pass the folder the dataset was downloaded to")
    images: dict[str, str] = {}
    tables, test_lists = [], []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(walk_start(root), followlinks=True):
        # Following links lets a symlinked image folder count; remembering real paths stops cycles.
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames.sort()
        prefix = os.path.normpath(dirpath)
        prefix = "" if prefix == os.curdir else prefix
        for name in sorted(filenames):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                images.setdefault(name, os.path.join(prefix, name))
            elif fnmatch.fnmatch(name, TABLE_PATTERN):
                tables.append(os.path.join(prefix, name))
            elif name == TEST_LIST:
                test_lists.append(os.path.join(prefix, name))
    return DatasetFiles(images, sorted(tables), sorted(test_lists))


def choose_table(tables: list[str], root: str, flag: str = "--hf-root") -> str:
    """The table to use: the last by file name, so `Data_Entry_2017_v2020.csv` wins over the 2017 one."""
    if not tables:
        raise UserError(
            f"{flag} {root}: no table matching {TABLE_PATTERN} found (searched recursively); "
            "download Data_Entry_2017_v2020.csv into that folder"
        )
    return max(tables, key=lambda path: (os.path.basename(path), path))


# ====== reading the table ======


def read_data_entry(path: str) -> pd.DataFrame:
    """Read a Data_Entry table into the columns of `COLUMNS` (renamed to their output names).

    The header names `OriginalImage[Width,Height]` with an unquoted comma and some copies end
    every row (and sometimes the header) with an extra comma; `index_col=False` stops pandas from
    taking the first column as the index when rows are one field longer than the header.
    """
    table = pd.read_csv(
        path, index_col=False, skipinitialspace=True,
        dtype={"Image Index": str, "Finding Labels": str, "Patient Gender": str, "View Position": str},
    )
    table.columns = [str(column).strip() for column in table.columns]
    missing = [column for column in COLUMNS if column not in table.columns]
    if missing:
        raise UserError(
            f"{path}: missing column(s) {', '.join(missing)}; "
            f"a Data_Entry table needs {', '.join(COLUMNS)}"
        )
    table = table[list(COLUMNS)].rename(columns=COLUMNS)
    table["image_name"] = table["image_name"].str.strip()
    table["finding_labels"] = table["finding_labels"].fillna("").str.strip()
    table["age"] = parse_age(table["age"])
    return table.reset_index(drop=True)


def parse_age(age: pd.Series) -> pd.Series:
    """Age in years as a nullable integer; accepts plain numbers and the `058Y` spelling of early copies."""
    if not pd.api.types.is_numeric_dtype(age):
        age = pd.to_numeric(age.astype(str).str.extract(r"(\d+)", expand=False), errors="coerce")
    return age.astype("Int64")


def read_name_list(path: str) -> set[str]:
    """The image names listed one per line in an official split file."""
    with open(path, encoding="utf-8") as handle:
        return {line.strip() for line in handle.read().splitlines() if line.strip()}


# ====== labels ======


def check_labels(labels: list[str]) -> list[str]:
    """Return `labels` unchanged if each is one of the 14 findings and none repeats."""
    unknown = [label for label in labels if label not in FINDINGS]
    if unknown:
        raise UserError(
            f"--labels: unknown label(s) {', '.join(unknown)}; valid ChestX-ray14 labels are "
            f"{', '.join(FINDINGS)}"
        )
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise UserError(f"--labels: {', '.join(repeated)} given more than once; list each label once")
    return list(labels)


def finding_matrix(finding_labels: pd.Series) -> pd.DataFrame:
    """One 0/1 int column per finding in `FINDINGS`: 1 where the `|`-joined list names it.

    `No Finding` and any name outside the 14 set no column.
    """
    dummies = finding_labels.str.get_dummies(sep="|")
    return dummies.reindex(columns=list(FINDINGS), fill_value=0).astype(int)


def unknown_findings(finding_labels: pd.Series) -> list[str]:
    """Names in `Finding Labels` that are neither one of the 14 findings nor `No Finding`."""
    names = finding_labels.str.split("|").explode().dropna().str.strip()
    return sorted(set(names.unique()) - set(FINDINGS) - {NO_FINDING, ""})


def findings_bin(num_findings: pd.Series) -> pd.Series:
    """Bin a count of findings as "0", "1" or "2+"."""
    return pd.Series(
        np.select([num_findings <= 0, num_findings == 1], ["0", "1"], default="2+"),
        index=num_findings.index,
    )


# ====== splitting ======


def split_patients(patient_ids: pd.Series, fractions: dict[str, float], seed: int) -> pd.Series:
    """Assign each row the split of its patient.

    The distinct patients (sorted) are shuffled with `numpy.random.default_rng(seed)` and cut in
    the order of `fractions` at the rounded cumulative fractions of the patient count, so every
    patient lands in exactly one split and the same table and seed give the same split.
    """
    patients = np.sort(patient_ids.unique())
    shuffled = np.random.default_rng(seed).permutation(patients)
    bounds = np.round(np.cumsum(list(fractions.values())) * len(patients)).astype(int)
    bounds[-1] = len(patients)
    starts = np.concatenate([[0], bounds[:-1]])
    names = np.empty(len(patients), dtype=object)
    for name, start, stop in zip(fractions, starts, bounds):
        names[start:stop] = name
    return patient_ids.map(pd.Series(names, index=shuffled)).astype(str)


def assign_splits(
    table: pd.DataFrame, test_names: set[str] | None, val_frac: float, seed: int
) -> pd.Series:
    """The split (`train`/`val`/`test`) of every row of `table`.

    With an official test list its images are `test` and validation is `val_frac` of the
    remaining patients; without one, patients are split 70/10/20 (`DEFAULT_FRACTIONS`).
    """
    if test_names is None:
        return split_patients(table["patient_id"], DEFAULT_FRACTIONS, seed)
    is_test = table["image_name"].isin(test_names)
    split = pd.Series("test", index=table.index, dtype=object)
    pool = table.loc[~is_test, "patient_id"]
    split[~is_test] = split_patients(pool, {"train": 1.0 - val_frac, "val": val_frac}, seed)
    return split.astype(str)


def patients_in_several_splits(table: pd.DataFrame) -> int:
    """How many patients have rows in more than one split."""
    return int((table.groupby("patient_id")["split"].nunique() > 1).sum())


# ====== building the output ======


def build_table(
    root: str,
    labels: list[str],
    seed: int = 1337,
    val_frac: float = 0.1,
    flag: str = "--hf-root",
) -> pd.DataFrame:
    """The project CSV for the dataset under `root` (given by the flag `flag`), one row per image
    found on disk."""
    labels = check_labels(labels)
    if not 0.0 <= val_frac < 1.0:
        raise UserError(f"--val-frac {val_frac}: must be at least 0 and below 1")
    files = scan_dataset(root, flag)
    table_path = choose_table(files.tables, root, flag)
    others = [path for path in files.tables if path != table_path]
    print(f"table: {table_path}" + (f" (also found, not used: {', '.join(others)})" if others else ""))
    table = read_data_entry(table_path)

    unknown = unknown_findings(table["finding_labels"])
    if unknown:
        print(f"warning: {table_path}: findings outside the 14 ignored: {', '.join(unknown)}")

    # Split the whole table before dropping missing images, so a partial download keeps every
    # present image in the split it would have had with the full dataset.
    test_names = read_name_list(files.test_lists[0]) if files.test_lists else None
    if test_names is None:
        print(f"split: no {TEST_LIST} under {root}; patient-grouped 70/10/20 split, seed {seed}")
    else:
        print(f"split: official {files.test_lists[0]}; val = {val_frac:g} of train_val patients, seed {seed}")
    table["split"] = assign_splits(table, test_names, val_frac, seed)
    leaked = patients_in_several_splits(table)
    if leaked:
        print(f"warning: {leaked} patient(s) have images both in {TEST_LIST} and outside it")

    table["image_path"] = table["image_name"].map(files.images)
    found = table["image_path"].notna()
    if not found.any():
        raise UserError(
            f"{flag} {root}: none of the {len(table)} images listed in {table_path} was found "
            f"(searched recursively for {', '.join(IMAGE_EXTENSIONS)} files); extract the "
            "images_0XX archives under that folder"
        )
    print(f"images: kept {int(found.sum())} rows, dropped {int((~found).sum())} rows whose image "
        f"was not found under {root}")
    table = table[found].reset_index(drop=True)

    findings = finding_matrix(table["finding_labels"])
    out = table[["image_path", "split"]].copy()
    for label in labels:
        out[label] = findings[label]
    for column in METADATA_COLUMNS:
        out[column] = table[column]
    out["num_findings"] = findings.sum(axis=1)
    out["num_findings_bin"] = findings_bin(out["num_findings"])
    return out


def count_table(table: pd.DataFrame, labels: list[str]) -> str:
    """A text table of images, patients and positives per label (with prevalence) for each split."""
    order = [name for name in ("train", "val", "test") if name in set(table["split"])]
    rows = []
    for name, part in [(name, table[table["split"] == name]) for name in order] + [("all", table)]:
        row = [name, len(part), part["patient_id"].nunique()]
        for label in labels:
            positives = int(part[label].sum())
            row.append(f"{positives} ({100.0 * positives / max(len(part), 1):.1f}%)")
        rows.append(row)
    return tabulate(rows, headers=["split", "images", "patients", *labels], tablefmt="github")
