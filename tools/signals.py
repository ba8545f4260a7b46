"""Confidence signals that rank decisions for selective prediction, gathered either from the
model (clean pass, temperature fitted on the validation split, MC-Dropout, TTA) or from
calibrate's ``predictions_calibrated_<split>.csv`` without running the model."""
from __future__ import annotations

from pathlib import Path


from tools import pipeline, uncertainty
from tools.calibration import apply_temperature, fit_temperature
from tools.data import label_matrix, read_table
from tools.errors import UserError
from tools.metrics import sigmoid
from tools.model import read_checkpoint
from tools.selective import confidence_from_probs, confidence_from_spread

# signal -> column suffix in predictions_calibrated_<split>.csv
CSV_COLUMNS = {"maxprob": "prob_uncal", "calibrated": "prob", "mc_std": "mc_std", "tta_std": "tta_std"}


def from_calibrated_csv(run, path, wanted):
    """(data, clean probabilities, {signal: confidence}) from calibrate's CSV."""
    args = run.args
    if not args.labels and args.weights:
        args.labels = list(read_checkpoint(args.weights)["labels"])
    if not args.labels:
        raise UserError("--calibrated needs --labels (or --weights to read them from the checkpoint)")
    df = read_table(path, args.labels)
    data = pipeline.SplitData(Path(path).stem.removeprefix("predictions_calibrated_"), df, [], label_matrix(df, args.labels), None)

    def columns(suffix, signal):
        cols = [f"{lbl}_{suffix}" for lbl in args.labels]
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise UserError(f"--calibrated {path}: column(s) {', '.join(missing)} not found; rerun calibrate "
                            f"with the sampler for {signal} turned on")
        return df[cols].to_numpy(float)

    probs = columns(CSV_COLUMNS["maxprob"], "maxprob")
    signals = {}
    for name in wanted:
        values = columns(CSV_COLUMNS[name], name)
        signals[name] = confidence_from_spread(values) if name.endswith("_std") else confidence_from_probs(values)
    return data, probs, signals


def from_model(run, wanted):
    """(data, clean probabilities, {signal: confidence}) running only the passes the signals need."""
    args = run.args
    model, _ = pipeline.load_checkpoint_model(run)
    table = pipeline.read_input_table(args)
    data = pipeline.load_split(run, table, args.test_split or args.split)
    out = pipeline.split_logits(run, model, data, features="mc_std" in wanted, desc="test")
    probs = sigmoid(out["logits"])
    signals = {}
    for name in wanted:
        if name == "maxprob":
            signals[name] = confidence_from_probs(probs)
        elif name == "calibrated":
            val = pipeline.load_split(run, table, args.val_split)
            val_logits = pipeline.split_logits(run, model, val, desc="val")["logits"]
            temperature = fit_temperature(val_logits, val.y, per_label=args.per_label)
            signals[name] = confidence_from_probs(sigmoid(apply_temperature(out["logits"], temperature)))
        elif name == "mc_std":
            _require(args.mc_samples, "--mc-samples", name)
            std = uncertainty.mc_dropout_probs(run, model, out["features"], args.mc_samples).std(0)
            signals[name] = confidence_from_spread(std)
        elif name == "tta_std":
            _require(args.tta_samples, "--tta-samples", name)
            signals[name] = confidence_from_spread(uncertainty.tta_probs(run, model, data, args.tta_samples).std(0))
    return data, probs, signals


def _require(samples, flag, name):
    if samples <= 0:
        raise UserError(f"--confidence {name} needs {flag} > 0")


