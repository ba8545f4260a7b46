"""Public chest X-ray collections, as downloaded, to the project's input CSV:
``python -m tools.datasets chexpert|mimic|nih --root DIR --out CSV``.

Each builder keeps the rows whose image is on disk, says how many rows it dropped and why,
writes patient-disjoint splits (a patient found in two splits is moved to the later one of
train, val, test, with a count), and prints a count table per split and label. Label values are
written as 0, 1 or empty (unknown); -1 ("uncertain") becomes what ``--uncertain`` says
(``ignore``: empty). With ``--views frontal`` (the default) lateral films (``view`` LL) are left
out. Findings that ChestX-ray14 also has are written under ChestX-ray14's name
(``tools.table.SAME_FINDING``: CheXpert's ``Pleural Effusion`` is written ``Effusion``), so a
model trained on one collection lines up with another's CSV; the other observations keep their
own names. ``image_path`` is usable from the working directory (relative when the root is under
it, else absolute), so the suite reads the CSV with ``--img-root .``.

Facts of each layout and where they come from:

CheXpert (Irvin et al., "CheXpert: a large chest radiograph dataset with uncertainty labels and
expert comparison", AAAI 2019, arXiv:1901.07031; download page
https://stanfordmlgroup.github.io/competitions/chexpert/):
- ``train.csv`` and ``valid.csv`` sit in the dataset folder (``CheXpert-v1.0-small/`` or
  ``CheXpert-v1.0/``) beside its ``train/`` and ``valid/`` image folders; one row per image.
- Columns ``Path, Sex, Age, Frontal/Lateral, AP/PA``, then the 14 observations of
  :data:`CHEXPERT_OBSERVATIONS` (the paper's Table 1, spelled as in the header).
- ``Path`` is ``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``: the patient and
  study folders name the patient and the study.
- Observation values in the tables: 1.0 positive, 0.0 negative, -1.0 uncertain, blank not
  mentioned (the labeler's positive, negative and uncertain outputs, the paper's section on the
  labeler; the numbers are the tables' encoding). The uncertainty approaches U-Ignore, U-Zeros and
  U-Ones (the paper's "Uncertainty Approaches") are ``--uncertain ignore|zeros|ones``. The
  validation labels are a consensus of 3 radiologists (0 or 1).
- ``Frontal/Lateral`` is ``Frontal`` or ``Lateral``; ``AP/PA`` gives a frontal film's
  projection (AP or PA) and is blank for laterals.
- Here ``valid.csv`` becomes the ``test`` split; ``val`` is carved from ``train.csv`` by patient.

MIMIC-CXR-JPG (Johnson et al., "MIMIC-CXR-JPG, a large publicly available database of labeled
chest radiographs", arXiv:1901.07042, 2019; Johnson et al., "MIMIC-CXR, a de-identified
publicly available database of chest radiographs with free-text reports", Sci Data 2019;
the PhysioNet project page https://physionet.org/content/mimic-cxr-jpg/2.0.0/, whose data
description lists the tables, their columns and the folder layout):
- ``mimic-cxr-2.0.0-chexpert.csv(.gz)``: one row per study, ``subject_id, study_id`` and the same
  14 observations with the CheXpert labeler's values (1.0, 0.0, -1.0, blank).
- ``mimic-cxr-2.0.0-metadata.csv(.gz)``: one row per image, ``dicom_id, subject_id, study_id,
  PerformedProcedureStepDescription, ViewPosition, Rows, Columns, StudyDate, StudyTime, ...``;
  ``ViewPosition`` is the DICOM View Position (PA, AP, LATERAL, LL, ...; sometimes blank).
- ``mimic-cxr-2.0.0-split.csv(.gz)``: ``dicom_id, study_id, subject_id, split`` with ``train``,
  ``validate``, ``test``, the dataset's recommended patient-disjoint split (kept here,
  ``validate`` becoming ``val``).
- Images at ``files/p<first two digits of subject_id>/p<subject_id>/s<study_id>/<dicom_id>.jpg``.
- ``patient_id`` is ``subject_id``; the tables hold neither sex nor age.

ChestX-ray14 (Wang et al., CVPR 2017): ``tools.cxr14``, the builder of ``make_cxr14_csv.py``.

Research use only, not for clinical use.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tabulate import tabulate

from tools import cxr14
from tools.cli import Formatter, guarded, table_flags
from tools.errors import UserError
from tools.files import write_csv
from tools.table import (DEFAULT_LABELS, SAME_FINDING, find_name, lateral_rows, parse_label_column, uncertain_note,
                         uncertain_values)

PROG = "python -m tools.datasets"
COLLECTIONS = ("chexpert", "mimic", "nih")
SPLITS = ("train", "val", "test")  # a patient in several splits is moved to the last of them here

# The 14 observations of the CheXpert labeler, as CheXpert's and MIMIC-CXR-JPG's headers spell them.
CHEXPERT_OBSERVATIONS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices",
)
CHEXPERT_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
CHEXPERT_TABLES = {"train.csv": "train", "valid.csv": "test"}  # table -> split of its rows
CHEXPERT_SEX = {"Male": "M", "Female": "F"}

MIMIC_LABELS = "mimic-cxr-2.0.0-chexpert.csv"
MIMIC_METADATA = "mimic-cxr-2.0.0-metadata.csv"
MIMIC_SPLIT = "mimic-cxr-2.0.0-split.csv"
MIMIC_SPLITS = {"train": "train", "validate": "val", "test": "test"}
MIMIC_LATERAL = ("LATERAL", "LL", "RL", "XTABLE LATERAL")  # ViewPosition values of a lateral film


@dataclass
class BuildOptions:
    """What a builder writes: ``labels`` (None: the collection's default), the -1 policy
    (``uncertain``), the films kept (``views``), and for a carved validation split its seed and
    the fraction of training patients it takes."""
    labels: list | None = None
    uncertain: str = "ignore"
    views: str = "frontal"
    seed: int = 1337
    val_frac: float = 0.1


# ====== labels ======

def written_name(observation: str) -> str:
    """The column name an observation is written under: ChestX-ray14's where it has the finding."""
    return next((nih for nih, other in SAME_FINDING.items() if other == observation), observation)


def label_columns(requested, observations, collection: str) -> list[tuple[str, str]]:
    """(column in the collection's table, column written) for each ``requested`` label (any
    collection's name), or for every observation when none is requested."""
    if not requested:
        return [(obs, written_name(obs)) for obs in observations]
    pairs = []
    for label in requested:
        source = find_name(label, observations)
        if source is None:
            written = ", ".join(f"{o} (written {written_name(o)})" if written_name(o) != o else o for o in observations)
            raise UserError(f"--labels {label}: not a {collection} label; {collection} has {written}")
        if source in [s for s, _ in pairs]:
            raise UserError(f"--labels {label}: {source} is already asked for; give each finding once")
        pairs.append((source, written_name(source)))
    return pairs


def parse_labels(raw: pd.DataFrame, path, pairs, uncertain: str) -> tuple[pd.DataFrame, pd.Series]:
    """The label columns ``pairs`` of ``raw`` (read from file ``path``) under their written names,
    as float with -1 read as ``uncertain`` says, and the number of -1 values in each row. A bad
    value names ``path``, the table's own column name and the row in that file."""
    out, count = pd.DataFrame(index=raw.index), pd.Series(0, index=raw.index)
    for source, written in pairs:
        count += uncertain_values(raw[source])
        out[written] = parse_label_column(raw[source], path, source, uncertain, flag="")
    return out, count


# ====== reading the tables ======

def find_table(root: Path, name: str) -> Path | None:
    """``name`` (or ``name``.gz) in ``root`` or in one of its folders (sorted); None if absent."""
    for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def read_table_file(path: Path, needed, text_columns=()) -> pd.DataFrame:
    """``path`` (plain or gzipped CSV) with the columns ``needed``; ``text_columns`` kept as text.
    A missing column is an error naming the file and the columns there are."""
    try:
        table = pd.read_csv(path, dtype={c: str for c in text_columns}, keep_default_na=True)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError) as exc:
        raise UserError(f"{path}: not a readable CSV ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                        ) from None
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise UserError(f"{path}: column(s) {', '.join(missing)} not found; columns are: {', '.join(table.columns)}")
    return table


def check_root(root) -> Path:
    """``--root`` as a Path; a folder that does not exist is an error."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--root {root}: no such folder; pass the folder the collection was downloaded to")
    return root


def from_here(path: Path) -> str:
    """``path`` as the CSV writes it: relative to the working directory when under it, else absolute."""
    return cxr14.walk_start(str(path))


# ====== CheXpert ======

def chexpert_image(table_dir: str, path: str) -> str:
    """The file of a ``Path`` value: from its ``train``/``valid`` folder on, under the folder that
    holds the table (the value's first part names that folder, which the user may have renamed)."""
    parts = Path(path).parts
    start = next((i for i, p in enumerate(parts) if p in ("train", "valid")), 0)
    return os.path.join(table_dir, *parts[start:])


def chexpert_view(frontal_lateral: pd.Series, ap_pa: pd.Series) -> pd.Series:
    """LL for a lateral film, else the frontal projection (AP, PA; empty when not given)."""
    projection = ap_pa.fillna("").astype(str).str.strip().str.upper()
    lateral = frontal_lateral.fillna("").astype(str).str.strip().str.lower() == "lateral"
    return projection.where(~lateral, "LL")


def chexpert_table(root: Path, opts: BuildOptions) -> tuple[pd.DataFrame, list]:
    """Rows of train.csv (split train/val by patient) and valid.csv (split test) with their
    labels parsed; returns (table, label pairs of :func:`label_columns`)."""
    found = {name: find_table(root, name) for name in CHEXPERT_TABLES}
    if not any(found.values()):
        raise UserError(f"--root {root}: neither train.csv nor valid.csv found (looked in it and its folders); "
                        "pass the CheXpert folder that holds them beside train/ and valid/")
    pairs = label_columns(opts.labels, CHEXPERT_OBSERVATIONS, "CheXpert")
    print(f"tables: {', '.join(str(p) for p in found.values() if p is not None)}")
    parts = []
    for name, path in found.items():
        if path is None:
            print(f"tables: no {name} under {root}; its split ({CHEXPERT_TABLES[name]}) stays empty")
            continue
        raw = read_table_file(path, [*CHEXPERT_COLUMNS, *(s for s, _ in pairs)], text_columns=["Path"])
        labels, count = parse_labels(raw, path, pairs, opts.uncertain)
        ids = raw["Path"].astype(str).str.extract(r"(patient\d+)/(study\d+)/")
        if ids[0].isna().any():
            row = int(np.flatnonzero(ids[0].isna().to_numpy())[0])
            raise UserError(f"{path}: column Path, row {row + 2}: {raw['Path'].iloc[row]!r} names no "
                            "patientNNNNN/studyN/ folders")
        part = pd.DataFrame({
            "image_path": [chexpert_image(from_here(path.parent), p) for p in raw["Path"].astype(str)],
            "split": CHEXPERT_TABLES[name],
            "patient_id": ids[0], "study_id": ids[0] + "/" + ids[1],
            "view": chexpert_view(raw["Frontal/Lateral"], raw["AP/PA"]),
            "sex": raw["Sex"].map(CHEXPERT_SEX), "age": pd.to_numeric(raw["Age"], errors="coerce").astype("Int64"),
            "_uncertain": count,
        })
        parts.append(pd.concat([part, labels], axis=1))
    table = pd.concat(parts, ignore_index=True)
    train = table["split"] == "train"
    if train.any():
        table.loc[train, "split"] = cxr14.split_patients(
            table.loc[train, "patient_id"], {"train": 1.0 - opts.val_frac, "val": opts.val_frac}, opts.seed)
        print(f"split: valid.csv is test; val = {opts.val_frac:g} of train.csv's patients, seed {opts.seed}")
    return table, pairs


# ====== MIMIC-CXR-JPG ======

def mimic_tables(root: Path) -> dict[str, Path]:
    """The three tables under ``root`` (plain or gzipped); a missing one is an error."""
    found = {name: find_table(root, name) for name in (MIMIC_LABELS, MIMIC_METADATA, MIMIC_SPLIT)}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise UserError(f"--root {root}: {', '.join(missing)} (or .gz) not found in it or its folders; MIMIC-CXR-JPG "
                        f"ships {MIMIC_LABELS}.gz, {MIMIC_METADATA}.gz and {MIMIC_SPLIT}.gz beside files/")
    return found


def mimic_view(position: pd.Series) -> pd.Series:
    """ViewPosition as the project writes views: LL for a lateral film, else as given (upper case)."""
    view = position.fillna("").astype(str).str.strip().str.upper()
    return view.where(~view.isin(MIMIC_LATERAL), "LL")


def mimic_table(root: Path, opts: BuildOptions) -> tuple[pd.DataFrame, list]:
    """One row per image of the metadata table with its study's labels and its official split;
    images without a label row or a split are dropped with a count. Returns (table, label pairs
    of :func:`label_columns`)."""
    paths = mimic_tables(root)
    print(f"tables: {', '.join(map(str, paths.values()))}")
    pairs = label_columns(opts.labels, CHEXPERT_OBSERVATIONS, "MIMIC-CXR-JPG")
    ids = ["subject_id", "study_id"]
    raw = read_table_file(paths[MIMIC_LABELS], [*ids, *(s for s, _ in pairs)], text_columns=ids)
    twice = raw.duplicated(ids, keep=False)
    if twice.any():
        rows = np.flatnonzero(twice.to_numpy())[:2] + 2
        raise UserError(f"{paths[MIMIC_LABELS]}: rows {rows[0]} and {rows[1]}: one study (subject_id, study_id) "
                        "listed twice; each study has one row of labels")
    labels, count = parse_labels(raw, paths[MIMIC_LABELS], pairs, opts.uncertain)
    studies = pd.concat([raw[ids], labels], axis=1).assign(_uncertain=count)
    meta = read_table_file(paths[MIMIC_METADATA], ["dicom_id", *ids, "ViewPosition"],
                           text_columns=["dicom_id", *ids])
    split = read_table_file(paths[MIMIC_SPLIT], ["dicom_id", "split"], text_columns=["dicom_id"])
    names = split["split"].astype(str).str.strip()
    bad = ~names.isin(list(MIMIC_SPLITS))
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise UserError(f"{paths[MIMIC_SPLIT]}: column split, row {row + 2}: value {split['split'].iloc[row]!r} is "
                        f"not one of {', '.join(MIMIC_SPLITS)}")
    split_of = pd.Series(names.map(MIMIC_SPLITS).to_numpy(), index=split["dicom_id"].astype(str))
    table = meta.merge(studies, on=ids, how="left", indicator=True)
    unlabelled = (table["_merge"] != "both").to_numpy()
    table["split"] = table["dicom_id"].map(split_of[~split_of.index.duplicated()])
    unsplit = table["split"].isna().to_numpy() & ~unlabelled
    if unlabelled.any() or unsplit.any():
        print(f"tables: dropped {int(unlabelled.sum())} image(s) whose study has no row in {paths[MIMIC_LABELS].name} "
              f"and {int(unsplit.sum())} image(s) not listed in {paths[MIMIC_SPLIT].name}")
    table = table[~unlabelled & ~unsplit].reset_index(drop=True)
    files = from_here(root / "files")
    subject, study = table["subject_id"].astype(str).str.strip(), table["study_id"].astype(str).str.strip()
    out = pd.DataFrame({
        "image_path": [os.path.join(files, f"p{s[:2]}", f"p{s}", f"s{t}", f"{d}.jpg")
                       for s, t, d in zip(subject, study, table["dicom_id"].astype(str).str.strip())],
        "split": table["split"], "patient_id": subject, "study_id": study, "dicom_id": table["dicom_id"],
        "view": mimic_view(table["ViewPosition"]),
        **{c.lower(): table[c] for c in ("Rows", "Columns") if c in table.columns},
        **({"study_date": table["StudyDate"]} if "StudyDate" in table.columns else {}),
        "_uncertain": table["_uncertain"],
    })
    print(f"split: the official {paths[MIMIC_SPLIT].name} (validate = val)")
    return pd.concat([out, table[[w for _, w in pairs]]], axis=1), pairs


# ====== shared steps ======

def patient_disjoint(table: pd.DataFrame) -> pd.DataFrame:
    """Every patient in one split: one found in several goes, with all its rows, to the last of
    train, val, test it appears in (so no test patient is ever trained on)."""
    rank = table["split"].map({s: i for i, s in enumerate(SPLITS)})
    last = rank.groupby(table["patient_id"]).transform("max")
    moved = rank != last
    if moved.any():
        patients = table.loc[moved, "patient_id"].nunique()
        print(f"split: {patients} patient(s) were in several splits; {int(moved.sum())} of their rows moved to the "
              "later split (train < val < test) so that splits are patient-disjoint")
        table = table.assign(split=last.map(dict(enumerate(SPLITS))))
    return table


def keep_present(table: pd.DataFrame, opts: BuildOptions, root: Path) -> pd.DataFrame:
    """Lateral films out (``--views frontal``), then rows whose image file is missing, each with
    a printed count."""
    if opts.views == "frontal":
        lateral = lateral_rows(table)
        print(f"views: dropped {int(lateral.sum())} lateral film(s) (view LL) of {len(table)} rows "
              "(--views frontal; --views all keeps them)")
        table = table[~lateral]
    exists = np.array([os.path.isfile(p) for p in table["image_path"]], bool)
    if not exists.any():
        raise UserError(f"--root {root}: none of the {len(table)} images the tables list was found "
                        f"(first looked for: {table['image_path'].iloc[0] if len(table) else 'none'}); "
                        "download the images into that folder")
    missing = table.loc[~exists, "image_path"]
    first = f" (first: {missing.iloc[0]})" if len(missing) else ""
    print(f"images: kept {int(exists.sum())} rows, dropped {len(missing)} whose image was not found{first}")
    return table[exists].reset_index(drop=True)


def count_table(table: pd.DataFrame, labels) -> str:
    """Images and patients per split, then per label and split ``positives/known`` (unknown:
    empty, or -1 under --uncertain ignore)."""
    order = [s for s in SPLITS if (table["split"] == s).any()]
    parts = [table[table["split"] == s] for s in order] + [table]
    rows = [["images", *[len(p) for p in parts]], ["patients", *[p["patient_id"].nunique() for p in parts]]]
    for label in labels:
        rows.append([label, *[f"{int(np.nansum(p[label]))}/{int(p[label].notna().sum())}" for p in parts]])
    return tabulate(rows, headers=["positives/known", *order, "all"], tablefmt="github")


def build(collection: str, root, opts: BuildOptions) -> tuple[pd.DataFrame, list]:
    """The project CSV of ``collection`` under ``root`` and its label columns."""
    root = check_root(root)
    if not 0.0 <= opts.val_frac < 1.0:
        raise UserError(f"--val-frac {opts.val_frac}: must be at least 0 and below 1")
    if collection == "nih":
        labels = [find_name(label, cxr14.FINDINGS) or label for label in (opts.labels or DEFAULT_LABELS)]
        table = cxr14.build_table(str(root), labels, seed=opts.seed, val_frac=opts.val_frac, flag="--root")
        return table, labels
    table, pairs = (chexpert_table if collection == "chexpert" else mimic_table)(root, opts)
    table = keep_present(patient_disjoint(table), opts, root)
    uncertain = int(table.pop("_uncertain").sum())
    if uncertain:
        print(f"labels: {uncertain_note(uncertain, opts.uncertain)}")
    labels = [w for _, w in pairs]
    metadata = [c for c in table.columns if c not in ("image_path", "split", *labels)]
    return table[["image_path", "split", *labels, *metadata]], labels


# ====== command line ======

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="A public chest X-ray collection (as downloaded) -> the project's input CSV, with "
                               "patient-disjoint splits.", formatter_class=Formatter)
    parser.add_argument("collection", choices=COLLECTIONS,
                        help="chexpert: train.csv + valid.csv; mimic: MIMIC-CXR-JPG's chexpert, metadata and split "
                             "tables; nih: ChestX-ray14 (as make_cxr14_csv.py)")
    data = parser.add_argument_group("data")
    data.add_argument("--root", required=True, help="folder the collection was downloaded to")
    data.add_argument("--labels", nargs="+", default=None,
                      help="labels to write, by any collection's name (default: every observation for chexpert and "
                           f"mimic; {' '.join(DEFAULT_LABELS)} for nih)")
    table_flags(data)
    split = parser.add_argument_group("split")
    split.add_argument("--seed", type=int, default=1337, help="seed of the patient shuffle (chexpert, nih)")
    split.add_argument("--val-frac", type=float, default=0.1,
                       help="fraction of training patients set aside as val (chexpert, nih)")
    output = parser.add_argument_group("output")
    output.add_argument("--out", required=True, help="CSV to write")
    return parser


def run(args) -> None:
    opts = BuildOptions(labels=args.labels, uncertain=args.uncertain, views=args.views, seed=args.seed,
                        val_frac=args.val_frac)
    table, labels = build(args.collection, args.root, opts)
    print(count_table(table, labels))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_csv(args.out, table)
    print(f"wrote {args.out} ({len(table)} rows)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return guarded(PROG, run, args)


if __name__ == "__main__":
    sys.exit(main())
