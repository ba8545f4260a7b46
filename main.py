#!/usr/bin/env python
"""Chest X-ray failure-analysis suite: train / eval / stress / calibrate / selective / valtool.

Research and education only; not for clinical use. Flags, files and keys: README.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import numpy as np

from tools.cli import guarded

log = logging.getLogger("cxr")



class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except where the help already explains a default that depends on context."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


# Kept in step with tools.corruptions.SEVERITIES (a test checks), so --help needs no heavy imports.
CORRUPTION_NAMES = ("gaussian_noise", "gaussian_blur", "jpeg", "brightness_contrast")


# ====== parser ======

def common_parser(outdir: str | None = None) -> argparse.ArgumentParser:
    """Flags shared by every subcommand (SPEC "Common flags"); ``outdir``: the default output
    folder of a script with one job (the subcommands default to outputs/<command>)."""
    parent = argparse.ArgumentParser(add_help=False)
    data = parent.add_argument_group("data")
    data.add_argument("--csv", help="input CSV (image_path, one 0/1 column per label, optional split, metadata)")
    data.add_argument("--img-root", default=".", help="folder that image_path values are relative to")
    data.add_argument("--labels", nargs="+", default=None,
                      help="label columns (default: the checkpoint's with --weights, else Cardiomegaly Edema Effusion)")
    data.add_argument("--split", default="test", help="which split's rows to use")
    data.add_argument("--skip-bad-images", action="store_true",
                      help="drop rows whose image cannot be decoded (with a warning and a count in config.json)")
    data.add_argument("--cache-dir", default=None,
                      help="decoded-image cache (default $CXR_CACHE_DIR or ~/.cache/cxr_suite)")
    data.add_argument("--no-cache", action="store_true", help="keep decoded images in memory only")
    model = parent.add_argument_group("model")
    model.add_argument("--weights", help="checkpoint written by train (best.pt / last.pt)")
    model.add_argument("--image-size", type=int, default=None,
                       help="model input size in px (train: 224; other commands: the checkpoint's)")
    run = parent.add_argument_group("run")
    where = "%(default)s" if outdir else "outputs/<command>"
    run.add_argument("--outdir", default=outdir, help=f"output folder (default {where})")
    run.add_argument("--batch-size", type=int, default=None,
                     help="batch size per process (train: 16; inference: 16 on the CPU, 64 on CUDA)")
    run.add_argument("--num-workers", type=int, default=None,
                     help="loader processes (default: spare cores, at most 8, to decode; none for passes over "
                          "decoded pixels on the CPU)")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when available")
    run.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                     help="auto: bf16 autocast on CUDA and on CPUs with native bf16, else fp32")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the backbone (long GPU runs; compiling costs time up front)")
    run.add_argument("--seed", type=int, default=1337, help="seeds training, bootstrap, corruptions, MC and TTA draws")
    run.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return parent


def slicing_flags(parser) -> None:
    group = parser.add_argument_group("slicing")
    group.add_argument("--group-col", nargs="+", default=[], help="metadata column(s) to slice metrics by")
    group.add_argument("--min-group-size", type=int, default=30, help="groups smaller than this are flagged small")
    group.add_argument("--bootstrap", type=int, default=1000,
                       help="bootstrap resamples for 95%% intervals (patients when patient_id exists); 0 = off")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="main.py", description=__doc__, formatter_class=Formatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = common_parser()

    train = sub.add_parser("train", parents=[common], formatter_class=Formatter,
                           help="train DenseNet-121 (best.pt by validation macro AUROC)")
    opt = train.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=10)
    opt.add_argument("--lr", type=float, default=1e-4)
    opt.add_argument("--weight-decay", type=float, default=1e-2)
    opt.add_argument("--dropout", type=float, default=0.2, help="dropout before the head (MC-Dropout samples it)")
    opt.add_argument("--pretrained", default="imagenet",
                     help="imagenet (from the local torch cache), none, or a weights file PATH")
    opt.add_argument("--auto-split", nargs=3, type=float, metavar=("TRAIN", "VAL", "TEST"),
                     help="make a patient-grouped split with these fractions (written to <outdir>/splits.csv)")
    opt.add_argument("--resume", action="store_true", help="continue from <outdir>/last.pt")

    ev = sub.add_parser("eval", parents=[common], formatter_class=Formatter,
                        help="metrics, predictions, ROC/PR curves, slices with intervals")
    slicing_flags(ev)

    st = sub.add_parser("stress", parents=[common], formatter_class=Formatter,
                        help="metrics under noise, blur, JPEG, brightness/contrast at 3 severities")
    st.add_argument("--corruptions", nargs="+", choices=list(CORRUPTION_NAMES), default=list(CORRUPTION_NAMES))
    st.add_argument("--group-col", nargs="+", default=[], help="also write stress_by_<C>.csv per column")
    st.add_argument("--bootstrap", type=int, default=1000,
                    help="paired bootstrap resamples for the intervals of each drop (patients when patient_id exists); 0 = off")

    cal = sub.add_parser("calibrate", parents=[common], formatter_class=Formatter,
                         help="temperature scaling, ECE, reliability diagrams, MC-Dropout, TTA")
    uncertainty_flags(cal, reuse=True)
    cal.add_argument("--per-label", action="store_true", help="one temperature per label")

    sel = sub.add_parser("selective", parents=[common], formatter_class=Formatter,
                         help="risk-coverage, AURC and coverage at target risks")
    uncertainty_flags(sel, reuse=True)
    sel.add_argument("--confidence", choices=["maxprob", "calibrated", "mc_std", "tta_std", "all"],
                     default="maxprob", help="what ranks the decisions (lower spread = more confident)")
    sel.add_argument("--per-label", action="store_true", help="one temperature per label for 'calibrated'")
    sel.add_argument("--calibrated", help="predictions_calibrated_<split>.csv from calibrate: every signal is "
                     "read from it and the model is not run")

    vt = sub.add_parser("valtool", parents=[common], formatter_class=Formatter,
                        help="the whole suite on a labelled CSV or an unlabelled folder, with report.html")
    vt.add_argument("--image-dir", help="unlabelled folder, searched recursively for png/jpg/jpeg")
    slicing_flags(vt)
    uncertainty_flags(vt, reuse=False)
    vt.add_argument("--corruptions", nargs="+", choices=list(CORRUPTION_NAMES), default=list(CORRUPTION_NAMES))
    vt.add_argument("--case-label", default=None, help="label for the case-study panels (default: the last label)")
    return parser


def uncertainty_flags(parser, reuse: bool) -> None:
    """``reuse``: also --test-split and --predictions (calibrate and selective; valtool reports
    --split from its own clean pass)."""
    group = parser.add_argument_group("calibration and uncertainty")
    group.add_argument("--val-split", default="val", help="split the temperature is fitted on")
    if reuse:
        group.add_argument("--test-split", default=None, help="split that is reported (default: --split)")
    group.add_argument("--mc-samples", type=int, default=20, help="MC-Dropout samples of the head (0 = off)")
    group.add_argument("--tta-samples", type=int, default=8, help="test-time augmentation draws (0 = off)")
    if reuse:
        group.add_argument("--predictions", nargs="+", default=None,
                           help="predictions_<split>.csv from eval: their logits are reused instead of a model pass")


# ====== train ======

def cmd_train(args) -> None:
    from tools.training import train

    if args.image_size is None:
        args.image_size = 224
    if args.labels is None:
        args.labels = ["Cardiomegaly", "Edema", "Effusion"]
    train(args)


# ====== eval ======

def cmd_eval(args) -> None:
    from tools import pipeline, reports

    run = pipeline.start_run(args)
    model, _ = pipeline.load_checkpoint_model(run)
    table = pipeline.read_input_table(args)
    data = pipeline.load_split(run, table, args.split)
    logits = pipeline.clean_pass(run, model, data)["logits"]
    reports.write_evaluation(run, data, logits)


# ====== stress ======

def cmd_stress(args) -> None:
    from tools import pipeline, stress

    run = pipeline.start_run(args)
    model, _ = pipeline.load_checkpoint_model(run)
    data = pipeline.load_split(run, pipeline.read_input_table(args), args.split)
    clean_logits = pipeline.clean_pass(run, model, data, desc="clean")["logits"]
    results = stress.corrupted_logits(run, model, data, args.corruptions)
    stress.write_stress(run, data, clean_logits, results)


# ====== calibrate ======

def cmd_calibrate(args) -> None:
    from tools import pipeline, reports, uncertainty
    from tools.calibration import fit_temperature

    run = pipeline.start_run(args)
    model, _ = pipeline.load_checkpoint_model(run)
    table = pipeline.read_input_table(args)
    test = pipeline.load_split(run, table, args.test_split or args.split)
    val = pipeline.load_split(run, table, args.val_split)
    # ====== one clean pass per split; backbone features kept for MC-Dropout ======
    test_out = pipeline.split_logits(run, model, test, features=args.mc_samples > 0, desc="test")
    val_logits = pipeline.split_logits(run, model, val, desc="val")["logits"]
    temperature = fit_temperature(val_logits, val.y, per_label=args.per_label)
    mc, tta = uncertainty.spread(run, model, test, test_out.get("features"), test.y)
    reports.write_calibration(run, test, test_out["logits"], temperature, mc, tta, fitted_on=args.val_split)


# ====== selective ======

def cmd_selective(args) -> None:
    from tools import pipeline, reports, signals

    run = pipeline.start_run(args)
    wanted = ["maxprob", "calibrated", "mc_std", "tta_std"] if args.confidence == "all" else [args.confidence]
    if args.calibrated:
        data, probs, signals = signals.from_calibrated_csv(run, args.calibrated, wanted)
    else:
        data, probs, signals = signals.from_model(run, wanted)
    reports.write_selective(run, data, probs, signals, primary=wanted[0])


# ====== valtool ======

def cmd_valtool(args) -> None:
    from tools import pipeline, valtool

    run = pipeline.start_run(args)
    valtool.run_valtool(run)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "stress": cmd_stress, "calibrate": cmd_calibrate,
            "selective": cmd_selective, "valtool": cmd_valtool}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.outdir is None:
        args.outdir = f"outputs/{args.command}"
    # Under torchrun only rank 0 narrates; the others speak up for warnings and errors.
    quiet = int(os.environ.get("RANK", "0")) > 0
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s",
                        stream=sys.stderr, force=True)
    start, status = time.perf_counter(), None
    try:
        status = guarded(f"main.py {args.command}", COMMANDS[args.command], args, args.outdir)
    finally:
        from tools import distributed

        distributed.shutdown(succeeded=status == 0)
    if status:
        return status
    log.info("%s done in %.1f s -> %s", args.command, time.perf_counter() - start, args.outdir)
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    sys.exit(main())
