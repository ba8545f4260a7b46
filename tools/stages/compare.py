"""The compare stage: is model B better than model A, and where? Both sides are a model file (any
layout) or a predictions CSV, scored on the same split of the same input table.

Writes ``compare.csv`` (SPEC columns), ``compare.json`` (``a``, ``b``, ``split``, ``n``, ``rows``,
``decisions``) and ``compare_<metric>.png`` per metric.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from tabulate import tabulate

from tools import distributed, figures
from tools.audit import Subject, open_subject
from tools.compare import compare_table, decision_changes
from tools.errors import UserError
from tools.files import NOTICE, write_csv, write_json
from tools.metrics import METRICS, sigmoid
from tools.model_files import ModelRequest
from tools.runtime import Run
from tools.splits import SplitData
from tools.table import ReadRules


def is_predictions(path) -> bool:
    """A side given as a CSV is predictions; anything else is a model file."""
    return Path(path).suffix.lower() == ".csv"


def open_side(run: Run, path, request: ModelRequest, pred_format, csv, img_root, labels, group_cols=(),
              rules: ReadRules = ReadRules()) -> Subject:
    """One side of a comparison: ``path`` as a model file (with the model flags of ``request``)
    or as predictions, on the input table ``csv`` read under ``rules``."""
    if is_predictions(path):
        return open_subject(run, replace(request, weights=None), [path], pred_format, csv, img_root, labels,
                            group_cols, rules=rules)
    return open_subject(run, replace(request, weights=str(path)), None, None, csv, img_root, labels, group_cols,
                        rules=rules)


def side_logits(run: Run, side: Subject, data: SplitData) -> np.ndarray:
    """The side's logits on ``data``'s rows: a model pass over the split's pixels (at the model's
    own input size), or the predictions."""
    if side.model is None:
        return side.logits(run, data)["logits"]
    rows = side.split(run, data.name)
    if len(rows.df) != len(data.df):
        raise UserError(f"{side.describe()['file']}: {len(data.df) - len(rows.df)} image(s) of split {data.name} "
                        "could not be decoded; both models must see the same rows, so replace them and rerun")
    return side.logits(run, rows, desc=side.describe()["layout"])["logits"]


def write_compare(run: Run, data: SplitData, logits_a, logits_b, labels, a: dict, b: dict, group_cols=(),
                  n_boot: int = 1000) -> dict:
    """compare.csv, compare.json and the figures; returns compare.json's content (rank 0)."""
    if not distributed.is_main():
        return {}
    prob_a, prob_b = sigmoid(logits_a), sigmoid(logits_b)
    table = compare_table(data.y, prob_a, prob_b, labels, data.clusters, data.df, group_cols, n_boot, run.seed)
    decisions = decision_changes(data.y, prob_a, prob_b, labels)
    write_csv(run.outdir / "compare.csv", table)
    for metric in METRICS:
        figures.compare_figure(table, metric, run.outdir / f"compare_{metric}.png")
    rows = table.astype(object).where(table.notna(), None).to_dict(orient="records")
    result = {"a": a, "b": b, "split": data.name, "n": int(len(data.df)), "labels": list(labels),
              "bootstrap": n_boot, "unit": "patient" if "patient_id" in data.df.columns else "image",
              "p_values": "two-sided, from the paired bootstrap SE; p_holm: Holm over every row of the table",
              "rows": rows, "decisions": decisions, "note": NOTICE}
    write_json(run.outdir / "compare.json", result)
    shown = table[table["scope"] != "group"]
    print(f"B - A on split {data.name} (n = {len(data.df)}): A = {a['file']} ({a['layout']}), "
          f"B = {b['file']} ({b['layout']})")
    print(tabulate(shown[["label", "metric", "a", "b", "diff", "ci_low", "ci_high", "p_holm"]], headers="keys",
                   showindex=False, floatfmt=".4f", missingval="n/a"))
    print(f"decisions at 0.5: {decisions['changed']} of {decisions['pairs']} change "
          f"({decisions['fixed']} fixed, {decisions['broken']} broken)")
    return result
