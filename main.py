#!/usr/bin/env python
"""Chest X-ray failure-analysis suite: train / eval / stress / calibrate / selective / valtool / compare / discover.

Research and education only; not for clinical use. Flags, files and keys: README.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import numpy as np

from tools.cli import (Formatter, common_parser, discovery_flags, drift_flags, guarded, model_options, prediction_flags,
                       run_options, slicing_flags, table_options, uncertainty_flags)
from tools.corruptions import CHOICES as CORRUPTION_CHOICES
from tools.corruptions import FAMILIES, SEVERITIES, corruption_names
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
    opt.add_argument("--auto-split", nargs="+", type=float, metavar="FRACTION",
                     help="make a patient-grouped split: TRAIN VAL TEST, or TRAIN VAL CALIB TEST to set a split aside "
                          "for the temperature (written to <outdir>/splits.csv)")
    opt.add_argument("--resume", action="store_true", help="continue from <outdir>/last.pt")

    ev = sub.add_parser("eval", parents=[common], formatter_class=Formatter,
                        help="metrics, predictions, ROC/PR curves, slices with intervals")
    prediction_flags(ev)
    slicing_flags(ev)

    st = sub.add_parser("stress", parents=[common], formatter_class=Formatter,
                        help="metrics under image corruptions (noise, blur, JPEG, brightness/contrast; acquisition "
                             "faults) at 3 severities")
    prediction_flags(st)
    corruption_flag(st)
    st.add_argument("--group-col", nargs="+", default=[], help="also write stress_by_<C>.csv per column")
    st.add_argument("--bootstrap", type=int, default=1000,
                    help="paired bootstrap resamples for the intervals of each drop (patients when patient_id exists); 0 = off")

    cal = sub.add_parser("calibrate", parents=[common], formatter_class=Formatter,
                         help="temperature scaling, ECE, reliability diagrams, MC-Dropout, TTA")
    prediction_flags(cal)
    uncertainty_flags(cal, reuse=True)
    cal.add_argument("--per-label", action="store_true", help="one temperature per label")

    sel = sub.add_parser("selective", parents=[common], formatter_class=Formatter,
                         help="risk-coverage, AURC and coverage at target risks")
    prediction_flags(sel)
    uncertainty_flags(sel, reuse=True)
    sel.add_argument("--confidence", choices=["maxprob", "calibrated", "mc_std", "tta_std", "all"],
                     default="maxprob", help="what ranks the decisions (lower spread = more confident)")
    sel.add_argument("--per-label", action="store_true", help="one temperature per label for 'calibrated'")
    sel.add_argument("--calibrated", help="predictions_calibrated_<split>.csv from calibrate: every signal is "
                     "read from it and the model is not run")

    vt = sub.add_parser("valtool", parents=[common], formatter_class=Formatter,
                        help="the whole suite on a labelled CSV or an unlabelled folder, with report.html")
    vt.add_argument("--image-dir", help="unlabelled folder, searched recursively for png/jpg/jpeg")
    prediction_flags(vt)
    slicing_flags(vt)
    uncertainty_flags(vt, reuse=False)
    corruption_flag(vt)
    vt.add_argument("--case-label", default=None, help="label for the case-study panels (default: the last label)")
    vt.add_argument("--compare-with", default=None, metavar="A",
                    help="a reference model (file or predictions CSV): the report compares the audited model with it")
    vt.add_argument("--internal", default=None, metavar="METRICS_JSON",
                    help="the model's metrics on its own test split (metrics_test.json written by eval): the report "
                         "compares them with this data's, label by label (internal vs external)")
    discovery_flags(vt, optional=True)
    drift_flags(vt)

    dis = sub.add_parser("discover", parents=[common], formatter_class=Formatter,
                         help="failures no column names: slices found on the features, shortcut probes, label issues")
    discovery_flags(dis, optional=False)
    dis.add_argument("--bootstrap", type=int, default=1000,
                     help="patient bootstrap resamples for the intervals (95%%); 0 = off")

    cmp = sub.add_parser("compare", parents=[common], formatter_class=Formatter,
                         help="is model B better than model A, and where? paired bootstrap per label and slice")
    cmp.add_argument("--a", required=True, help="model A: a model file or a predictions CSV")
    cmp.add_argument("--b", required=True, help="model B: a model file or a predictions CSV")
    cmp.add_argument("--pred-format", choices=["prob", "logit"], default=None,
                     help="for a predictions CSV: read <label>_prob or <label>_logit (default: logits when present)")
    slicing_flags(cmp)
    return parser


def corruption_flag(parser) -> None:
    families = "; ".join(f"{name}: {' '.join(members)}" for name, members in FAMILIES.items())
    parser.add_argument("--corruptions", nargs="+", choices=CORRUPTION_CHOICES, default=["default"], metavar="NAME",
                        help=f"families ({families}), all, or single names ({' '.join(SEVERITIES)}); "
                             "default: the default family")


# ====== shared steps ======

def start(args):
    """The run of this command (output folder, device, config.json)."""
    from tools.runtime import start_run

    return start_run(**run_options(args, args.command))


def read_rules(args):
    """How the input table is read (``tools.table.ReadRules``): --uncertain and --views."""
    from tools.table import ReadRules

    return ReadRules(**table_options(args))


def subject_of(run, args):
    """What the command audits (``tools.audit.Subject``): ``--weights`` or ``--predictions``."""
    from tools.audit import open_subject
    from tools.model_files import ModelRequest

    return open_subject(run, ModelRequest(**model_options(args)), getattr(args, "predictions", None),
                        getattr(args, "pred_format", None), args.csv,
                        args.img_root, args.labels, getattr(args, "group_col", ()), args.compile, read_rules(args))


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
    train(run, read_source(args.csv, args.img_root, labels, rules=read_rules(args)), labels, image_size, recipe,
          fractions=args.auto_split, resume=args.resume)


# ====== eval ======

def cmd_eval(args) -> None:
    from tools.stages.evaluate import write_evaluation

    run = start(args)
    subject = subject_of(run, args)
    data = subject.split(run, args.split)
    logits = subject.logits(run, data)["logits"]
    write_evaluation(run, data, logits, subject.labels, args.group_col, args.min_group_size, args.bootstrap)


# ====== stress ======

def cmd_stress(args) -> None:
    from tools.inference import corrupted_logits
    from tools.stages.stress import write_stress

    run = start(args)
    subject = subject_of(run, args)
    if subject.model is None:
        raise UserError("stress needs the model: pass --weights (a model file); predictions alone cannot be corrupted")
    data = subject.split(run, args.split)
    clean_logits = subject.logits(run, data, desc="clean")["logits"]
    results = corrupted_logits(run, subject.model, data, corruption_names(args.corruptions))
    write_stress(run, data, clean_logits, results, subject.labels, args.group_col, args.bootstrap)


# ====== calibrate ======

def cmd_calibrate(args) -> None:
    from tools.stages.calibrate import calibration_split, samplers, spread, temperature_fit, write_calibration

    run = start(args)
    subject = subject_of(run, args)
    test = subject.split(run, args.test_split or args.split)
    fit_split = calibration_split(subject.source.table, args.calib_split, args.val_split)
    mc_samples, tta_samples, not_run = samplers(subject, args.mc_samples, args.tta_samples)
    # ====== one clean pass per split; backbone features kept for MC-Dropout ======
    test_out = subject.logits(run, test, features=mc_samples > 0, desc="test")
    fit = temperature_fit(run, subject, fit_split, args.per_label)
    mc, tta = spread(run, subject.model, test, test_out.get("features"), subject.labels, mc_samples, tta_samples)
    write_calibration(run, test, test_out["logits"], subject.labels, fit, mc, tta, not_run=not_run,
                      bootstrap=args.bootstrap)


# ====== selective ======

def cmd_selective(args) -> None:
    from tools.model_files import ModelRequest, read_model_file
    from tools.stages.calibrate import calibration_split
    from tools.stages.selective import (SIGNALS, available_signals, from_calibrated_csv, signals_from_model,
                                        write_selective)

    run = start(args)
    wanted = list(SIGNALS) if args.confidence == "all" else [args.confidence]
    if args.calibrated:
        labels = args.labels or (read_model_file(ModelRequest(**model_options(args)))[1].model_labels
                                 if args.weights else None)
        if not labels:
            raise UserError("--calibrated needs --labels (or --weights to read them from the model file)")
        data, probs, signals = from_calibrated_csv(args.calibrated, labels, wanted, read_rules(args))
    else:
        subject = subject_of(run, args)
        labels, wanted = subject.labels, available_signals(subject, wanted)
        data = subject.split(run, args.test_split or args.split)
        fit_split = (calibration_split(subject.source.table, args.calib_split, args.val_split)
                     if "calibrated" in wanted else None)
        probs, signals = signals_from_model(run, subject, data, wanted, fit_split, args.per_label,
                                            args.mc_samples, args.tta_samples)
    write_selective(run, data, probs, labels, signals, primary=wanted[0], bootstrap=args.bootstrap)


# ====== valtool ======

def cmd_valtool(args) -> None:
    from tools.valtool import ValtoolOptions, run_valtool

    from tools.model_files import ModelRequest

    run = start(args)
    opts = ValtoolOptions(model=ModelRequest(**model_options(args)), csv=args.csv, image_dir=args.image_dir,
                          img_root=args.img_root, labels=args.labels, split=args.split, val_split=args.val_split,
                          calib_split=args.calib_split,
                          group_cols=args.group_col, min_group_size=args.min_group_size, bootstrap=args.bootstrap,
                          mc_samples=args.mc_samples, tta_samples=args.tta_samples,
                          corruptions=corruption_names(args.corruptions),
                          case_label=args.case_label, predictions=args.predictions, pred_format=args.pred_format,
                          compare_with=args.compare_with, discover=not args.no_discover,
                          discover_split=args.discover_split, label_audit_folds=args.label_audit_folds,
                          audit_split=args.audit_split, internal=args.internal, rules=read_rules(args),
                          reference=args.reference, reference_split=args.reference_split,
                          reference_root=args.reference_root, drift_permutations=args.drift_permutations)
    run_valtool(run, opts, compile=args.compile)


# ====== discover ======

def cmd_discover(args) -> None:
    from tools.stages.discover import discovery_passes, write_discovery

    if not args.weights:
        raise UserError("discover needs the model's penultimate features: pass --weights (a model file)")
    run = start(args)
    subject = subject_of(run, args)
    if subject.missing("features"):
        raise UserError(f"discover {subject.missing('features')}; pass a checkpoint or a state_dict as --weights")
    data = subject.split(run, args.split)
    passes = discovery_passes(run, subject, args.split, args.discover_split, args.audit_split, args.label_audit_folds)
    out = subject.logits(run, data, features=True, desc=args.split)
    write_discovery(run, data, out["logits"], out["features"], subject.labels, passes, bootstrap=args.bootstrap,
                    audit_folds=args.label_audit_folds)


# ====== compare ======

def cmd_compare(args) -> None:
    from tools.model_files import ModelRequest
    from tools.splits import table_split
    from tools.stages.compare import open_side, side_logits, write_compare

    run = start(args)
    request = ModelRequest(**model_options(args))
    a = open_side(run, args.a, request, args.pred_format, args.csv, args.img_root, args.labels, args.group_col,
                  read_rules(args))
    b = open_side(run, args.b, request, args.pred_format, args.csv, args.img_root, args.labels or a.labels,
                  args.group_col, read_rules(args))
    run.config(a=a.describe(), b=b.describe())
    data = table_split(b.source, args.split, b.labels)
    write_compare(run, data, side_logits(run, a, data), side_logits(run, b, data), b.labels, a.describe(),
                  b.describe(), args.group_col, args.bootstrap)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "stress": cmd_stress, "calibrate": cmd_calibrate,
            "selective": cmd_selective, "valtool": cmd_valtool, "compare": cmd_compare, "discover": cmd_discover}


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
