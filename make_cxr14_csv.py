"""Turn NIH ChestX-ray14, as downloaded, into the project's input CSV.

The dataset (Wang et al., CVPR 2017; https://nihcc.app.box.com/v/ChestXray-NIHCC, also mirrored
on the Hugging Face hub) ships a table `Data_Entry_2017*.csv`, the official `train_val_list.txt` /
`test_list.txt`, and the PNG images spread over `images_0XX/images/` folders. This script finds the
table, the test list (train_val is every other image) and the images anywhere under `--hf-root`,
keeps the rows whose image is on disk, assigns a patient-disjoint train/val/test split and writes
one row per image:

    image_path, split, <one 0/1 column per --labels>, view, sex, age, patient_id, follow_up,
    num_findings, num_findings_bin

The builder lives in `tools/cxr14.py`, shared with `python -m tools.datasets nih`.
Research use only, not for clinical use.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tools.cli import guarded
from tools.cxr14 import TABLE_PATTERN, TEST_LIST, build_table, count_table
from tools.cxr14 import DEFAULT_FRACTIONS, FINDINGS, parse_age, split_patients  # noqa: F401 - importable as before
from tools.files import write_csv
from tools.table import DEFAULT_LABELS

PROG = "make_cxr14_csv.py"


# ====== command line ======

def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="NIH ChestX-ray14 (as downloaded) -> project CSV with a patient-disjoint split.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--hf-root", required=True,
                      help=f"folder holding {TABLE_PATTERN}, the split lists and the images "
                           "(searched recursively)")
    data.add_argument("--labels", nargs="+", default=list(DEFAULT_LABELS),
                      help="findings to write as 0/1 columns")
    split = parser.add_argument_group("split")
    split.add_argument("--seed", type=int, default=1337, help="seed of the patient shuffle")
    split.add_argument("--val-frac", type=float, default=0.1,
                       help=f"fraction of train_val patients used for validation when {TEST_LIST} "
                            "is present")
    output = parser.add_argument_group("output")
    output.add_argument("--out", required=True, help="CSV to write")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return guarded(PROG, run, args)


def run(args) -> None:
    table = build_table(args.hf_root, args.labels, seed=args.seed, val_frac=args.val_frac)
    print(count_table(table, args.labels))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_csv(args.out, table)
    print(f"wrote {args.out} ({len(table)} rows)")


if __name__ == "__main__":
    sys.exit(main())
