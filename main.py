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

from tools.cli import Formatter, common_parser, guarded, run_options, slicing_flags, uncertainty_flags
from tools.corruptions import SEVERITIES
from tools.errors import UserError

log = logging.getLogger("cxr")


# ====== parser ======

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
    st.add_argument("--corruptions", nargs="+", choices=list(SEVERITIES), default=list(SEVERITIES))
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
    vt.add_argument("--corruptions", nargs="+", choices=list(SEVERITIES), default=list(SEVERITIES))
    vt.add_argument("--case-label", default=None, help="label for the case-study panels (default: the last label)")
    return parser


# ====== shared steps ======

def start(args):
    """The run of this command (output folder, device, config.json)."""
    from tools.runtime import start_run

    return start_run(**run_options(args, args.command))


def model_and_data(run, args, splits):
    """The checkpoint's model, its labels and image size, the input table, and ``splits`` loaded."""
    from tools.model import load_checkpoint_model
    from tools.splits import load_split, read_source

    model, ckpt = load_checkpoint_model(run, args.weights, args.labels, args.image_size, args.compile)
    labels, image_size = list(ckpt["labels"]), int(ckpt["image_size"])
    source = read_source(args.csv, args.img_root, labels, getattr(args, "group_col", ()))
    data = [load_split(run, source, split, labels, image_size) for split in splits]
    return model, labels, image_size, source, data


# ====== train ======

def cmd_train(args) -> None:
    from tools.splits import read_source
    from tools.stages.train import Recipe, train
    from tools.table import DEFAULT_LABELS

    labels = args.labels or list(DEFAULT_LABELS)
    image_size = args.image_size or 224
    run = start(args)
    recipe = Recipe(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, dropout=args.dropout,
                    pretrained=args.pretrained, batch_size=args.batch_size or Recipe.batch_size)
    train(run, read_source(args.csv, args.img_root, labels), labels, image_size, recipe,
          fractions=args.auto_split, resume=args.resume)


# ====== eval ======

def cmd_eval(args) -> None:
    from tools.inference import clean_pass
    from tools.stages.evaluate import write_evaluation

    run = start(args)
    model, labels, _, _, (data,) = model_and_data(run, args, [args.split])
    logits = clean_pass(run, model, data)["logits"]
    write_evaluation(run, data, logits, labels, args.group_col, args.min_group_size, args.bootstrap)


# ====== stress ======

def cmd_stress(args) -> None:
    from tools.inference import clean_pass, corrupted_logits
    from tools.stages.stress import write_stress

    run = start(args)
    model, labels, _, _, (data,) = model_and_data(run, args, [args.split])
    clean_logits = clean_pass(run, model, data, desc="clean")["logits"]
    results = corrupted_logits(run, model, data, args.corruptions)
    write_stress(run, data, clean_logits, results, labels, args.group_col, args.bootstrap)


# ====== calibrate ======

def cmd_calibrate(args) -> None:
    from tools.predictions import split_logits
    from tools.stages.calibrate import fitted_temperature, spread, write_calibration

    run = start(args)
    model, labels, image_size, source, (test,) = model_and_data(run, args, [args.test_split or args.split])
    # ====== one clean pass per split; backbone features kept for MC-Dropout ======
    test_out = split_logits(run, model, test, args.predictions, labels, features=args.mc_samples > 0, desc="test")
    temperature = fitted_temperature(run, model, source, args.val_split, labels, image_size, args.per_label,
                                     args.predictions)
    mc, tta = spread(run, model, test, test_out.get("features"), labels, args.mc_samples, args.tta_samples)
    write_calibration(run, test, test_out["logits"], labels, temperature, mc, tta, fitted_on=args.val_split)


# ====== selective ======

def cmd_selective(args) -> None:
    from tools.model import read_checkpoint
    from tools.stages.selective import SIGNALS, from_calibrated_csv, signals_from_model, write_selective

    run = start(args)
    wanted = list(SIGNALS) if args.confidence == "all" else [args.confidence]
    if args.calibrated:
        labels = args.labels or (list(read_checkpoint(args.weights)["labels"]) if args.weights else None)
        if not labels:
            raise UserError("--calibrated needs --labels (or --weights to read them from the checkpoint)")
        data, probs, signals = from_calibrated_csv(args.calibrated, labels, wanted)
    else:
        split = args.test_split or args.split
        model, labels, image_size, source, (data,) = model_and_data(run, args, [split])
        probs, signals = signals_from_model(run, model, source, data, labels, image_size, wanted, args.val_split,
                                            args.per_label, args.mc_samples, args.tta_samples, args.predictions)
    write_selective(run, data, probs, labels, signals, primary=wanted[0])


# ====== valtool ======

def cmd_valtool(args) -> None:
    from tools.valtool import ValtoolOptions, run_valtool

    run = start(args)
    opts = ValtoolOptions(weights=args.weights, csv=args.csv, image_dir=args.image_dir, img_root=args.img_root,
                          labels=args.labels, image_size=args.image_size, split=args.split, val_split=args.val_split,
                          group_cols=args.group_col, min_group_size=args.min_group_size, bootstrap=args.bootstrap,
                          mc_samples=args.mc_samples, tta_samples=args.tta_samples, corruptions=args.corruptions,
                          case_label=args.case_label)
    run_valtool(run, opts, compile=args.compile)


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
    start_time, status = time.perf_counter(), None
    try:
        status = guarded(f"main.py {args.command}", COMMANDS[args.command], args, args.outdir)
    finally:
        from tools import distributed

        distributed.shutdown(succeeded=status == 0)
    if status:
        return status
    log.info("%s done in %.1f s -> %s", args.command, time.perf_counter() - start_time, args.outdir)
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    sys.exit(main())
