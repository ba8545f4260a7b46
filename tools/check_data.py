"""Check an input CSV and its images before training: ``python -m tools.check_data --csv CSV
--img-root DIR [--labels L1 L2 ...] [--out report.json]``.

Problems (exit 1): label values other than 0/1/-1/empty, empty or duplicated image paths, missing
images, images that cannot be decoded, patients whose rows fall in more than one split.
Warnings (exit 0): a label with one class only (or no known value) in a split, rows without a
split or with a split name other than train/val/test.
Reported either way: prevalence per split and label, image height/width range, bit depth and
channel counts, and (``notes``) how many -1 label values ``--uncertain`` read and how many lateral
films ``--views frontal`` left out. Usage errors (no CSV, no such image folder, a label without a column) exit 2.

When DICOM files are among the images, their headers are audited too (``dicom`` in the report):
counts per photometric interpretation, bits stored, transfer syntax (and whether this
installation can decode it), modality and view; films without a window (read with their full
BitsStored range under ``--dicom-window file``) are a note, lateral films (a frontal model's input
should hold none) and transfer syntaxes nothing here decodes are warnings.

Every image is decoded once with :func:`tools.dataset.read_raw`, the decoder the suite trains with,
so an image that passes here also loads in ``train``/``eval``. Decoding dominates the run time;
OpenCV and NumPy release the GIL while decoding and reading, so a thread pool uses every core.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from tools import dicom
from tools.cli import table_flags, table_options
from tools.dataset import read_raw
from tools.errors import UserError
from tools.files import write_json
from tools.runtime import available_cores
from tools.table import (
    DEFAULT_LABELS,
    KNOWN_SPLITS,
    NO_SPLIT,
    check_image_paths,
    check_images_exist,
    ReadRules,
    check_label_columns,
    lateral_rows,
    parse_label_column,
    patients_in_several_splits,
    prevalence,
    read_csv_file,
    resolve_paths,
    split_column,
    split_order,
    uncertain_note,
    uncertain_values,
)

PROG = "check_data"
CHANNEL_NAMES = {1: "grayscale", 3: "RGB", 4: "RGBA"}
SHOWN = 10  # problems list at most this many names inline; the JSON report has them all

# Per-image status codes of the image pass.
_OK, _MISSING, _UNDECODABLE = 0, 1, 2


# ====== the table ======

def parse_labels(df: pd.DataFrame, csv, labels, uncertain: str = "ignore") -> tuple[dict[str, pd.Series], list[str]]:
    """Each label column parsed by :func:`tools.table.parse_label_column` (-1 read as
    ``uncertain`` says).

    Returns ({label: float column} for the labels that parse, [one problem per label that does
    not]); a bad column does not stop the others from being checked."""
    parsed, problems = {}, []
    for label in labels:
        try:
            parsed[label] = parse_label_column(df[label], csv, label, uncertain)
        except UserError as exc:
            problems.append(str(exc))
    return parsed, problems


def label_warnings(records: list[dict], has_split: bool) -> list[str]:
    """A label with one class only, or no known value, within a split (within ``all`` when there
    is no split column): its AUROC will be undefined there and training on it learns nothing."""
    warnings = []
    for r in records:
        if (r["split"] == "all") == has_split or r["split"] == NO_SPLIT:
            continue
        where = f"split {r['split']}" if has_split else "all rows"
        if r["n"] == 0:
            warnings.append(f"{where}, label {r['label']}: no known value in {r['n_rows']} row(s)")
        elif r["n_pos"] in (0, r["n"]):
            kind = "negatives" if r["n_pos"] == 0 else "positives"
            warnings.append(f"{where}, label {r['label']}: only {kind} ({r['n']} known row(s)); "
                            "AUROC/AUPRC are undefined there")
    return warnings


def split_warnings(split: pd.Series | None) -> list[str]:
    """Rows without a split and split names the suite does not use (train/val/calib/test)."""
    if split is None:
        return []
    warnings = []
    n_none = int((split == NO_SPLIT).sum())
    if n_none:
        warnings.append(f"{n_none} row(s) have no split; no command will use them")
    unknown = [s for s in split_order(split) if s not in KNOWN_SPLITS and s != NO_SPLIT]
    if unknown:
        warnings.append(f"split name(s) {', '.join(map(repr, unknown))} are not train/val/calib/test; "
                        "--split must name them explicitly")
    return warnings


# ====== the images ======

def inspect_image(path) -> tuple[int, int, int, int, int, str]:
    """(status, height, width, bits per sample, channels, error) of one file, decoded once with
    :func:`tools.dataset.read_raw`; sizes are -1 when the file is missing or cannot be decoded."""
    if not os.path.isfile(path):
        return _MISSING, -1, -1, -1, -1, f"image {path}: file not found"
    try:
        raw = read_raw(path)
    except UserError as exc:
        return _UNDECODABLE, -1, -1, -1, -1, str(exc)
    channels = 1 if raw.ndim == 2 else int(raw.shape[2])
    return _OK, int(raw.shape[0]), int(raw.shape[1]), raw.dtype.itemsize * 8, channels, ""


def inspect_images(paths, num_workers: int, progress: bool = True, chunk: int = 2048) -> dict:
    """:func:`inspect_image` of every path in a thread pool, in order.

    Returns arrays ``status``, ``height``, ``width``, ``bits``, ``channels`` (N,) and
    ``errors`` {row: message}. Paths are submitted in chunks so that 100k rows do not create
    100k pending futures at once."""
    from tqdm import tqdm

    paths = list(paths)
    n = len(paths)
    out = {key: np.full(n, -1, np.int64) for key in ("status", "height", "width", "bits", "channels")}
    errors = {}
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool, \
            tqdm(total=n, desc="images", unit="img", disable=not progress, mininterval=1.0,
                 file=sys.stderr) as bar:
        for start in range(0, n, chunk):
            for i, result in enumerate(pool.map(inspect_image, paths[start:start + chunk]), start):
                status, h, w, bits, channels, error = result
                out["status"][i], out["height"][i], out["width"][i] = status, h, w
                out["bits"][i], out["channels"][i] = bits, channels
                if error:
                    errors[i] = error
                bar.update(1)
    out["errors"] = errors
    return out


def image_summary(paths, inspected: dict) -> dict:
    """Counts and ranges over the decoded images: ``height``/``width`` min/median/max,
    ``bit_depth`` {"8-bit": n, "16-bit": n}, ``channels`` {"grayscale"/"RGB"/"RGBA": n}, plus the
    ``missing`` paths and the ``undecodable`` [{path, error}]."""
    status = inspected["status"]
    ok = status == _OK

    def stats(values):
        values = values[ok]
        if not len(values):
            return {"min": None, "median": None, "max": None}
        return {"min": int(values.min()), "median": float(np.median(values)), "max": int(values.max())}

    bits, counts = np.unique(inspected["bits"][ok], return_counts=True)
    chans, chan_counts = np.unique(inspected["channels"][ok], return_counts=True)
    return {
        "checked": int(len(status)),
        "decoded": int(ok.sum()),
        "height": stats(inspected["height"]),
        "width": stats(inspected["width"]),
        "bit_depth": {f"{int(b)}-bit": int(c) for b, c in zip(bits, counts)},
        "channels": {CHANNEL_NAMES.get(int(c), f"{int(c)} channels"): int(k) for c, k in zip(chans, chan_counts)},
        "missing": [paths[i] for i in np.flatnonzero(status == _MISSING)],
        "undecodable": [{"path": paths[i], "error": inspected["errors"][i]}
                        for i in np.flatnonzero(status == _UNDECODABLE)],
    }


def undecodable_problem(undecodable: list[dict]) -> str:
    """One line naming the images that cannot be decoded (the first SHOWN of them)."""
    names = ", ".join(item["path"] for item in undecodable[:SHOWN])
    more = f" and {len(undecodable) - SHOWN} more" if len(undecodable) > SHOWN else ""
    return (f"{len(undecodable)} image(s) cannot be decoded (truncated, not a PNG/JPEG/DICOM, not a single-frame "
            f"film, or an unsupported pixel type): {names}{more}; replace them or drop their rows")


def patient_problem(shared: dict[str, list[str]]) -> str:
    """One line naming the patients whose rows fall in several splits (the first SHOWN)."""
    items = list(shared.items())
    names = "; ".join(f"{p} in {', '.join(s)}" for p, s in items[:SHOWN])
    more = f"; and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return (f"{len(items)} patient(s) have rows in more than one split ({names}{more}): "
            "their images leak between training and evaluation; split by patient_id")


# ====== DICOM headers ======

def _count(values) -> dict[str, int]:
    """{value: count}, most frequent first; a missing value counts as "(none)"."""
    counts = pd.Series(["(none)" if v is None else str(v) for v in values]).value_counts()
    return {str(k): int(v) for k, v in counts.items()}


def dicom_audit(paths) -> dict | None:
    """The headers of the DICOM files among ``paths`` (read without their pixel data), or None
    when there are none: ``files``, counts per ``photometric``, ``bits_stored``, ``modality`` and
    ``view``; ``transfer_syntax`` [{uid, name, files, decodable}]; ``without_window`` (count and
    the first SHOWN paths), ``lateral`` (paths whose ViewPosition is lateral), ``unreadable``
    (paths whose headers cannot be parsed; the image pass names why)."""
    from pydicom.uid import UID

    found = [p for p in paths if os.path.isfile(p) and dicom.is_dicom(p)]
    if not found:
        return None
    headers, unreadable = [], []
    for path in found:
        try:
            headers.append((path, dicom.read_header(path)))
        except UserError:
            unreadable.append(path)
    syntaxes = _count(h["transfer_syntax"] for _, h in headers)
    no_window = [p for p, h in headers if not h["has_window"] and h["photometric"] in dicom.GREY]
    return {
        "files": len(found),
        "photometric": _count(h["photometric"] for _, h in headers),
        "bits_stored": _count(h["bits_stored"] for _, h in headers),
        "transfer_syntax": [{"uid": uid, "name": UID(uid).name if uid != "(none)" else None, "files": n,
                             "decodable": uid != "(none)" and dicom.can_decode(uid)} for uid, n in syntaxes.items()],
        "modality": _count(h["modality"] for _, h in headers),
        "view": _count(h["view"] for _, h in headers),
        "without_window": {"count": len(no_window), "first": no_window[:SHOWN]},
        "lateral": [p for p, h in headers if dicom.is_lateral(h["view"])],
        "unreadable": unreadable,
    }


def dicom_findings(audit: dict | None) -> tuple[list[str], list[str]]:
    """(notes, warnings) of a :func:`dicom_audit`."""
    if audit is None:
        return [], []
    notes, warnings = [], []
    count = audit["without_window"]["count"]
    if count:
        notes.append(f"{count} DICOM film(s) carry no window (no VOI LUT, no WindowCenter/WindowWidth): "
                     "--dicom-window file reads them with their full BitsStored range (bits)")
    lateral = audit["lateral"]
    if lateral:
        more = f" and {len(lateral) - SHOWN} more" if len(lateral) > SHOWN else ""
        warnings.append(f"{len(lateral)} DICOM film(s) have a lateral ViewPosition ({', '.join(lateral[:SHOWN])}{more}): "
                        "a frontal model's input should hold none; give the CSV their view (tools.dicom_index "
                        "writes it) so that --views frontal leaves them out")
    for syntax in audit["transfer_syntax"]:
        if not syntax["decodable"]:
            warnings.append(f"{syntax['files']} DICOM file(s) use transfer syntax {syntax['name'] or syntax['uid']} "
                            f"({syntax['uid']}), which this installation cannot decode")
    return notes, warnings


# ====== the whole check ======

def check_data(csv, img_root, labels, num_workers: int | None = None, progress: bool = True,
               images: bool = True, files: bool = True, rules: ReadRules = ReadRules()) -> dict:
    """Run every check; return the report (``problems`` empty when the data are clean).

    Raises UserError for usage errors: no readable CSV, no ``image_path`` column, a label
    without a column, an image folder that does not exist. ``images=False`` skips decoding every
    file (valtool has already decoded its split once and knows which failed); ``files=False`` does
    not look for the files at all (an audit of predictions alone reads no image). ``rules``: -1
    values read as --uncertain says and, with --views frontal, lateral films left out of every
    check; ``notes`` counts both."""
    start = time.perf_counter()
    labels = list(labels)
    df = read_csv_file(csv)
    df = check_label_columns(df, csv, labels)
    if not Path(img_root).is_dir():
        raise UserError(f"--img-root {img_root}: no such folder; pass the folder image_path is relative to")
    notes = []
    lateral = lateral_rows(df) if rules.views == "frontal" else np.zeros(len(df), bool)
    if lateral.any():
        notes.append(f"{int(lateral.sum())} lateral film(s) (view LL) of {len(df)} rows left out "
                     "(--views frontal; --views all keeps them)")
        df = df[~lateral]
    uncertain = sum(int(uncertain_values(df[label]).sum()) for label in labels)
    if uncertain:
        notes.append(uncertain_note(uncertain, rules.uncertain))

    parsed, problems = parse_labels(df, csv, labels, rules.uncertain)
    try:
        check_image_paths(df, csv)
    except UserError as exc:
        problems.append(str(exc))

    split = split_column(df)
    shared = patients_in_several_splits(df, split)
    records = prevalence(parsed, split)
    warnings = split_warnings(split) + label_warnings(records, split is not None)
    if len(parsed) < len(labels):
        bad = [label for label in labels if label not in parsed]
        warnings.append(f"prevalence not computed for {', '.join(bad)} (invalid values, see problems)")

    paths = resolve_paths(df, img_root)
    try:
        if files:
            check_images_exist(paths, csv, img_root)
    except UserError as exc:
        problems.append(str(exc))
    workers = num_workers if num_workers else available_cores()
    audit = None
    if images:
        images = image_summary(paths, inspect_images(paths, workers, progress))
        if images["undecodable"]:
            problems.append(undecodable_problem(images["undecodable"]))
        audit = dicom_audit(paths)
        dicom_notes, dicom_warnings = dicom_findings(audit)
        notes += dicom_notes
        warnings += dicom_warnings
    else:
        images = None
    if shared:
        problems.append(patient_problem(shared))

    return {
        "csv": str(csv), "img_root": str(img_root), "labels": labels,
        "n_rows": int(len(df)),
        "columns": [str(c) for c in df.columns],
        "splits": {name: int((split == name).sum()) for name in split_order(split)} if split is not None else None,
        "n_patients": int(df["patient_id"].nunique()) if "patient_id" in df.columns else None,
        "prevalence": records,
        "images": images,
        "dicom": audit,
        "patients_in_several_splits": shared,
        "notes": notes,
        "warnings": warnings,
        "problems": problems,
        "ok": not problems,
        "seconds": round(time.perf_counter() - start, 2),
    }


# ====== the printed report ======

def prevalence_table(records: list[dict]) -> str:
    """Rows = splits, columns = labels, cells ``n_pos/n (prevalence %)``."""
    from tabulate import tabulate

    splits = list(dict.fromkeys(r["split"] for r in records))
    labels = list(dict.fromkeys(r["label"] for r in records))
    cell = {(r["split"], r["label"]): r for r in records}
    rows = []
    for s in splits:
        first = cell[(s, labels[0])]
        row = [s, first["n_rows"]]
        for label in labels:
            r = cell[(s, label)]
            pct = f"{100 * r['prevalence']:.1f}%" if r["n"] else "n/a"
            row.append(f"{r['n_pos']}/{r['n']} ({pct})")
        rows.append(row)
    return tabulate(rows, headers=["split", "rows"] + [f"{label} pos/known" for label in labels])


def images_table(images: dict) -> str:
    """Height/width min/median/max, then counts by bit depth, channels, missing, undecodable."""
    from tabulate import tabulate

    size = tabulate([[k, images[k]["min"], images[k]["median"], images[k]["max"]] for k in ("height", "width")],
                    headers=["pixels", "min", "median", "max"])
    kinds = [[f"bit depth {k}", v] for k, v in images["bit_depth"].items()]
    kinds += [[f"channels {k}", v] for k, v in images["channels"].items()]
    kinds += [["missing", len(images["missing"])], ["undecodable", len(images["undecodable"])]]
    return size + "\n\n" + tabulate(kinds, headers=["images", "count"])


def dicom_table(audit: dict) -> str:
    """One row per (header, value) of a :func:`dicom_audit`, with the file count."""
    from tabulate import tabulate

    rows = [[key, value, n] for key in ("photometric", "bits_stored", "modality", "view")
            for value, n in audit[key].items()]
    rows += [["transfer_syntax", f"{t['name'] or t['uid']} ({'decodable' if t['decodable'] else 'NOT decodable here'})",
              t["files"]] for t in audit["transfer_syntax"]]
    rows += [["no window", "--dicom-window file shows the full BitsStored range", audit["without_window"]["count"]],
             ["lateral view", "flagged", len(audit["lateral"])], ["headers unreadable", "", len(audit["unreadable"])]]
    return tabulate(rows, headers=["header", "value", "files"])


def format_report(report: dict) -> str:
    """The human-readable report printed by the command."""
    lines = [f"{report['csv']}: {report['n_rows']} rows, labels {', '.join(report['labels'])}, "
             f"images under {report['img_root']}"]
    if report["splits"]:
        lines.append("splits: " + ", ".join(f"{k} {v}" for k, v in report["splits"].items()))
    else:
        lines.append("splits: no split column (every command uses all rows)")
    if report["n_patients"] is not None:
        lines.append(f"patients: {report['n_patients']}")
    lines += [f"read: {note}" for note in report.get("notes", [])]
    if report["prevalence"]:
        lines += ["", "prevalence", prevalence_table(report["prevalence"])]
    images = report["images"]
    lines += ["", f"images ({images['decoded']} of {images['checked']} decoded, {report['seconds']} s)",
              images_table(images)]
    if report.get("dicom"):
        lines += ["", f"DICOM ({report['dicom']['files']} of {images['checked']} images; headers)",
                  dicom_table(report["dicom"])]
    if report["warnings"]:
        lines += ["", f"{len(report['warnings'])} warning(s):"] + [f"  - {w}" for w in report["warnings"]]
    lines.append("")
    if report["problems"]:
        lines += [f"{len(report['problems'])} problem(s):"] + [f"  - {p}" for p in report["problems"]]
    else:
        lines.append("no problems found")
    return "\n".join(lines)


# ====== command line ======

def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Check an input CSV and its images: labels, paths, patients across splits, "
                    "prevalence, image sizes and bit depths. Exit 0 clean, 1 problems, 2 usage error.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--csv", required=True, help="input CSV (image_path, label columns, optional split, patient_id)")
    data.add_argument("--img-root", default=".", help="folder that relative image paths start from")
    data.add_argument("--labels", nargs="+", default=list(DEFAULT_LABELS), help="label columns to check")
    table_flags(data)
    run = parser.add_argument_group("run")
    run.add_argument("--num-workers", type=int, default=0,
                     help="threads decoding images (0 = one per CPU core)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    output = parser.add_argument_group("output")
    output.add_argument("--out", default=None, help="also write the report as JSON here")
    return parser


def main(argv=None) -> int:
    """Run the checks; returns 0 when clean, 1 when there are problems, 2 on a usage error."""
    args = build_parser().parse_args(argv)
    # libpng/libjpeg warnings about each bad file would bury the report, which names them anyway.
    log_level = cv2.getLogLevel()
    cv2.setLogLevel(2)  # 2 = errors only (OpenCV utils/logger.defines.hpp)
    try:
        if len(set(args.labels)) != len(args.labels):
            raise UserError(f"--labels {' '.join(args.labels)}: a label is given twice; list each label once")
        if args.num_workers < 0:
            raise UserError(f"--num-workers {args.num_workers}: must be 0 (one per core) or more")
        if args.out is not None and not Path(args.out).resolve().parent.is_dir():
            raise UserError(f"--out {args.out}: folder {Path(args.out).parent} does not exist; create it first")
        report = check_data(args.csv, args.img_root, args.labels, args.num_workers, not args.no_progress,
                            rules=ReadRules(**table_options(args)))
    except UserError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        cv2.setLogLevel(log_level)
    print(format_report(report))
    if args.out is not None:
        write_json(args.out, report)
        print(f"wrote {args.out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
