"""The input table: read and validate an input CSV, its splits and label prevalence, the
patient-grouped split, and the default labels.

Input CSV contract (SPEC "Input CSV"): ``image_path`` (relative to ``--img-root`` or absolute), one
0/1 column per label (empty/NaN = unknown, masked from loss and metrics), optional ``split``
(train/val/test), optional ``patient_id``; every other column is metadata.

Other collections (README "Other collections"): a label value of -1 is "uncertain", as the CheXpert
labeler writes it (Irvin et al. 2019); ``--uncertain`` reads it as unknown (U-Ignore, the
default), 0 (U-Zeros) or 1 (U-Ones). With ``--views frontal`` (the default) rows whose ``view``
is lateral (``LL``) are left out. A label may be named as any collection names it
(:data:`SAME_FINDING`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tools.errors import UserError

log = logging.getLogger("cxr")

DEFAULT_LABELS = ["Cardiomegaly", "Edema", "Effusion"]
KNOWN_SPLITS = ("train", "val", "calib", "test")
NO_SPLIT = "(none)"

# What an uncertain label (-1) becomes under each --uncertain policy (Irvin et al. 2019, section
# "Uncertainty approaches": U-Ignore, U-Zeros, U-Ones).
UNCERTAIN_AS = {"ignore": np.nan, "zeros": 0.0, "ones": 1.0}
UNCERTAIN_TEXT = ("-1", "-1.0")
# Lateral films: the project's view value for them is LL; MIMIC-CXR's ViewPosition says LATERAL.
LATERAL_VIEWS = ("LL", "LATERAL")

# One finding, two names. ChestX-ray14 (Wang et al. 2017) calls it by the key, CheXpert and
# MIMIC-CXR-JPG, whose labels come from the same CheXpert labeler (Irvin et al. 2019; Johnson et al.
# 2019), by the value. Only exact equivalents are listed: CheXpert's Enlarged Cardiomediastinum is
# not Cardiomegaly, Lung Lesion is wider than Mass or Nodule, Lung Opacity wider than Infiltration.
SAME_FINDING = {"Effusion": "Pleural Effusion"}


@dataclass(frozen=True)
class ReadRules:
    """How an input table is read: what a -1 label value becomes (``--uncertain``: ignore, zeros,
    ones) and which films are kept (``--views``: frontal leaves out lateral ones, all keeps them)."""
    uncertain: str = "ignore"
    views: str = "frontal"


# ====== label names across collections ======

def other_names(label) -> list[str]:
    """The names other collections give the finding ``label`` (none when it has only one)."""
    label = str(label)
    return [b if a == label else a for a, b in SAME_FINDING.items() if label in (a, b)]


def find_name(label, names) -> str | None:
    """The entry of ``names`` that is the finding ``label``: ``label`` itself, else one of its
    other names; None when ``names`` has neither."""
    names = [str(n) for n in names]
    if str(label) in names:
        return str(label)
    return next((n for n in other_names(label) if n in names), None)


# ====== the table ======

def read_table(csv, labels, require_labels: bool = True, rules: ReadRules = ReadRules()) -> pd.DataFrame:
    """Read ``csv`` and validate it; return it with label columns as float (NaN = unknown), under
    ``rules`` (:func:`read_kept`)."""
    return read_kept(csv, labels, require_labels, rules)[0]


def read_kept(csv, labels, require_labels: bool = True, rules: ReadRules = ReadRules()) -> tuple[pd.DataFrame, list]:
    """Read ``csv`` and validate it; return (the table with label columns as float, NaN =
    unknown; the image paths of the rows ``rules.views`` left out). Under ``rules``: -1 values
    read as ``rules.uncertain`` says, lateral films left out with ``rules.views`` frontal (each
    said in one line when it happens).

    A label named by another collection's name is read from that column, renamed to the name
    asked for. Raises UserError (one line naming file, column, row and value) for: a missing or
    empty file, a missing ``image_path`` or label column, a label value other than 0/1/-1/empty,
    duplicated image paths, a table of lateral films only. Rows are numbered as in a spreadsheet:
    the header is row 1.
    """
    df = read_csv_file(csv)
    keep = ~lateral_rows(df) if rules.views == "frontal" else np.ones(len(df), bool)
    left_out = df.loc[~keep, "image_path"].astype(str).tolist()
    if require_labels:
        df = check_label_columns(df, csv, labels)
        uncertain = 0
        for label in labels:
            uncertain += int((uncertain_values(df[label]) & keep).sum())
            df[label] = parse_label_column(df[label], csv, label, rules.uncertain)
        if uncertain:
            log.info("--csv %s: %s", csv, uncertain_note(uncertain, rules.uncertain))
    check_image_paths(df, csv)
    if not keep.all():
        if not keep.any():
            raise UserError(f"--csv {csv}: all {len(df)} rows are lateral films (view LL) and --views frontal leaves "
                            "them out; pass --views all to analyse them")
        log.info("--csv %s: %d lateral film(s) (view LL) of %d rows left out (--views frontal; --views all keeps them)",
                 csv, int((~keep).sum()), len(df))
        df = df[keep].reset_index(drop=True)
    return df, left_out


def lateral_rows(df: pd.DataFrame) -> np.ndarray:
    """True for the rows whose ``view`` is lateral (LL, or LATERAL as MIMIC-CXR writes it); none
    without a ``view`` column."""
    if "view" not in df.columns:
        return np.zeros(len(df), bool)
    return df["view"].astype("string").str.strip().str.upper().isin(LATERAL_VIEWS).fillna(False).to_numpy(bool)


def uncertain_values(column: pd.Series) -> np.ndarray:
    """True where a label column holds -1 (uncertain)."""
    return column.astype(str).str.strip().isin(UNCERTAIN_TEXT).to_numpy(bool)


def uncertain_note(count: int, policy: str) -> str:
    """The line saying what ``count`` uncertain (-1) values became under ``policy``."""
    became = {"ignore": "unknown, masked from loss and metrics", "zeros": "0", "ones": "1"}[policy]
    return f"{count} uncertain (-1) label value(s) read as {became} (--uncertain {policy}; choices: ignore, zeros, ones)"


def read_csv_file(csv) -> pd.DataFrame:
    """The CSV as stored, checked only for being a table with an ``image_path`` column and rows.

    The steps of :func:`read_table` are separate functions so that the data checks can run each
    one, report what fails and go on with the rest."""
    df = read_csv_at(csv, "--csv", "pass the path of the input CSV",
                     "; it needs a header with image_path and label columns", image_path=True)
    if len(df) == 0:
        raise UserError(f"--csv {csv}: the table has a header but no rows")
    return df


def read_csv_at(path, flag: str, where: str, empty: str = "", image_path: bool = False) -> pd.DataFrame:
    """``path`` read as a CSV (``image_path`` as text); a missing, empty or unreadable file (and,
    with ``image_path``, a table without that column) is a one-line error naming ``flag`` and the
    file. ``where`` says what to pass instead of a missing file; ``empty`` ends the empty-file line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: file not found; {where}")
    try:
        df = pd.read_csv(path, dtype={"image_path": str}, keep_default_na=True)
    except pd.errors.EmptyDataError:
        raise UserError(f"{flag} {path}: the file is empty{empty}") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise UserError(f"{flag} {path}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    if image_path and "image_path" not in df.columns:
        raise UserError(f"{flag} {path}: no image_path column; columns are: {', '.join(map(str, df.columns))}")
    return df


def pick_labels(available, requested, columns, lacking: str, holder: str, none_in_data: str) -> list:
    """The analysed labels: ``requested`` (``--labels``; each must be ``available``, under its own
    name or another collection's, and comes back as ``available`` names it; else the error
    ``--labels <missing>: <lacking>; --labels says ..., <holder> <available>``), or else the
    ``available`` ones that ``columns`` has under either name (all of them when ``columns`` is
    None; none is the error ``none_in_data``)."""
    if requested:
        found = [find_name(label, available) for label in requested]
        missing = [label for label, name in zip(requested, found) if name is None]
        if missing:
            raise UserError(f"--labels {' '.join(missing)}: {lacking}; --labels says {' '.join(requested)}, "
                            f"{holder} {' '.join(available) or 'none'}")
        twice = sorted({name for name in found if found.count(name) > 1})
        if twice:
            names = [label for label, name in zip(requested, found) if name == twice[0]]
            raise UserError(f"--labels {' and '.join(names)}: one finding ({twice[0]}) named twice; give it once")
        for label, name in zip(requested, found):
            if name != label:
                log.info("--labels %s is %s (the same finding in another collection)", label, name)
        return found
    if columns is None:
        return list(available)
    chosen = [label for label in available if find_name(label, columns) is not None]
    if not chosen:
        raise UserError(none_in_data)
    return chosen


def header(csv) -> list[str]:
    """The column names of ``csv`` (none when it cannot be read: :func:`read_table` then says why)."""
    try:
        return [str(c) for c in pd.read_csv(csv, nrows=0).columns]
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError):
        return []


def check_label_columns(df: pd.DataFrame, csv, labels) -> pd.DataFrame:
    """``df`` with a column for every label: a column holding the finding under another
    collection's name (:data:`SAME_FINDING`) is renamed to the label's name. A label without a
    column is an error that lists the columns there are; two labels naming one finding are one too."""
    found = {label: find_name(label, df.columns) for label in labels}
    missing = [label for label, column in found.items() if column is None]
    if missing:
        also = [f"{label} (or {' / '.join(other_names(label))})" for label in missing if other_names(label)]
        raise UserError(
            f"--csv {csv}: label column(s) {', '.join(missing)} not found (check --labels"
            + (f"; also looked for {', '.join(also)}" if also else "") + f"); "
            f"columns are: {', '.join(map(str, df.columns))}"
        )
    columns = list(found.values())
    twice = sorted({c for c in columns if columns.count(c) > 1})
    if twice:
        names = [label for label, column in found.items() if column == twice[0]]
        raise UserError(f"--labels {' and '.join(names)}: one finding (column {twice[0]} of --csv {csv}) "
                        "named twice; give it once")
    renamed = {column: label for label, column in found.items() if column != label}
    for column, label in renamed.items():
        log.info("--csv %s: label %s read from column %r (the same finding in another collection)", csv, label, column)
    return df.rename(columns=renamed) if renamed else df


def check_image_paths(df: pd.DataFrame, csv) -> None:
    """No empty ``image_path`` and no path listed twice (rows numbered by the table's index: its
    position in the file as read)."""
    blank = df["image_path"].isna() | (df["image_path"].astype(str).str.strip() == "")
    if blank.any():
        row = int(df.index[np.flatnonzero(blank.to_numpy())[0]]) + 2
        raise UserError(f"--csv {csv}: column image_path, row {row}: empty path")
    dup = df["image_path"].duplicated(keep=False)
    if dup.any():
        first = np.flatnonzero(dup.to_numpy())[:2]
        rows = [int(df.index[i]) + 2 for i in first]
        value = df["image_path"].iloc[first[0]]
        raise UserError(
            f"--csv {csv}: column image_path, rows {rows[0]} and {rows[1]}: duplicated path {value!r} "
            f"({int(dup.sum())} rows share a path); each image must appear once"
        )


def parse_label_column(column: pd.Series, csv, label: str, uncertain: str = "ignore", flag: str = "--csv") -> pd.Series:
    """0/1 (also '0.0'/'1.0', True/False) to float; empty/NaN to NaN; -1 (uncertain) to what
    ``uncertain`` says (:data:`UNCERTAIN_AS`); anything else is an error naming ``flag`` and the
    file ``csv``, the column and the row (the column's index is the row's position in the file)."""
    text = column.astype(str).str.strip().str.lower()
    mapping = {"0": 0.0, "1": 1.0, "0.0": 0.0, "1.0": 1.0, "false": 0.0, "true": 1.0,
               "nan": np.nan, "": np.nan, "none": np.nan}
    mapping.update({value: UNCERTAIN_AS[uncertain] for value in UNCERTAIN_TEXT})
    parsed = text.map(mapping)
    bad = ~text.isin(mapping.keys())
    if bad.any():
        pos = int(np.flatnonzero(bad.to_numpy())[0])
        where = f"{flag} {csv}" if flag else str(csv)
        raise UserError(
            f"{where}: column {label}, row {int(column.index[pos]) + 2}: value {str(column.iloc[pos])!r} is not 0, 1 "
            f"or empty ({int(bad.sum())} such rows); use 1 = present, 0 = absent, empty = unknown (-1 = uncertain, "
            "read as --uncertain says)"
        )
    return parsed.astype(float)


def check_group_columns(df: pd.DataFrame, columns, csv) -> None:
    """Every ``--group-col`` names a column of the table; the error lists the columns there are."""
    for col in columns or []:
        if col not in df.columns:
            raise UserError(f"--group-col {col}: no such column in --csv {csv}; "
                            f"columns are: {', '.join(map(str, df.columns))}")


def select_split(df: pd.DataFrame, split: str | None, csv) -> pd.DataFrame:
    """Rows of ``split`` (index reset). Without a ``split`` column, every row is used."""
    if split is None or "split" not in df.columns:
        return df.reset_index(drop=True)
    rows = df[df["split"].astype(str) == split]
    if len(rows) == 0:
        present = sorted(df["split"].dropna().astype(str).unique())
        raise UserError(
            f"--csv {csv}: split {split!r} has no rows; splits present: {', '.join(present) or 'none'} "
            "(choose one with --split, or make splits with train --auto-split)"
        )
    return rows.reset_index(drop=True)


def label_matrix(df: pd.DataFrame, labels) -> np.ndarray:
    """(N, L) float32 with NaN for unknown."""
    return df[list(labels)].to_numpy(dtype=np.float32)


def resolve_paths(df: pd.DataFrame, img_root) -> list[str]:
    root = Path(img_root)
    return [str(p if Path(p).is_absolute() else root / p) for p in df["image_path"].astype(str)]


def check_images_exist(paths, csv, img_root) -> None:
    """All paths checked up front, before any expensive work; the first few missing are listed."""
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        shown = ", ".join(missing[:3])
        raise UserError(
            f"--csv {csv}: {len(missing)} of {len(paths)} image(s) not found under --img-root {img_root} "
            f"(first: {shown}); fix image_path or --img-root"
        )


def auto_split(df: pd.DataFrame, fractions, seed: int) -> pd.DataFrame:
    """Assign ``split`` = train/val/test with three fractions, or train/val/calib/test with four
    (``calib``: set aside for the temperature, never used to choose the checkpoint), grouped by
    ``patient_id`` when present (a patient never straddles splits), seeded. Returns a copy."""
    fractions = [float(f) for f in fractions]
    if len(fractions) not in (3, 4) or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise UserError(
            f"--auto-split {' '.join(map(str, fractions))}: need three non-negative fractions "
            "TRAIN VAL TEST (or four: TRAIN VAL CALIB TEST) that sum to 1 (e.g. 0.7 0.1 0.2)"
        )
    names = ("train", "val", "test") if len(fractions) == 3 else ("train", "val", "calib", "test")
    groups = df["patient_id"].astype(str).to_numpy() if "patient_id" in df.columns else np.arange(len(df)).astype(str)
    unique = np.unique(groups)
    rng = np.random.default_rng(seed)
    order = unique[rng.permutation(len(unique))]
    # Assign whole patients greedily so that image counts approach the fractions.
    counts = pd.Series(groups).value_counts()
    targets = np.cumsum(fractions) * len(df)
    assignment, running = {}, 0
    for patient in order:
        split_idx = int(np.searchsorted(targets, running, side="right"))
        assignment[patient] = names[min(split_idx, len(names) - 1)]
        running += counts[patient]
    out = df.copy()
    out["split"] = [assignment[g] for g in groups]
    return out


# ====== splits and prevalence ======

def split_column(df: pd.DataFrame) -> pd.Series | None:
    """The ``split`` column as text with empty cells as NO_SPLIT; None without the column."""
    if "split" not in df.columns:
        return None
    split = df["split"].astype("string").str.strip()
    return split.fillna(NO_SPLIT).replace("", NO_SPLIT).astype(str)


def split_order(split: pd.Series) -> list[str]:
    """train, val, test first (those present), then other names sorted, rows without a split last."""
    present = set(split.unique())
    others = sorted(present - set(KNOWN_SPLITS) - {NO_SPLIT})
    return [s for s in KNOWN_SPLITS if s in present] + others + ([NO_SPLIT] if NO_SPLIT in present else [])


def patients_in_several_splits(df: pd.DataFrame, split: pd.Series | None) -> dict[str, list[str]]:
    """{patient_id: sorted splits} for every patient with rows in more than one split (rows
    without a split or without a patient id are ignored); empty without either column."""
    if split is None or "patient_id" not in df.columns:
        return {}
    table = pd.DataFrame({"patient": df["patient_id"].astype("string"), "split": split})
    table = table[table["patient"].notna() & (table["split"] != NO_SPLIT)]
    counts = table.groupby("patient")["split"].nunique()
    shared = counts.index[counts > 1]
    rows = table[table["patient"].isin(shared)]
    return {str(p): sorted(g.unique()) for p, g in rows.groupby("patient")["split"]}


def prevalence(parsed: dict[str, pd.Series], split: pd.Series | None) -> list[dict]:
    """One record per (split, label): ``n`` rows with a known value, ``n_pos`` positives,
    ``prevalence`` = n_pos / n (NaN when n = 0). Split ``all`` covers every row."""
    groups = [("all", None)]
    if split is not None:
        groups += [(name, (split == name).to_numpy()) for name in split_order(split)]
    records = []
    for name, mask in groups:
        for label, values in parsed.items():
            y = values.to_numpy() if mask is None else values.to_numpy()[mask]
            n, n_pos = int(np.sum(~np.isnan(y))), int(np.nansum(y))
            records.append({"split": name, "label": label, "n_rows": int(len(y)), "n": n,
                            "n_pos": n_pos, "prevalence": n_pos / n if n else float("nan")})
    return records
