"""Command-line building blocks shared by main.py and the scripts: the help formatter, the flag
groups every command has, and how every entry point ends (the exit-status guard).

A user mistake is one line on stderr and exit 2, a run that cannot go on exit 1, Ctrl-C a
one-line message and exit 130; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import sys

from tools.dicom import WINDOW_MODES
from tools.errors import RunError, UserError


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except where the help already explains a default that depends on context."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


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
    table_flags(data)
    data.add_argument("--skip-bad-images", action="store_true",
                      help="drop rows whose image cannot be decoded (with a warning and a count in config.json)")
    data.add_argument("--cache-dir", default=None,
                      help="decoded-image cache (default $CXR_CACHE_DIR or ~/.cache/cxr_suite)")
    data.add_argument("--no-cache", action="store_true", help="keep decoded images in memory only")
    data.add_argument("--dicom-window", choices=list(WINDOW_MODES), default="file",
                      help="range of a DICOM film's values shown black to white: the file's VOI LUT or first window "
                           "(file; the full BitsStored range when it has none), the full BitsStored range (bits), the "
                           "film's min to max (minmax), or its 0.5th to 99.5th percentile (percentile)")
    model = parent.add_argument_group("model")
    model.add_argument("--weights", help="model file: a checkpoint written by train (best.pt / last.pt), a torchvision "
                       "DenseNet-121 state_dict, a CheXNet model.pth.tar, a torchxrayvision DenseNet-121 state_dict "
                       "or a TorchScript archive (README: Auditing a model you did not train)")
    model.add_argument("--image-size", type=int, default=None,
                       help="model input size in px (train: 224; other commands: the checkpoint's, 224 for other "
                            "DenseNet-121 layouts)")
    model.add_argument("--model-labels", nargs="+", default=None,
                       help="names of the file's outputs in order ('' for an output not analysed) when the file "
                            "does not name them; --labels then picks the analysed ones")
    model.add_argument("--input-norm", choices=["imagenet", "xrv", "unit"], default=None,
                       help="input scaling: ImageNet mean/std, torchxrayvision's [-1024, 1024], or [0, 1] "
                            "(default: the layout's)")
    model.add_argument("--input-channels", type=int, choices=[1, 3], default=None,
                       help="input channels, the grayscale film replicated (default: the layout's)")
    model.add_argument("--model-output", choices=["logit", "prob"], default=None,
                       help="what a TorchScript model returns (default logit)")
    model.add_argument("--mc-dropout", type=float, default=None,
                       help="dropout p that MC head sampling applies (default: the checkpoint's; 0.2 for a model "
                            "trained without one)")
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


def table_flags(group) -> None:
    """--uncertain and --views: how an input table's labels and films are read (README "Other
    collections")."""
    group.add_argument("--uncertain", choices=["ignore", "zeros", "ones"], default="ignore",
                       help="what a -1 (uncertain) label value becomes: unknown and masked, 0 or 1 (Irvin et al. "
                            "2019: U-Ignore, U-Zeros, U-Ones)")
    group.add_argument("--views", choices=["frontal", "all"], default="frontal",
                       help="frontal: leave out lateral films (view LL) where the table has a view column; all: keep them")


def table_options(args) -> dict:
    """``tools.table.ReadRules``' fields from --uncertain and --views."""
    return {"uncertain": args.uncertain, "views": args.views}


def slicing_flags(parser) -> None:
    group = parser.add_argument_group("slicing")
    group.add_argument("--group-col", nargs="+", default=[], help="metadata column(s) to slice metrics by")
    group.add_argument("--min-group-size", type=int, default=30, help="groups smaller than this are flagged small")
    group.add_argument("--bootstrap", type=int, default=1000,
                       help="bootstrap resamples for 95%% intervals (patients when patient_id exists); 0 = off")


def discovery_flags(parser, optional: bool) -> None:
    """Slice discovery, shortcut probes and label issues (``main.py discover``; valtool runs them
    unless ``--no-discover``)."""
    group = parser.add_argument_group("discovery")
    group.add_argument("--discover-split", default="val",
                       help="split the slice mixtures are fitted on (slices are then scored on --split)")
    group.add_argument("--label-audit-folds", type=int, default=0, metavar="K",
                       help="also audit the labels of --audit-split with heads cross-fitted on K folds (0 = off)")
    group.add_argument("--audit-split", default="train", help="split the cross-fitted label audit reads")
    if optional:
        group.add_argument("--no-discover", action="store_true", help="skip slice discovery, probes and label issues")


def drift_flags(parser) -> None:
    """valtool --image-dir against the labelled data the model was validated on (drift/)."""
    group = parser.add_argument_group("new site (with --image-dir)")
    group.add_argument("--reference", default=None, metavar="CSV",
                       help="labelled CSV the model was validated on: is the folder like it, and what performance to "
                            "expect (default: the training CSV and validation split the checkpoint records, if still there)")
    group.add_argument("--reference-split", default="val",
                       help="split of --reference to compare with (a CSV without a split column: every row)")
    group.add_argument("--reference-root", default=None,
                       help="folder that --reference's image_path values are relative to (default: --img-root)")
    group.add_argument("--drift-permutations", type=int, default=200,
                       help="permutations of each drift test (domain classifier and MMD)")


def uncertainty_flags(parser, reuse: bool) -> None:
    """``reuse``: also --test-split (calibrate and selective; valtool reports --split)."""
    group = parser.add_argument_group("calibration and uncertainty")
    group.add_argument("--val-split", default="val",
                       help="the split that chose the checkpoint; the temperature is fitted on it only when there "
                            "is no --calib-split and no 'calib' split")
    group.add_argument("--calib-split", default=None,
                       help="split the temperature is fitted on (default: 'calib' when the CSV has it, else --val-split)")
    if reuse:
        group.add_argument("--test-split", default=None, help="split that is reported (default: --split)")
        group.add_argument("--bootstrap", type=int, default=1000,
                           help="patient bootstrap resamples for the intervals (95%%); 0 = off")
    group.add_argument("--mc-samples", type=int, default=20, help="MC-Dropout samples of the head (0 = off)")
    group.add_argument("--tta-samples", type=int, default=8, help="test-time augmentation draws (0 = off)")


def prediction_flags(parser) -> None:
    """--predictions and --pred-format: analyses on predictions, with or without a model."""
    group = parser.add_argument_group("predictions")
    group.add_argument("--predictions", nargs="+", default=None, metavar="CSV",
                       help="predictions CSV(s) (one per split, or one with every split): image_path and "
                            "<label>_prob or <label>_logit columns. Without --weights the analyses run on them "
                            "alone (images are not read); with --weights they stand in for the clean model pass")
    group.add_argument("--pred-format", choices=["prob", "logit"], default=None,
                       help="read <label>_prob or <label>_logit columns (default: logits when present)")


def model_options(args) -> dict:
    """``tools.model_files.ModelRequest``'s fields from the model flags."""
    if args.mc_dropout is not None and not 0.0 <= args.mc_dropout < 1.0:
        raise UserError(f"--mc-dropout {args.mc_dropout}: must be in [0, 1)")
    return {"weights": args.weights, "model_labels": args.model_labels, "image_size": args.image_size,
            "input_norm": args.input_norm, "input_channels": args.input_channels,
            "model_output": args.model_output, "mc_dropout": args.mc_dropout}


def run_options(args, command: str) -> dict:
    """``tools.runtime.start_run``'s keyword arguments from the common flags (checked here, so a
    bad value stops the run before any work)."""
    if args.image_size is not None and args.image_size < 32:
        raise UserError(f"--image-size {args.image_size}: must be at least 32 (DenseNet-121 downsamples 32x)")
    return {"outdir": args.outdir, "device": args.device, "precision": args.precision, "seed": args.seed,
            "cache_dir": args.cache_dir, "no_cache": args.no_cache, "dicom_window": args.dicom_window,
            "batch_size": args.batch_size,
            "num_workers": args.num_workers, "skip_bad_images": args.skip_bad_images, "compile": args.compile,
            "command": command, "settings": vars(args)}


def guarded(prog: str, func, args, outdir=None) -> int:
    """Call ``func(args)`` and turn the expected failures into an exit status."""
    debug = getattr(args, "debug", False)
    try:
        func(args)
    except (UserError, RunError) as exc:
        if debug:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UserError) else 1
    except KeyboardInterrupt:
        if debug:
            raise
        where = f"; files already written under {outdir} are complete" if outdir else ""
        print(f"{prog}: interrupted{where}", file=sys.stderr)
        return 130
    return 0
