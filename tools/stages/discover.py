"""The discover stage: slices no column names, shortcut probes and label issues (``tools.discover``),
written as ``slices.csv``, ``slice_members.csv``, ``shortcut_probes.csv``,
``property_label_auroc.csv``, ``label_issues.csv`` (and ``label_issues_<train-split>.csv`` with
``--label-audit-folds``), ``slice_<k>.png``, ``shortcut_<column>.png`` (Grad-CAM on a shortcut
risk's group), ``label_issues.png`` and ``discover_summary.json``. Shared by ``main.py discover``
and valtool. Model passes (features of the discover split and, for the label audit, of the
training split) run on every rank; the analyses, the Grad-CAM maps and the files on rank 0.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from tools import discover as dsc
from tools import distributed, figures
from tools.audit import Subject
from tools.calibration import apply_temperature, fit_temperature, none_if_nan
from tools.errors import UserError
from tools.files import write_csv, write_json
from tools.findings import ALPHA, p_text
from tools.gradcam import film_gradcam, overlay
from tools.image_stats import PROPERTIES, image_properties
from tools.metrics import sigmoid
from tools.runtime import Run
from tools.slicing import group_metrics, group_values
from tools.splits import SplitData
from tools.stats import bh_qvalues

log = logging.getLogger("cxr")

MONTAGE_FILMS = 8      # most typical members shown per slice
ATTENTION_FILMS = 16   # films per side whose Grad-CAM is measured for a shortcut risk
ISSUE_FILMS = 12       # top label-issue candidates shown
SLICE_COLUMNS = ["slice_id", "label", "n", "metric", "value", "gap", "ci_low", "ci_high", "p_value", "q_value",
                 "top_column", "top_value", "top_share", "overall_share", "description"]


@dataclass
class Passes:
    """What the model passes gave: the analysed split's and the discover split's logits and
    features (and the training split's for the label audit)."""
    fit: SplitData
    fit_logits: np.ndarray
    fit_features: np.ndarray
    train: SplitData | None = None
    train_features: np.ndarray | None = None
    model: object = None  # for Grad-CAM of the shortcut risks; None for predictions alone


def discovery_passes(run: Run, subject: Subject, split: str | None, discover_split: str, audit_split: str | None,
                     audit_folds: int = 0) -> Passes:
    """Features of the discover split (and of ``audit_split`` for the cross-fitted label audit):
    one clean pass each, on every rank. ``split`` is the analysed split, which slices must not be
    fitted on."""
    if discover_split == split:
        raise UserError(f"--discover-split {discover_split} is the analysed --split: pick another split (val) so that "
                        "slices are not scored on the rows they were fitted on")
    if audit_folds and audit_folds < 2:
        raise UserError(f"--label-audit-folds {audit_folds}: need 2 folds or more (0 = off)")
    fit = subject.split(run, discover_split)
    out = subject.logits(run, fit, features=True, desc=discover_split)
    passes = Passes(fit, out["logits"], out["features"], model=subject.model)
    if audit_split and audit_folds:
        passes.train = subject.split(run, audit_split)
        passes.train_features = subject.logits(run, passes.train, features=True, desc=audit_split)["features"]
    return passes


def write_discovery(run: Run, data: SplitData, logits, features, labels, passes: Passes, temperature=None,
                    bootstrap: int = 1000, audit_folds: int = 0) -> dict:
    """Every analysis of ``tools.discover`` on the analysed split ``data`` (its ``logits`` and
    backbone ``features``), fitted where it must be on ``passes``; returns ``{"summary", "tests"}``,
    the tests for the failure family (slices, shortcut risks, label issues), without q-values."""
    if not distributed.is_main():
        return {"summary": None, "tests": []}
    seed = run.seed
    probs, fit_probs = sigmoid(logits), sigmoid(passes.fit_logits)
    if temperature is None:  # the label-issue test needs calibrated probabilities: fit on the discover split
        temperature = fit_temperature(passes.fit_logits, passes.fit.y)
    calibrated = sigmoid(apply_temperature(logits, temperature))
    reducer = dsc.fit_reducer(np.vstack([passes.fit_features, features]))
    z, z_fit = reducer(features), reducer(passes.fit_features)
    props = image_properties(data.paths, data.store)
    columns = dsc.describable_columns(data.df, labels, data.y)

    # ====== slices ======
    names = data.df["image_path"].astype(str).tolist()  # as the CSV names them, not resolved
    slices = dsc.discover_slices(z_fit, passes.fit.y, fit_probs, labels, seed=seed)
    members, typical = dsc.assign(slices, z)
    rows, tests, member_rows = [], [], []
    for k, (s, member) in enumerate(zip(slices, members), start=1):
        row, test = _slice_row(k, s, member, data, probs, labels, columns, props, bootstrap, seed)
        rows.append(row)
        tests += [test] if test else []
        member_rows += [{"image_path": names[i], "label": s.target, "slice_id": k} for i in np.flatnonzero(member)]
        _slice_montage(run, k, s, member, typical[k - 1], data, probs, labels, row)
    q = bh_qvalues([np.nan if r["p_value"] is None else r["p_value"] for r in rows])
    for r, qv in zip(rows, q):
        r["q_value"] = None if np.isnan(qv) else float(qv)
    write_csv(run.outdir / "slices.csv", pd.DataFrame(rows, columns=SLICE_COLUMNS))
    write_csv(run.outdir / "slice_members.csv", pd.DataFrame(member_rows, columns=["image_path", "label", "slice_id"]))

    # ====== shortcut probes ======
    probed = {col: group_values(data.df[col])[0] for col in columns}
    probed |= {f"image:{col}": group_values(props[col])[0] for col in PROPERTIES if props[col].nunique(dropna=True) > 1}
    probes = [dsc.shortcut_row(col, values, z, data.y, labels, data.clusters, bootstrap, seed)
              for col, values in probed.items()]
    probe_table = pd.DataFrame(probes, columns=["column", "probe_auroc", "ci_low", "ci_high", "n_groups",
                                                *[f"prevalence_gap_{lbl}" for lbl in labels], "risk", "p_value",
                                                "label", "detail"])
    write_csv(run.outdir / "shortcut_probes.csv", probe_table)
    for r in probes:
        r["attention"] = None
        if r["risk"] and passes.model is not None:
            r["attention"] = _shortcut_attention(run, passes.model, data, probs, labels, r, probed[r["column"]],
                                                 bootstrap, seed)
    tests += [{"kind": "shortcut", "column": r["column"], "label": r["label"], "value": r["probe_auroc"],
               "ci95": None if r["ci_low"] is None else [r["ci_low"], r["ci_high"]], "p_value": r["p_value"],
               "detail": r["detail"] + _attention_text(r["attention"])} for r in probes if r["p_value"] is not None]
    by_property = dsc.property_label_auroc(props, data.y, labels, data.clusters, bootstrap, seed)
    q = bh_qvalues(by_property["p_value"].astype(float).to_numpy())
    by_property["q_value"] = np.where(np.isnan(q), None, q)
    write_csv(run.outdir / "property_label_auroc.csv", by_property)

    # ====== label issues ======
    issues = _issue_table(dsc.label_issues(data.y, probs, labels), data)
    write_csv(run.outdir / "label_issues.csv", issues.drop(columns="row"))
    _issue_montage(run, issues, data)
    issue_tests = []
    for j, lbl in enumerate(labels):
        t = dsc.label_issue_test(data.y[:, j], probs[:, j], calibrated[:, j])
        issue_tests.append({"kind": "label_issue", "label": lbl, "split": data.name, **t})
    audit = _train_audit(run, passes, reducer, labels, audit_folds, seed) if audit_folds else None
    if audit is not None:
        issue_tests += audit["tests"]
    tests += [t for t in issue_tests if t["p_value"] is not None]

    summary = {"discover_split": passes.fit.name, "split": data.name, "n": len(data.df), "n_fit": len(passes.fit.df),
               "pca_components": int(reducer.components.shape[1]), "slices": rows,
               "shortcut_risks": [r for r in probes if r["risk"]], "probed_columns": [r["column"] for r in probes],
               "label_issues": {"candidates": int(len(issues)), "per_label": issue_tests,
                                "train_audit": None if audit is None else audit["summary"]},
               "temperature_for_chance": temperature}
    write_json(run.outdir / "discover_summary.json", summary)
    for line in _console_lines(rows, probes, issue_tests):
        log.info("discover: %s", line)
    return {"summary": summary, "tests": tests}


def _slice_row(k: int, s: dsc.Slice, member, data: SplitData, probs, labels, columns, props, bootstrap: int,
               seed: int) -> tuple[dict, dict | None]:
    """slices.csv's row for slice ``k`` on the analysed split and its test (None when the slice
    lacks MIN_CLASS positives or negatives of its label on either side, or has no member)."""
    n = int(member.sum())
    row = {"slice_id": k, "label": s.target, "n": n, "metric": "auroc", "value": None, "gap": None, "ci_low": None,
           "ci_high": None, "p_value": None, "q_value": None, "top_column": None, "top_value": None,
           "top_share": None, "overall_share": None, "description": None}
    test = None
    if 0 < n < len(member):
        side = pd.DataFrame({"slice": np.where(member, "in", "rest")})
        result = group_metrics(side, data.y, probs, labels, "slice", data.clusters, 0, bootstrap, seed)
        block = result["groups"]["in"]
        gap = block["gap_to_rest"]["macro" if s.j is None else "per_class"]
        gap = gap if s.j is None else gap[s.target]
        value = block["macro" if s.j is None else "per_class"]
        value = value["auroc"] if s.j is None else value[s.target]["auroc"]
        enough = _enough(data.y, member, s.j)
        ci = (gap.get("ci95") or {}).get("auroc")
        row.update({"value": none_if_nan(value), "gap": none_if_nan(gap["auroc"]), "ci_low": ci[0] if ci else None,
                    "ci_high": ci[1] if ci else None,
                    "p_value": (gap.get("p_value") or {}).get("auroc") if enough else None})
        if row["p_value"] is not None and row["gap"] is not None:
            test = {"kind": "discovered_slice", "slice_id": k, "label": s.target, "metric": "auroc", "gap": row["gap"],
                    "ci95": ci, "p_value": row["p_value"], "n": n}
    described = dsc.over_represented(member, data.df, columns) if n else None
    if described:
        row.update({c: described[c] for c in ("top_column", "top_value", "top_share", "overall_share")})
    row["description"] = _describe(row, described, dsc.property_differences(member, props) if n else [])
    if test:
        test["description"] = row["description"]
    return row, test


def _enough(y, member, j) -> bool:
    """Both sides hold MIN_CLASS positives and negatives of the label (any label for ANY)."""
    cols = range(y.shape[1]) if j is None else [j]
    for c in cols:
        known = ~np.isnan(y[:, c])
        counts = [((side & known) & (y[:, c] == v)).sum() for side in (member, ~member) for v in (0, 1)]
        if min(counts) >= dsc.MIN_CLASS:
            return True
    return False


def _describe(row: dict, described: dict | None, props: list) -> str:
    """One line: size, the gap, the most over-represented metadata value, the two image
    properties that differ most."""
    parts = [f"{row['n']} films"]
    if row["gap"] is not None:
        ci = "" if row["ci_low"] is None else f" [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"
        metric = "macro AUROC" if row["label"] == dsc.ANY else f"{row['label']} AUROC"
        parts.append(f"{metric} {row['value']:.3f}, {row['gap']:+.3f}{ci} vs the rest")
    if described:
        parts.append(f"{described['top_column']}={described['top_value']} {described['top_share']:.0%} "
                     f"(overall {described['overall_share']:.0%}, Fisher p {p_text(described['top_p'])})")
    for prop in props[:2]:
        d = prop["std_difference"]
        d = f"d {d:+.1f}" if np.isfinite(d) else "no overlap"
        parts.append(f"{prop['property']} {prop['slice_mean']:.4g} vs {prop['rest_mean']:.4g} ({d}, p {p_text(prop['p_value'])})")
    return "; ".join(parts)


def _slice_montage(run: Run, k: int, s: dsc.Slice, member, typical, data: SplitData, probs, labels, row) -> None:
    """slice_<k>.png: the members most typical of the slice (highest membership posterior)."""
    rows = [i for i in np.argsort(-typical, kind="mergesort") if member[i]][:MONTAGE_FILMS]
    if not rows:
        return
    cols = range(len(labels)) if s.j is None else [s.j]
    titles = [f"{str(data.df['image_path'].iloc[i]).rsplit('/', 1)[-1]}\n" + " ".join(
        f"{labels[c][:4]} y={_y(data.y[i, c])} p={probs[i, c]:.2f}" for c in cols) for i in rows]
    figures.montage_figure([data.store[i] for i in rows], titles, f"discovered slice {k} ({s.target}, "
                           f"n={row['n']})", run.outdir / f"slice_{k}.png")


def _shortcut_attention(run: Run, model, data: SplitData, probs, labels, row: dict, values, bootstrap: int,
                        seed: int) -> dict:
    """Grad-CAM of a shortcut risk's label on the films of the group with its highest prevalence:
    how dense the map is in the region where that group's mean film differs most from the others'
    (``tools.discover.difference_region``, ``concentration``), on the group's films the model
    scores highest for the label against the others' highest; ``shortcut_<column>.png`` shows the
    region and the group's maps."""
    j = labels.index(row["label"])
    in_group = np.asarray(values).astype(str) == str(row["group"])
    mean_group, mean_rest = (_mean_film(data.store, np.flatnonzero(side)) for side in (in_group, ~in_group))
    region = dsc.difference_region(mean_group, mean_rest)
    order = np.argsort(-probs[:, j], kind="mergesort")
    chosen = {side: [i for i in order if in_group[i] == side][:ATTENTION_FILMS] for side in (True, False)}
    maps = {side: np.stack([film_gradcam(model, data.store[i], j, run.device) for i in rows])
            for side, rows in chosen.items()}
    out = {"column": row["column"], "group": row["group"], "label": row["label"],
           "figure": f"shortcut_{row['column'].replace(':', '_')}.png",
           "region_share_of_film": float(region.mean()),
           **dsc.attention_gap(dsc.concentration(maps[True], region), dsc.concentration(maps[False], region),
                               bootstrap, seed)}
    films = [data.store[i] for i in chosen[True][:MONTAGE_FILMS]]
    mean = np.clip(np.rint(mean_group), 0, 255).astype(np.uint8)
    titles = [f"{str(data.df['image_path'].iloc[i]).rsplit('/', 1)[-1]}\n{row['label']} p={probs[i, j]:.2f}"
              for i in chosen[True][:MONTAGE_FILMS]]
    figures.montage_figure([overlay(mean, region.astype(np.float32))] + [overlay(f, m) for f, m in zip(films, maps[True])],
                           [f"mean {row['column']}={row['group']} film: where it differs most"] + titles,
                           f"{row['column']}={row['group']} group, {row['label']} Grad-CAM "
                           f"{out['concentration_group']:.1f}x as dense in the marked region as on average "
                           f"(other films {out['concentration_rest']:.1f}x)",
                           run.outdir / out["figure"])
    return out


def _mean_film(store, rows) -> np.ndarray:
    """The pixel-wise mean (float64) of the stored films ``rows``, read one at a time."""
    total = np.zeros(store[rows[0]].shape, np.float64)
    for i in rows:
        total += store[i]
    return total / len(rows)


def _attention_text(att: dict | None) -> str:
    if not att or att["difference"] is None:
        return ""
    ci = att["ci95"] or [np.nan, np.nan]
    return (f"; {att['label']} Grad-CAM on {att['column']}={att['group']} films is {att['concentration_group']:.1f}x as "
            f"dense in the {att['region_share_of_film']:.1%} of the film where they differ most as on average "
            f"(other films {att['concentration_rest']:.1f}x; difference {att['difference']:+.2f} "
            f"[{ci[0]:+.2f}, {ci[1]:+.2f}], p {p_text(att['p_value'])})")


def _y(value) -> str:
    return "?" if np.isnan(value) else str(int(value))


def _issue_table(issues: pd.DataFrame, data: SplitData) -> pd.DataFrame:
    """label_issues.csv: the rows as the CSV names their images, best candidates first (rank, then
    margin); ``row`` stays for the montage and is dropped when written."""
    names = data.df["image_path"].astype(str).to_numpy()
    out = issues.assign(image_path=names[issues["row"].to_numpy(int)])
    out = out.sort_values(["rank", "margin"], ascending=[True, False], kind="mergesort")
    return out[["image_path", "label", "given", "prob", "margin", "rank", "row"]].reset_index(drop=True)


def _issue_montage(run: Run, issues: pd.DataFrame, data: SplitData) -> None:
    """label_issues.png: the top candidates for review."""
    top = issues.head(ISSUE_FILMS)
    if not len(top):
        return
    titles = [f"{r.image_path.rsplit('/', 1)[-1]}\n{r.label}: given {r.given}, p={r.prob:.2f}" for r in top.itertuples()]
    figures.montage_figure([data.store[int(i)] for i in top["row"]], titles,
                           "label-issue candidates", run.outdir / "label_issues.png")


def _train_audit(run: Run, passes: Passes, reducer: dsc.Reducer, labels, folds: int, seed: int) -> dict | None:
    """Label issues of the training split from probabilities cross-fitted on its features (a
    logistic regression per label, ``folds`` folds grouped by patient): each row's probability
    comes from a head that did not see it (the backbone did, so fewer issues are found than with
    a model that never saw the rows)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold

    data = passes.train
    x = (passes.train_features - reducer.mean) / reducer.scale
    groups = np.unique(data.clusters.astype(str), return_inverse=True)[1].ravel()
    if len(np.unique(groups)) < folds:
        log.warning("--label-audit-folds %d: split %s has %d patients; audit not run", folds, data.name,
                    len(np.unique(groups)))
        return None
    oof = np.full(data.y.shape, np.nan)
    for j in range(len(labels)):
        known = np.flatnonzero(~np.isnan(data.y[:, j]))
        for train, test in GroupKFold(folds).split(known, groups=groups[known]):
            t = data.y[known[train], j]
            if len(np.unique(t)) < 2:
                oof[known[test], j] = t.mean()
                continue
            fit = LogisticRegression(C=0.05, max_iter=2000).fit(x[known[train]], t)
            oof[known[test], j] = fit.predict_proba(x[known[test]])[:, 1]
    issues = _issue_table(dsc.label_issues(data.y, oof, labels), data)
    write_csv(run.outdir / f"label_issues_{data.name}.csv", issues.drop(columns="row"))
    tests = [{"kind": "label_issue", "label": lbl, "split": data.name,
              **dsc.label_issue_test(data.y[:, j], oof[:, j], oof[:, j])} for j, lbl in enumerate(labels)]
    return {"tests": [t for t in tests if t["p_value"] is not None],
            "summary": {"split": data.name, "folds": folds, "candidates": int(len(issues))}}


def _console_lines(rows, probes, issue_tests) -> list[str]:
    lines = [f"slice {r['slice_id']} ({r['label']}): {r['description']}" for r in rows]
    lines += [f"shortcut risk: {r['column']}: probe AUROC {r['probe_auroc']:.3f}; {r['detail']}"
              f"{_attention_text(r['attention'])}" for r in probes if r["risk"]]
    lines += [f"label issues {t['label']} ({t['split']}): {t['count']} of {t['n']} contradicted with confidence, "
              f"{t['expected']:.1f} expected by chance (p {p_text(t['p_value'])})" for t in issue_tests
              if t["p_value"] is not None and t["p_value"] < ALPHA]
    return lines
