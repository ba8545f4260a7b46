"""An input CSV from a DICOM folder: ``python -m tools.dicom_index --root DIR --out CSV``.

Every file under ``--root`` (recursively) that is a DICOM file (``.dcm``, or any name with the
DICM prefix) is read up to its pixel data (``stop_before_pixels``), and each single-frame film
becomes one row of ``COLUMNS``:

| column | from |
| --- | --- |
| `image_path` | the file, relative to ``--root`` (so ``--img-root DIR`` finds it) |
| `patient_id`, `study_uid` | PatientID, StudyInstanceUID |
| `view` | ViewPosition; lateral ones (LL, RL, LATERAL, XTABLE LATERAL) as `LL`, the builders' value |
| `sex`, `age` | PatientSex; PatientAge in years ("045Y" -> 45, "006M" -> 0.5) |
| `manufacturer`, `model`, `institution` | Manufacturer, ManufacturerModelName, InstitutionName |
| `modality`, `photometric`, `bits_stored`, `rows`, `columns` | Modality, PhotometricInterpretation, BitsStored, Rows, Columns |
| `pixel_spacing` | row spacing in mm: PixelSpacing, else ImagerPixelSpacing |
| `transfer_syntax` | the file meta TransferSyntaxUID |

A lateral film is written `LL`, as the other builders write laterals, so ``--views frontal``
leaves it out. A missing attribute is an empty cell. Files that are no film are left out and
counted by why: objects without Rows/Columns (structured reports, presentation states, ...),
multi-frame files, files whose headers cannot be parsed. The table has no label columns: join
the labels by ``image_path`` (README "DICOM").
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd

from tools import dicom
from tools.cli import Formatter, guarded
from tools.errors import UserError
from tools.files import write_csv

PROG = "python -m tools.dicom_index"
COLUMNS = ["image_path", "patient_id", "study_uid", "view", "sex", "age", "manufacturer", "model", "institution",
           "modality", "photometric", "bits_stored", "rows", "columns", "pixel_spacing", "transfer_syntax"]
INTEGER_COLUMNS = ("bits_stored", "rows", "columns")


def dicom_files(root) -> list[Path]:
    """Every DICOM file under ``root``, sorted."""
    return sorted(p for p in Path(root).rglob("*") if p.is_file() and dicom.is_dicom(p))


def index_row(path: Path, root: Path) -> tuple[dict | None, str | None]:
    """(the row of one file, None), or (None, why it is left out)."""
    try:
        header = dicom.read_header(path)
    except UserError:
        return None, "headers cannot be parsed"
    if header["rows"] is None or header["columns"] is None:
        return None, f"not an image (modality {header['modality'] or 'not given'})"
    if header["frames"] > 1:
        return None, "multi-frame"
    row = {key: header.get(key) for key in COLUMNS[1:]}
    row["image_path"] = path.relative_to(root).as_posix()
    if dicom.is_lateral(row["view"]):
        row["view"] = "LL"
    return row, None


def build_index(root) -> tuple[pd.DataFrame, Counter]:
    """(the table of ``COLUMNS``, one row per film in path order; Counter of the files left out
    by reason). UserError when ``root`` is not a folder or holds no DICOM file."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--root {root}: no such folder; pass the folder that holds the DICOM files")
    files = dicom_files(root)
    if not files:
        raise UserError(f"--root {root}: no DICOM file found (.dcm, or files with the DICM prefix; searched recursively)")
    rows, left_out = [], Counter()
    for path in files:
        row, why = index_row(path, root)
        if row is None:
            left_out[why] += 1
        else:
            rows.append(row)
    table = pd.DataFrame(rows, columns=COLUMNS)
    for column in INTEGER_COLUMNS:
        table[column] = table[column].astype("Int64")
    return table, left_out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=Formatter,
        description="Write an input CSV from the DICOM films under a folder: one row per single-frame film, "
                    "image_path relative to --root and the headers the suite reads (README: DICOM). Labels are "
                    "joined by image_path.")
    parser.add_argument("--root", required=True, help="folder searched recursively for DICOM files")
    parser.add_argument("--out", required=True, help="the CSV to write (image_path relative to --root)")
    return parser


def write_index(root, out) -> pd.DataFrame:
    """Build the index of ``root`` (:func:`build_index`), write it to ``out`` and say what was
    left out; UserError when ``out``'s folder does not exist or no file is a film."""
    start = time.perf_counter()
    if not Path(out).resolve().parent.is_dir():
        raise UserError(f"--out {out}: folder {Path(out).parent} does not exist; create it first")
    table, left_out = build_index(root)
    skipped = "; ".join(f"{n} {why}" for why, n in sorted(left_out.items())) or "none"
    if table.empty:
        raise UserError(f"--root {root}: none of the {sum(left_out.values())} DICOM file(s) is a single-frame film "
                        f"({skipped})")
    write_csv(out, table)
    print(f"wrote {len(table)} film(s) to {out} in {time.perf_counter() - start:.1f} s (left out: {skipped}); "
          f"join the label columns by image_path and pass the joined CSV with --img-root {root}")
    return table


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return guarded(PROG, lambda a: write_index(a.root, a.out), args)


if __name__ == "__main__":
    sys.exit(main())
