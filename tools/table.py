"""The input table: read and validate an input CSV, its splits and label prevalence, the
patient-grouped split, and the default labels.

Input CSV contract (SPEC "Input CSV"): ``image_path`` (relative to ``--img-root`` or absolute), one
0/1 column per label (empty/NaN = unknown, masked from loss and metrics), optional ``split``
(train/val/test), optional ``patient_id``; every other column is metadata.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tools.errors import UserError

DEFAULT_LABELS = ["Cardiomegaly", "Edema", "Effusion"]
KNOWN_SPLITS = ("train", "val", "calib", "test")
NO_SPLIT = "(none)"


# ====== the table ======

def read_table(csv, labels, require_labels: bool = True) -> pd.DataFrame:
    """Read ``csv`` and validate it; return it with label columns as float (NaN = unknown).

    Raises UserError (one line naming file, column, row and value) for: a missing or empty file,
    a missing ``image_path`` or label column, a label value other than 0/1/empty, duplicated
    image paths. Rows are numbered as in a spreadsheet: the header is row 1.
    """
    df = read_csv_file(csv)
    if require_labels:
        check_label_columns(df, csv, labels)
        for label in labels:
            df[label] = parse_label_column(df[label], csv, label)
    check_image_paths(df, csv)
    return df


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
    """The analysed labels: ``requested`` (``--labels``; each must be ``available``, else the error
    ``--labels <missing>: <lacking>; --labels says ..., <holder> <available>``), or else the
    ``available`` ones that ``columns`` has (all of them when ``columns`` is None; none is the
    error ``none_in_data``)."""
    if requested:
        missing = [label for label in requested if label not in available]
        if missing:
            raise UserError(f"--labels {' '.join(missing)}: {lacking}; --labels says {' '.join(requested)}, "
                            f"{holder} {' '.join(available) or 'none'}")
        return list(requested)
    if columns is None:
        return list(available)
    chosen = [label for label in available if label in set(columns)]
    if not chosen:
        raise UserError(none_in_data)
    return chosen


def header(csv) -> list[str]:
    """The column names of ``csv`` (none when it cannot be read: :func:`read_table` then says why)."""
    try:
        return [str(c) for c in pd.read_csv(csv, nrows=0).columns]
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError):
        return []


def check_label_columns(df: pd.DataFrame, csv, labels) -> None:
    """Every label has a column; the error lists the columns there are."""
    missing = [label for label in labels if label not in df.columns]
    if missing:
        raise UserError(
            f"--csv {csv}: label column(s) {', '.join(missing)} not found (check --labels); "
            f"columns are: {', '.join(map(str, df.columns))}"
        )


def check_image_paths(df: pd.DataFrame, csv) -> None:
    """No empty ``image_path`` and no path listed twice."""
    blank = df["image_path"].isna() | (df["image_path"].astype(str).str.strip() == "")
    if blank.any():
        row = int(np.flatnonzero(blank.to_numpy())[0]) + 2
        raise UserError(f"--csv {csv}: column image_path, row {row}: empty path")
    dup = df["image_path"].duplicated(keep=False)
    if dup.any():
        rows = np.flatnonzero(dup.to_numpy())[:2] + 2
        value = df["image_path"].iloc[rows[0] - 2]
        raise UserError(
            f"--csv {csv}: column image_path, rows {rows[0]} and {rows[1]}: duplicated path {value!r} "
            f"({int(dup.sum())} rows share a path); each image must appear once"
        )


def parse_label_column(column: pd.Series, csv, label: str) -> pd.Series:
    """0/1 (also '0.0'/'1.0', True/False) to float; empty/NaN to NaN; anything else is an error."""
    text = column.astype(str).str.strip().str.lower()
    mapping = {"0": 0.0, "1": 1.0, "0.0": 0.0, "1.0": 1.0, "false": 0.0, "true": 1.0,
               "nan": np.nan, "": np.nan, "none": np.nan}
    parsed = text.map(mapping)
    bad = ~text.isin(mapping.keys())
    if bad.any():
        pos = int(np.flatnonzero(bad.to_numpy())[0])
        raise UserError(
            f"--csv {csv}: column {label}, row {pos + 2}: value {str(column.iloc[pos])!r} is not 0, 1 or empty "
            f"({int(bad.sum())} such rows); use 1 = present, 0 = absent, empty = unknown"
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
