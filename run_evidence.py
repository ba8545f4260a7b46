#!/usr/bin/env python
"""Dataset and taxonomy evidence: what the data looks like, and (with --weights) how the model's
decisions move with the threshold, in files that other write-ups can link to.

Data evidence (every row of --csv, all splits):
  prevalence.csv          split, label, n (rows with the label known), n_pos, prevalence; an "all" split
  brightness_by_<C>.png   histograms of per-image mean and std intensity per group of column C
  brightness_stats.csv    group_col, group, n, mean_of_means, std_of_means, mean_of_stds
  train_montage.png       up to 16 train films with their labels and metadata
  data_summary.md         the two tables above, the figures inline

Model evidence (with --weights, on --split):
  threshold_sweep.csv     label, threshold (0.01 .. 0.99), tp, fp, tn, fn, sensitivity,
                          specificity, precision, f1
  f1_threshold_sweep.png  F1, sensitivity and specificity against the threshold, per label
  model_summary.md        per label: the F1-optimal threshold and its F1/sensitivity/specificity,
                          against the same at 0.5

INDEX.md links every file written and, for each --results DIR, lists its JSON/CSV/PNG files with
the macro AUROC of any metrics_*.json or summary.json found there.
Intensities are those of the decoded-image store (letterboxed to --image-size, 0-255), the
pixels the model sees. Research and education only; not for clinical use.
"""
from __future__ import annotations

import argparse
import logging
import sys

from tools.cli import common_parser, guarded, model_options, run_options, table_options
from tools.errors import UserError

PROG = "run_evidence.py"
DEFAULT_GROUP_COLS = ("view", "site")
DEFAULT_IMAGE_SIZE = 224  # train's default, used when no checkpoint says otherwise


# ====== parser ======

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in every flag's help; the description's file table kept as written."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     parents=[common_parser("outputs/taxonomy_evidence")],
                                     formatter_class=HelpFormatter)
    ev = parser.add_argument_group("evidence")
    ev.add_argument("--group-col", nargs="+", default=None,
                    help="metadata column(s) to compare brightness across (default: view and site when present)")
    ev.add_argument("--results", nargs="+", default=[], metavar="DIR",
                    help="other results folders (eval, valtool, ...) to list in INDEX.md")
    ev.add_argument("--predictions", nargs="+", default=None,
                    help="predictions_<split>.csv from eval: their logits are reused instead of a model pass")
    return parser


# ====== main ======

def run_evidence(args) -> dict:
    from tools.model_files import ModelRequest, load_audited_model
    from tools.runtime import start_run
    from tools.splits import load_split, read_source
    from tools.stages.evidence import check_results_dirs, index_md, write_data_evidence, write_model_evidence
    from tools.table import DEFAULT_LABELS, ReadRules, header, select_split
    from tools.files import write_text

    # ====== run set-up: every user mistake found before any decoding ======
    if not args.csv:
        raise UserError("--csv is required: pass the input CSV (image_path, label columns, optional split)")
    check_results_dirs(args.results)
    run = start_run(**run_options(args, PROG))
    labels, image_size, model = args.labels or list(DEFAULT_LABELS), args.image_size or DEFAULT_IMAGE_SIZE, None
    if args.weights:
        model, info = load_audited_model(run, ModelRequest(**model_options(args)), args.labels, header(args.csv),
                                         args.compile)
        labels, image_size = info.labels, info.image_size
    source = read_source(args.csv, args.img_root, labels, args.group_col, ReadRules(**table_options(args)))
    table, group_cols = source.table, args.group_col
    if group_cols is None:
        group_cols = [c for c in DEFAULT_GROUP_COLS if c in table.columns]
    if model is not None:
        select_split(table, args.split, args.csv)
    run.config(group_cols=list(group_cols))

    # ====== data evidence on every row (pixels decoded once), model evidence on --split ======
    data = load_split(run, source, None, labels, image_size)
    written = [(run.outdir / "config.json", "arguments, versions, seed, device, checkpoint")]
    files, result = write_data_evidence(run, table, data, args.csv, labels, group_cols)
    written += files
    if model is not None:
        files, model_result = write_model_evidence(run, model, data, args.split, args.csv, labels, args.weights,
                                                   args.predictions)
        written += files
        result.update(model_result)

    # ====== index ======
    write_text(run.outdir / "INDEX.md", index_md(run.outdir, written, args.results))
    print(f"{PROG}: {len(written) + 1} files -> {run.outdir / 'INDEX.md'}")
    return result


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
    return guarded(PROG, run_evidence, args, args.outdir)


if __name__ == "__main__":
    sys.exit(main())
