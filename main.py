#!/usr/bin/env python
"""Chest X-ray failure-analysis suite: train / eval / stress / calibrate / selective / valtool.

Research and education only; not for clinical use. Contracts (flags, files, keys): SPEC.md.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

import numpy as np

from tools.errors import RunError, UserError

log = logging.getLogger("cxr")

Formatter = argparse.ArgumentDefaultsHelpFormatter


# ====== parser ======

def common_parser() -> argparse.ArgumentParser:
    """Flags shared by every subcommand (SPEC "Common flags")."""
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
    run.add_argument("--outdir", default=None, help="output folder (default outputs/<command>)")
    run.add_argument("--batch-size", type=int, default=None,
                     help="batch size per process (train: 16; inference: 64)")
    run.add_argument("--num-workers", type=int, default=None, help="loader processes (default: spare cores, at most 8)")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    run.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                     help="auto: bf16 autocast on CUDA and on CPUs with native bf16, else fp32")
    run.add_argument("--seed", type=int, default=1337)
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
    return parser


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


COMMANDS = {"train": cmd_train, "eval": cmd_eval}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.outdir is None:
        args.outdir = f"outputs/{args.command}"
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
    start = time.perf_counter()
    try:
        COMMANDS[args.command](args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"main.py {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RunError as exc:
        if args.debug:
            raise
        print(f"main.py {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"main.py {args.command}: interrupted; files already written under {args.outdir} are complete",
              file=sys.stderr)
        return 130
    finally:
        from tools import distributed

        distributed.shutdown()
    log.info("%s done in %.1f s -> %s", args.command, time.perf_counter() - start, args.outdir)
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    sys.exit(main())
