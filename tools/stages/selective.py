"""The selective stage: risk-coverage curves, AURC and coverage at target risks for each
confidence signal, all ranking the same decisions (the clean probability at 0.5)."""
from __future__ import annotations

import itertools
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from tabulate import tabulate

from tools import distributed, figures
from tools.audit import Subject
from tools.calibration import apply_temperature
from tools.errors import UserError
from tools.files import write_csv, write_json
from tools.inference import mc_dropout_logits, tta_logits
from tools.metrics import bootstrap_resamples, percentile_ci, sigmoid
from tools.predictions import signal_columns
from tools.runtime import Run
from tools.selective import (confidence_from_probs, confidence_from_spread, known_decisions, oracle_curve,
                             risk_coverage, same_ranking, selective_resamples, summary_of_curve, thin_curve)
from tools.stats import bootstrap_p
from tools.splits import SplitData
from tools.stages.calibrate import fitted_temperature
from tools.table import ReadRules, label_matrix, read_table

log = logging.getLogger("cxr")

SIGNALS = ("maxprob", "calibrated", "mc_std", "tta_std")


def confidence_signals(logits, temperature=None, mc: dict | None = None, tta: dict | None = None) -> dict:
    """{signal: confidence (N, L)}, higher = more confident: ``maxprob`` always, ``calibrated`` with
    a temperature, ``mc_std`` / ``tta_std`` with the spreads of ``tools.uncertainty.spread_stats``."""
    signals = {"maxprob": confidence_from_probs(sigmoid(logits))}
    if temperature is not None:
        signals["calibrated"] = confidence_from_probs(sigmoid(apply_temperature(logits, temperature)))
    for name, stats in (("mc_std", mc), ("tta_std", tta)):
        if stats is not None:
            signals[name] = confidence_from_spread(stats["std"])
    return signals


def from_calibrated_csv(path, labels, wanted, rules: ReadRules = ReadRules()) -> tuple[SplitData, object, dict]:
    """(data, clean probabilities, {signal: confidence}) read from calibrate's
    ``predictions_calibrated_<split>.csv`` (under ``rules``), without a model."""
    df = read_table(path, labels, rules=rules)
    data = SplitData(Path(path).stem.removeprefix("predictions_calibrated_"), df, [], label_matrix(df, labels), None)
    probs = signal_columns(df, path, labels, "maxprob")
    signals = {}
    for name in wanted:
        values = signal_columns(df, path, labels, name)
        signals[name] = confidence_from_spread(values) if name.endswith("_std") else confidence_from_probs(values)
    return data, probs, signals


def available_signals(subject: Subject, wanted) -> list:
    """The ``wanted`` signals the subject can give: MC spread needs the backbone features and TTA
    the model; asked for by name, a missing one is an error, within ``all`` it is left out."""
    needs = {"mc_std": "features", "tta_std": "model"}
    out = []
    for signal in wanted:
        why = subject.missing(needs[signal]) if signal in needs else None
        if why and len(wanted) == 1:
            raise UserError(f"--confidence {signal} {why}; use maxprob or calibrated")
        if why:
            log.warning("--confidence %s %s", signal, why)
        else:
            out.append(signal)
    return out


def signals_from_model(run: Run, subject: Subject, data: SplitData, wanted, fit_split: str | None = "val",
                       per_label: bool = False, mc_samples: int = 20, tta_samples: int = 8) -> tuple[object, dict]:
    """(clean probabilities, {signal: confidence}) of ``data``, running only the passes the
    ``wanted`` signals need (the clean logits may come from the subject's predictions)."""
    for signal, samples, flag in (("mc_std", mc_samples, "--mc-samples"), ("tta_std", tta_samples, "--tta-samples")):
        if signal in wanted and samples <= 0:
            raise UserError(f"--confidence {signal} needs {flag} > 0")
    out = subject.logits(run, data, features="mc_std" in wanted, desc="test")
    temperature = mc = tta = None
    model = subject.model
    if "calibrated" in wanted:
        temperature = fitted_temperature(run, subject, fit_split, per_label)
    if "mc_std" in wanted:
        mc = {"std": sigmoid(mc_dropout_logits(model, out["features"], mc_samples, run.seed, run.device)).std(0)}
    if "tta_std" in wanted:
        tta = {"std": sigmoid(tta_logits(run, model, data, tta_samples)).std(0)}
    signals = confidence_signals(out["logits"], temperature, mc, tta)
    return sigmoid(out["logits"]), {name: signals[name] for name in wanted}


def selective_intervals(summaries: dict, resamples: dict) -> list[dict]:
    """Attach ``aurc_ci95``, ``e_aurc_ci95`` and each coverage's ``coverage_ci95`` to every
    signal's summary; return the paired comparisons of every two signals (``aurc_diff`` = AURC of
    a minus b on the same resamples, its ``ci95`` and ``p_value``)."""
    for name, boot in resamples.items():
        summaries[name]["aurc_ci95"] = percentile_ci(boot["aurc"])
        summaries[name]["e_aurc_ci95"] = percentile_ci(boot["e_aurc"])
        for key, values in boot["coverage_at_risk"].items():
            summaries[name]["coverage_at_risk"][key]["coverage_ci95"] = percentile_ci(values)
    comparisons = []
    for a, b in itertools.combinations(list(resamples), 2):
        diff = resamples[a]["aurc"] - resamples[b]["aurc"]
        point = summaries[a]["aurc"] - summaries[b]["aurc"]
        comparisons.append({"a": a, "b": b, "aurc_diff": point, "ci95": percentile_ci(diff),
                            "p_value": bootstrap_p(point, diff)})
    return comparisons


def best_signal_sentence(summaries: dict, comparisons: list[dict]) -> str:
    """Which signal abstains best, claimed only when its paired AURC interval against every
    other signal lies below 0."""
    if len(summaries) < 2:
        return ""
    best = min(summaries, key=lambda k: summaries[k]["aurc"])
    beats = []
    for c in comparisons:
        if best in (c["a"], c["b"]) and c["ci95"] is not None:
            lo, hi = c["ci95"] if c["a"] == best else (-c["ci95"][1], -c["ci95"][0])
            beats.append(hi < 0)
    if beats and all(beats) and len(beats) == len(summaries) - 1:
        return f"{best} ranks the decisions best: its AURC is lower than every other signal's (paired 95% intervals exclude 0)"
    return (f"lowest AURC: {best}, but not lower than every other signal beyond noise (a paired 95% interval holds 0): "
            "no signal is shown to abstain best")


def write_selective(run: Run, data: SplitData, probs, labels, signals: dict, primary: str, bootstrap: int = 1000) -> dict:
    """risk_coverage_<split>.csv (the primary signal), one CSV per further signal, per-label
    curves, risk_coverage_<split>.png and selective_summary.json, with patient-bootstrap
    intervals (``bootstrap`` resamples; 0: none) and paired comparisons of the signals.

    Every signal ranks the same decisions (clean probability at 0.5), so curves compare rankings.
    ``signals`` maps a name to a confidence array (N, L): higher = more confident."""
    if not distributed.is_main():
        return {}
    y = data.y
    split = data.name or "all"
    weights = bootstrap_resamples(data.clusters, bootstrap, run.seed) if bootstrap > 0 else None
    decision_rows = np.nonzero(~np.isnan(y))[0]  # the row of each known decision, in known_decisions' order
    curves, summaries, per_label, resamples, ranked = {}, {}, [], {}, {}
    for name, confidence in signals.items():
        conf, correct = known_decisions(confidence, probs, y)  # the same decisions for every signal
        curves[name] = risk_coverage(conf, correct)
        summaries[name] = summary_of_curve(curves[name], correct)
        if weights is not None:  # a signal that ranks as an earlier one has its resamples too
            twin = next((other for other, c in ranked.items() if same_ranking(c, conf)), None)
            resamples[name] = resamples[twin] if twin else selective_resamples(conf, correct, decision_rows, weights)
            ranked[name] = conf
        summaries[name]["per_label"] = {}
        for j, lbl in enumerate(labels):
            c_j, ok_j = known_decisions(confidence[:, j], probs[:, j], y[:, j])
            curve_j = risk_coverage(c_j, ok_j)
            summaries[name]["per_label"][lbl] = summary_of_curve(curve_j, ok_j)
            if name == primary:
                per_label.append(thin_curve(curve_j).assign(label=lbl))
    comparisons = selective_intervals(summaries, resamples)
    verdict = best_signal_sentence(summaries, comparisons)
    summary = {"split": split, "confidence": primary, **summaries[primary],
               "signals": {k: v for k, v in summaries.items()}, "comparisons": comparisons, "best_signal": verdict,
               "decisions": "known (image, label) pairs at threshold 0.5; risk = error rate of kept pairs"}
    write_csv(run.outdir / f"risk_coverage_{split}.csv", thin_curve(curves[primary]))
    for name, curve in curves.items():
        if name != primary:
            write_csv(run.outdir / f"risk_coverage_{split}_{name}.csv", thin_curve(curve))
    write_csv(run.outdir / f"risk_coverage_{split}_per_label.csv", pd.concat(per_label, ignore_index=True))
    full_risk = summary["risk_at_full_coverage"]
    figures.plot_risk_coverage(curves, run.outdir / f"risk_coverage_{split}.png", f"risk-coverage ({split}, n pairs = {summary['n']})",
                       oracle=oracle_curve(correct), random_risk=full_risk)
    rows = [[name, s["aurc"], s["e_aurc"], (s["coverage_at_risk"]["0.05"] or {}).get("coverage")]
            for name, s in summaries.items()]
    print(tabulate(rows, headers=["confidence", "AURC", "E-AURC", "coverage @5% risk"], floatfmt=".4f",
                   missingval="n/a"))
    if verdict:
        print(verdict)
    write_json(run.outdir / "selective_summary.json", summary)
    return summary
