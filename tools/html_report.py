"""``report.html``: the valtool output folder as one page a person reads in a browser.

The page is self-contained so it can be mailed or opened offline: images are base64 data URIs,
the CSS is inline, there is no JavaScript and no external URL. Every piece of text taken from a
file goes through ``html.escape``; numbers are shown with 3 decimals and ``n/a`` for null.
Sections whose files are absent (a stage that did not run) are left out, not errors.
"""
from __future__ import annotations

import base64
import html
import json
import math
import numbers
import re
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from tools.corruptions import FAMILIES, PARAM_NAMES, param_label
from tools.errors import UserError
from tools.files import NOTICE, write_text

METRICS = ("auroc", "auprc", "f1@0.5", "sens@95spec", "sens@0.5", "spec@0.5")
METRIC_NAMES = {"auroc": "AUROC", "auprc": "AUPRC", "f1@0.5": "F1@0.5", "sens@95spec": "sens@95spec",
                "sens@0.5": "sens@0.5", "spec@0.5": "spec@0.5"}
DIGITS = 3
FINDING_KEY = re.compile(r"problem|warning|error|issue|message", re.IGNORECASE)

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1d2329;
       background: #ffffff; margin: 0; line-height: 1.45; }
main { max-width: 1120px; margin: 0 auto; padding: 16px 28px 8px; }
h1 { font-size: 1.7em; margin: 0.3em 0 0.2em; }
h2 { font-size: 1.3em; margin-top: 1.8em; padding-bottom: 0.2em; border-bottom: 2px solid #d6dde4; }
h3 { font-size: 1.05em; margin-top: 1.3em; }
.notice { background: #fff4d6; border: 1px solid #e0b84a; border-left: 6px solid #c98a00; padding: 8px 12px;
          font-weight: 600; margin: 10px 0; }
.facts { margin: 6px 0; padding: 0; list-style: none; }
.facts li { margin: 2px 0; }
.facts b { display: inline-block; min-width: 11em; }
table { border-collapse: collapse; margin: 8px 0 14px; font-size: 0.88em; }
th, td { border: 1px solid #cfd6dd; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #eef2f5; }
th.group { text-align: center; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.macro td { font-weight: 600; background: #f6f8fa; }
.scroll { overflow-x: auto; }
figure { margin: 12px 0 20px; }
figure img { max-width: 100%; height: auto; border: 1px solid #e1e6ea; }
figcaption { color: #47525c; font-size: 0.92em; margin-top: 4px; max-width: 900px; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 0.85em; font-weight: 600;
         color: #ffffff; background: #5f6b76; }
.badge-slice { background: #7b3fa0; }
.badge-corruption { background: #c2461f; }
.badge-calibration { background: #1f6fb2; }
.badge-quality { background: #2f7d4a; }
.badge-drift, .badge-propertydrift, .badge-predictiondrift, .badge-ood { background: #8a5a00; }
.muted { color: #68737d; }
.warn { color: #8a4b00; }
.verdict { font-size: 1.1em; font-weight: 600; margin: 8px 0; }
tr.invalid td { color: #9aa3ab; font-style: italic; }
details { margin: 10px 0; }
pre { background: #f6f8fa; border: 1px solid #dde3e8; padding: 10px; overflow-x: auto; font-size: 0.85em; }
footer { max-width: 1120px; margin: 24px auto 0; padding: 12px 28px 24px; border-top: 1px solid #d6dde4;
         color: #47525c; font-size: 0.9em; }
"""


# ====== small formatting helpers ======

class Html(str):
    """A string that is already HTML: table cells and joins pass it through unescaped."""


def esc(value) -> Html:
    """``value`` as text, HTML-escaped (quotes too, so it is safe inside attributes)."""
    return value if isinstance(value, Html) else Html(html.escape(str(value), quote=True))


def is_number(value) -> bool:
    """True for ints and floats (numpy scalars too), not for bools."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def fmt(value, digits: int = DIGITS, signed: bool = False) -> str:
    """A number with ``digits`` decimals (integers as integers); None/NaN as ``n/a``;
    bools as yes/no; anything else as its text."""
    if value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if is_number(value):
        if isinstance(value, numbers.Integral):
            value = int(value)
            return f"{value:+d}" if signed else str(value)
        value = float(value)
        if not math.isfinite(value):
            return "n/a"
        return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return str(value)


def as_interval(ci) -> tuple[float, float] | None:
    """``ci`` as (low, high) when it is a pair of finite numbers, else None."""
    if not isinstance(ci, (list, tuple)) or len(ci) != 2 or not all(is_number(v) for v in ci):
        return None
    lo, hi = float(ci[0]), float(ci[1])
    return (lo, hi) if math.isfinite(lo) and math.isfinite(hi) else None


def fmt_interval(ci, signed: bool = False) -> str:
    """``[0.880, 0.940]``, or ``n/a`` when there is no interval."""
    pair = as_interval(ci)
    return "n/a" if pair is None else f"[{fmt(pair[0], signed=signed)}, {fmt(pair[1], signed=signed)}]"


def fmt_ci(value, ci) -> str:
    """A point estimate with its 95% CI, ``0.912 [0.880, 0.940]``; the value alone when the CI
    is missing; ``n/a`` when the value is null."""
    text = fmt(value)
    if text == "n/a" or as_interval(ci) is None:
        return text
    return f"{text} {fmt_interval(ci)}"


def cell(value) -> Html:
    """One ``<td>``: numbers right-aligned with 3 decimals, text escaped, Html passed through."""
    if isinstance(value, Html):
        return Html(f"<td>{value}</td>")
    if value is None or is_number(value):
        return Html(f'<td class="num">{esc(fmt(value))}</td>')
    return Html(f"<td>{esc(fmt(value))}</td>")


def header_text(name) -> Html:
    """A column name, escaped, allowed to wrap after ``_`` and ``@`` so wide tables stay narrow."""
    return Html(esc(name).replace("_", "_<wbr>").replace("@", "@<wbr>"))


def table(header, rows, row_classes=None, head_html: str | None = None) -> Html:
    """An HTML table from a header list and rows of values (see ``cell``); ``head_html`` replaces
    the single header row (for grouped headers)."""
    head = head_html or "<tr>" + "".join(f"<th>{header_text(h)}</th>" for h in header) + "</tr>"
    body = []
    for i, row in enumerate(rows):
        cls = row_classes[i] if row_classes and row_classes[i] else ""
        body.append(f'<tr class="{esc(cls)}">' if cls else "<tr>")
        body.append("".join(cell(v) for v in row) + "</tr>")
    return Html(f'<div class="scroll"><table><thead>{head}</thead><tbody>{"".join(body)}</tbody></table></div>')


def label_groups(columns, labels) -> tuple[list[str], dict[str, list[str]]]:
    """Split column names into plain ones and, per label, those named ``<what>_<label>`` (the longest
    label wins, so ``auroc_Pleural_Effusion`` is not taken for label ``Effusion``)."""
    plain, grouped = [], {lbl: [] for lbl in labels}
    longest_first = sorted(labels, key=len, reverse=True)
    for col in map(str, columns):
        owner = next((lbl for lbl in longest_first if col.endswith(f"_{lbl}") and len(col) > len(lbl) + 1), None)
        (grouped[owner] if owner else plain).append(col)
    return plain, {lbl: cols for lbl, cols in grouped.items() if cols}


def frame_table(df: pd.DataFrame, labels=()) -> Html:
    """A DataFrame as a table: floats with 3 decimals, NaN as n/a. Columns ``<what>_<label>`` are
    gathered under one header per label, so a table with many labels stays readable."""
    plain, grouped = label_groups(df.columns, list(labels))
    order = plain + [c for cols in grouped.values() for c in cols]
    cells = df[order].astype(object).where(df[order].notna(), None)
    rows = list(cells.itertuples(index=False, name=None))
    if not grouped:
        return table(order, rows)
    top = "".join(f'<th rowspan="2">{header_text(c)}</th>' for c in plain) + "".join(
        f'<th colspan="{len(cols)}" class="group">{esc(lbl)}</th>' for lbl, cols in grouped.items())
    sub = "".join(f"<th>{header_text(c[: -len(lbl) - 1])}</th>" for lbl, cols in grouped.items() for c in cols)
    return table(order, rows, head_html=f"<tr>{top}</tr><tr>{sub}</tr>")


def facts(items) -> Html:
    """A list of ``name: value`` lines; values escaped unless Html."""
    lines = "".join(f"<li><b>{esc(k)}</b> {esc(v)}</li>" for k, v in items if v is not None)
    return Html(f'<ul class="facts">{lines}</ul>')


def section(title: str, parts, anchor: str) -> Html:
    """``<section>`` with an ``<h2>``; empty string when there is nothing in it."""
    parts = [p for p in parts if p]
    if not parts:
        return Html("")
    return Html(f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{"".join(parts)}</section>')


def json_details(title: str, obj) -> Html:
    """``obj`` pretty-printed as JSON in a collapsed ``<details>`` block."""
    return Html(f"<details><summary>{esc(title)}</summary><pre>{esc(json.dumps(obj, indent=2))}</pre></details>")


def note(text: str, cls: str = "muted") -> Html:
    """A paragraph of explanatory (``muted``) or warning (``warn``) text."""
    return Html(f'<p class="{cls}">{esc(text)}</p>')


# ====== reading the folder ======

def read_json_optional(path: Path):
    """The parsed JSON at ``path``, None when absent; an unreadable file becomes ``{"_error": why}``
    so the page says so instead of failing."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return {"_error": f"{path.name}: could not be read ({exc})"}


def read_csv_optional(path: Path) -> pd.DataFrame | None:
    """The CSV at ``path`` as a DataFrame, None when absent or unreadable."""
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path)
    except (OSError, ValueError):
        return None


def image_data_uri(path: Path) -> str:
    """The image file as a ``data:`` URI (PNG or JPEG by suffix), so the page needs no other file."""
    mime = "image/jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "image/png"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def figure(path: Path, caption: str) -> Html:
    """An embedded image with its caption; empty when the file is absent or unreadable."""
    if not path.is_file():
        return Html("")
    try:
        uri = image_data_uri(path)
    except OSError:
        return note(f"{path.name}: could not be read", "warn")
    return Html(f'<figure><img src="{uri}" alt="{esc(path.name)}">'
                f"<figcaption><b>{esc(path.name)}</b>: {esc(caption)}</figcaption></figure>")


def figures(folder: Path, pattern: str, caption_of) -> list[Html]:
    """Every image in ``folder`` matching ``pattern`` (sorted), captioned by ``caption_of(path)``."""
    return [figure(p, caption_of(p)) for p in sorted(folder.glob(pattern))] if folder.is_dir() else []


def other_figures(folder: Path, shown: set[str]) -> list[Html]:
    """PNGs in ``folder`` that no caption rule covered, so nothing the stage drew is hidden."""
    return [figure(p, "further plot written by this stage.")
            for p in sorted(folder.glob("*.png")) if p.name not in shown]


def error_note(obj) -> Html:
    """The read error recorded by ``read_json_optional``, if any."""
    return note(obj["_error"], "warn") if isinstance(obj, dict) and "_error" in obj else Html("")


# ====== sections ======

def header_section(summary: dict, config: dict | None, generated: str) -> Html:
    """Title, what was evaluated, when, and the notice."""
    args = (config or {}).get("args") or {}
    ckpt = (config or {}).get("checkpoint") or {}
    labels = summary.get("labels") or args.get("labels") or []
    unlabelled = summary.get("mode") == "unlabelled"
    model = args.get("weights")
    audited = summary.get("model") if isinstance(summary.get("model"), dict) else {}
    if model and ckpt:
        model = (f"{model} ({ckpt.get('arch', '?')}, epoch {fmt(ckpt.get('epoch'))}, "
                 f"image size {fmt(ckpt.get('image_size'))})")
    elif audited:
        record = audited.get("record") or {}
        spec = (f", input {record.get('input_norm')} x{record.get('input_channels')} at {record.get('image_size')} px"
                if record else "")
        model = f"{audited.get('file')} (layout: {audited.get('layout')}{spec})"
    items = [
        ("Mode", "films without labels (no ground truth)" if unlabelled else "labelled CSV"),
        ("Image folder" if summary.get("image_dir") else "CSV", summary.get("image_dir") or summary.get("csv")),
        ("Split", summary.get("split")),
        ("Images (n)", fmt(summary.get("n"))),
        ("Labels", ", ".join(map(str, labels))),
        ("Model", model),
        ("Model passes", fmt(summary.get("model_passes_over_split"))),
        ("Report date", generated),
    ]
    title = "Failure analysis report" + ("" if unlabelled else f": {summary.get('split', '')} split")
    return Html(f"<header><h1>{esc(title)}</h1>"
                f'<p class="notice">{esc(NOTICE)}</p>{facts(items)}</header>')


def headline_section(summary: dict) -> Html:
    """Per label and macro: each metric with its 95% bootstrap CI."""
    headline = summary.get("headline")
    if not headline:
        return section("Headline metrics", [note("No metrics: no label had both classes in this split.")], "headline")
    rows, classes = [], []
    for label, m in (headline.get("per_class") or {}).items():
        ci = m.get("ci95") or {}
        rows.append([label, f"{fmt(m.get('n'))} / {fmt(m.get('n_pos'))}",
                     *[fmt_ci(m.get(k), ci.get(k)) for k in METRICS]])
        classes.append("")
    macro = headline.get("macro")
    if macro:
        ci = macro.get("ci95") or {}
        rows.append(["macro", "", *[fmt_ci(macro.get(k), ci.get(k)) for k in METRICS]])
        classes.append("macro")
    header = ["label", "n / positives", *[f"{METRIC_NAMES[k]} [95% CI]" for k in METRICS]]
    text = ("Point estimate and 95% bootstrap confidence interval, resampling patients (images when "
            "there is no patient_id). F1@0.5, sens@0.5 and spec@0.5 threshold the probability at 0.5 "
            "(sens@0.5: share of positives called positive; spec@0.5: share of negatives called "
            "negative); sens@95spec is the best sensitivity at specificity at least 0.95. "
            "Macro is the mean over labels where the metric is defined.")
    return section("Headline metrics", [note(text), Html(table(header, rows, classes))], "headline")


def internal_section(summary: dict) -> Html:
    """Internal vs external (valtool --internal): per label, the metric on this data, on the
    model's own test split, the difference with its interval, and whether the label keeps it."""
    result = summary.get("internal_vs_external")
    if not isinstance(result, dict):
        return Html("")
    if result.get("not_run"):
        return section("Internal vs external", [note(f"Not compared: {result['not_run']}.")], "internal")
    metric = result.get("metric", "auroc")
    name = METRIC_NAMES.get(metric, metric)
    rows, classes = [], []
    for label, row in (result.get("per_class") or {}).items():
        m = row.get(metric) or {}
        shown = label if row.get("internal_label") in (None, label) else f"{label} (internal: {row['internal_label']})"
        rows.append([shown, f"{fmt(row.get('n_external'))} / {fmt(row.get('n_internal'))}",
                     fmt_ci(m.get("external"), m.get("external_ci95")), fmt_ci(m.get("internal"), m.get("internal_ci95")),
                     f"{fmt(m.get('difference'), signed=True)} {fmt_interval(m.get('difference_ci95'), signed=True)}",
                     row.get("verdict") or "n/a"])
        classes.append("warn" if row.get("verdict") == "dropped" else "")
    header = ["label", "n external / internal", f"external {name} [95% CI]", f"internal {name} [95% CI]",
              "external - internal [95% CI]", "performance"]
    text = (f"External: this data ({result.get('external_split')}, n={fmt(result.get('external_n'))}). Internal: "
            f"{result.get('internal')} ({result.get('internal_split')}, n={fmt(result.get('internal_n'))}), the model's "
            "own test split. The two samples are independent, so the interval of the difference combines the two "
            f"intervals (MOVER). kept: the interval excludes a drop larger than {fmt(result.get('margin'), 2)}; "
            "dropped: it lies below 0 and does not; unclear: too wide to tell. Every metric: "
            "eval/internal_vs_external.csv.")
    parts = [note(text), Html(table(header, rows, classes))]
    for label, reason in (result.get("not_compared") or {}).items():
        parts.append(note(f"{label}: {reason}", "warn"))
    return section("Internal vs external", parts, "internal")


def badge(kind) -> Html:
    """A coloured label for a failure kind; the class name keeps letters only."""
    safe = re.sub(r"[^a-z]", "", str(kind).lower())
    return Html(f'<span class="badge badge-{safe}">{esc(kind)}</span>')


def rank_problems(problems) -> list[dict]:
    """Flagged problems: findings first, then candidates; within each, by q-value (entries
    without one, counts such as data problems, first), then largest ``|size|``."""
    def key(item):
        p = item[1]
        q = p.get("q_value")
        size = p.get("size")
        size_key = -abs(float(size)) if is_number(size) and math.isfinite(float(size)) else 0.0
        return (p.get("finding") is False, float(q) if is_number(q) else -1.0, size_key, item[0])
    return [p for _, p in sorted(enumerate(p for p in problems if isinstance(p, dict)), key=key)]


def fmt_p(value) -> str:
    """A p- or q-value: three decimals, "<0.001" below that, "n/a" when absent."""
    if not is_number(value):
        return "n/a"
    return "<0.001" if float(value) < 0.001 else f"{float(value):.3f}"


def family_note(family: dict | None) -> Html:
    """What the q-values correct for: the number of tests and where they came from."""
    if not family:
        return note("Ranked by size. Entries without a p-value are counts (data problems, quality flags).")
    kinds = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in (family.get("by_kind") or {}).items())
    return note(f"Every comparison the suite made is one family: {family.get('tests')} tests ({kinds}). "
                f"q = Benjamini-Hochberg q-value over that family; a finding has q < {family.get('alpha')}, a candidate "
                f"only p < {family.get('alpha')} (seen in this data, not established after {family.get('tests')} "
                "comparisons). Size is the change in the metric (slices, corruptions; negative = worse), the ECE "
                "(calibration), the mean probability shift (corruptions without labels) or a count (data, quality); against "
                "a reference: the domain classifier's AUROC (drift), a distance (image property), a difference of "
                "mean probability (prediction drift), the share of films out of distribution (ood).")


def failures_section(summary: dict) -> Html:
    """Findings, then candidates, with p- and q-values; then the worst slices."""
    parts = [family_note(summary.get("failure_family"))]
    problems = rank_problems(summary.get("flagged_problems") or [])
    if not problems:
        parts.append(note("No problem passed the flagging thresholds."))
    for title, chosen in (("Findings", [p for p in problems if p.get("finding") is not False]),
                          ("Candidates", [p for p in problems if p.get("finding") is False])):
        if not chosen:
            parts.append(note(f"{title}: none.") if problems else Html(""))
            continue
        rows = [[i, badge(p.get("kind", "?")), p.get("message", ""), fmt(p.get("size")),
                 fmt_interval(p.get("ci95"), signed=True), fmt_p(p.get("p_value")), fmt_p(p.get("q_value"))]
                for i, p in enumerate(chosen, 1)]
        parts += [Html(f"<h3>{title}</h3>"), table(["#", "kind", "problem", "size", "95% CI", "p", "q"], rows)]
    derived = summary.get("label_defined_columns") or []
    if derived:
        parts.append(note(f"Not tested: {', '.join(map(str, derived))}, a function of the labels. Its groups differ "
                          "by how many findings a film has, so its gaps describe the groups' definition, not a failure "
                          "of the model (a group without positives has F1 = 0 by construction)."))
    slices = [s for s in summary.get("worst_slices") or [] if isinstance(s, dict)]
    if slices:
        rows = [[s.get("group_col"), s.get("group"), s.get("label"), s.get("metric"), fmt(s.get("gap"), signed=True),
                 fmt_interval(s.get("ci95"), signed=True), fmt_p(s.get("p_value")), fmt_p(s.get("q_value")), s.get("n"),
                 "small group" if s.get("small") else ""]
                for s in slices]
        parts += [Html("<h3>Worst slices</h3>"),
                  note("Gap = metric in the group minus the metric in the rest of the split, with a 95% interval "
                       "(patient bootstrap; for AUROC and sensitivity widened to the score interval where that is "
                       "wider)."),
                  table(["group column", "group", "label", "metric", "gap", "95% CI", "p", "q", "n", "flag"], rows)]
    return section("Failures found", parts, "failures")


def group_sizes_table(df: pd.DataFrame) -> Html:
    """Group, size, small flag and macro AUROC with CI from a group_metrics_<C>.csv."""
    need = {"group", "n"}
    if df is None or not need <= set(df.columns):
        return Html("")
    rows = []
    for _, r in df.iterrows():
        auroc = fmt_ci(r.get("macro_auroc"), [r.get("macro_auroc_lo"), r.get("macro_auroc_hi")])
        gap = fmt(r.get("macro_auroc_gap"), signed=True) if "macro_auroc_gap" in r else "n/a"
        small = str(r.get("small")).lower() == "true"
        rows.append([r["group"], r["n"], "small" if small else "", auroc, gap])
    return table(["group", "n", "flag", "macro AUROC [95% CI]", "gap vs rest"], rows)


def eval_section(outdir: Path) -> Html:
    """ROC, PR and per-group plots."""
    folder = outdir / "eval"
    if not folder.is_dir():
        return Html("")
    parts = figures(folder, "roc_*.png", lambda p: "ROC curve per label (sensitivity against 1 - specificity); "
                                                   "the dotted diagonal is a random classifier.")
    parts += figures(folder, "pr_*.png", lambda p: "precision-recall curve per label; the legend gives each "
                                                   "label's prevalence, which is the precision of a random classifier.")
    for png in sorted(folder.glob("group_metrics_*.png")):
        col = png.stem.removeprefix("group_metrics_")
        parts.append(Html(f"<h3>By {esc(col)}</h3>"))
        parts.append(figure(png, f"AUROC per label in each {col} group with 95% CI error bars; "
                                 "hatched bars are groups smaller than the minimum group size."))
        parts.append(group_sizes_table(read_csv_optional(folder / f"group_metrics_{col}.csv")))
    shown = {p.name for p in folder.glob("roc_*.png")} | {p.name for p in folder.glob("pr_*.png")} | {
        p.name for p in folder.glob("group_metrics_*.png")}
    parts += other_figures(folder, shown)
    return section("Evaluation", parts, "eval")


def discover_section(outdir: Path) -> Html:
    """Slices found on the model's features, shortcut probes, label issues (discover/)."""
    folder = outdir / "discover"
    info = read_json_optional(folder / "discover_summary.json")
    if not isinstance(info, dict) or "_error" in info:
        return Html("")
    parts = [note(f"Slices: mixtures over the model's features, label and prediction fitted on the "
                  f"{info.get('discover_split')!r} split ({info.get('n_fit')} films), members of the "
                  f"{info.get('split')!r} split ({info.get('n')} films) assigned from the features alone, so each "
                  "gap is measured on films not chosen by their errors. Gap = AUROC in the slice minus the rest "
                  "(macro for 'any error'), 95% patient-bootstrap interval widened to the score interval; p and q "
                  "enter the failure list above.")]
    slices = read_csv_optional(folder / "slices.csv")
    if slices is not None and len(slices):
        rows = [[r.slice_id, r.label, r.n, fmt(r.value), fmt(r.gap, signed=True),
                 fmt_interval([r.ci_low, r.ci_high], signed=True), fmt_p(r.p_value), fmt_p(r.q_value), r.description]
                for r in slices.itertuples()]
        parts.append(table(["slice", "label", "n", "AUROC", "gap", "95% CI", "p", "q", "what describes it"], rows))
        parts += figures(folder, "slice_*.png", lambda p: "the slice's most typical films (highest membership "
                                                          "probability) with label and predicted probability.")
    probes = read_csv_optional(folder / "shortcut_probes.csv")
    if probes is not None and len(probes):
        parts.append(Html("<h3>Shortcut probes</h3>"))
        risks = probes[probes["risk"].astype(str).str.lower() == "true"]
        parts += [note(f"Shortcut risk: {r.column}: the features predict it (AUROC {fmt(r.probe_auroc)} "
                       f"[{fmt(r.ci_low)}, {fmt(r.ci_high)}]) and {r.detail}.", "warn") for r in risks.itertuples()]
        parts.append(note("Probe AUROC: cross-validated logistic regression from the features to the column "
                          "(folds by patient; one-vs-rest macro for more than two groups), 0.5 = not predictable. "
                          "prevalence gap: largest minus smallest prevalence over the column's groups of 10 films or "
                          "more. A risk needs both: probe AUROC >= 0.6 and a prevalence gap >= 0.05, p < 0.05."))
        parts.append(frame_table(probes))
        for risk in info.get("shortcut_risks") or []:
            att = risk.get("attention")
            if not att or att.get("difference") is None:
                continue
            parts.append(figure(folder / att["figure"],
                                f"{att['label']} Grad-CAM on the {att['column']}={att['group']} films the model scores "
                                f"highest: {fmt(att['concentration_group'])}x as dense in the marked region (where "
                                f"that group's mean film differs most, {att['region_share_of_film']:.1%} of the film) "
                                f"as on average, against {fmt(att['concentration_rest'])}x on the other films; "
                                f"difference {fmt_ci(att['difference'], att['ci95'])}, p {fmt_p(att['p_value'])}."))
    by_property = read_csv_optional(folder / "property_label_auroc.csv")
    if by_property is not None and len(by_property):
        parts += [Html("<h3>Does an image property alone predict a label?</h3>"),
                  note("AUROC of the property as a score for the label (0.5: no; below 0.5: lower values go with "
                       "positives); q = Benjamini-Hochberg over this table."), frame_table(by_property)]
    issues = info.get("label_issues") or {}
    per_label = issues.get("per_label") or []
    if per_label:
        parts.append(Html("<h3>Label issues</h3>"))
        parts.append(note("Confident learning: a given label is contradicted when the model's probability of the "
                          "other class reaches that class's mean probability. Expected: the count that labels drawn "
                          "from the calibrated probabilities would give; p = P(count >= observed) under that draw."))
        rows = [[t.get("label"), t.get("split"), t.get("count"), t.get("n"), fmt_ci(t.get("value"), t.get("ci95")),
                 fmt(t.get("expected")), fmt_p(t.get("p_value"))] for t in per_label]
        parts.append(table(["label", "split", "contradicted", "n", "share [95% CI]", "expected", "p"], rows))
        parts.append(figure(folder / "label_issues.png", "the top candidates (largest margin first) for review; "
                                                         "the whole ranked list is label_issues.csv."))
    return section("Failures no column names", parts, "discover")


def not_run_section(summary: dict) -> Html:
    """The analyses that could not run on what was audited (predictions alone, TorchScript), and why."""
    not_run = summary.get("not_run") if isinstance(summary.get("not_run"), dict) else {}
    if not not_run:
        return Html("")
    names = {"stress": "Stress test", "mc_dropout": "MC-Dropout", "tta": "Test-time augmentation",
             "case_studies": "Grad-CAM case studies", "discover": "Slice discovery, shortcut probes, label issues",
             "drift": "Drift against a reference, label-free performance estimate"}
    rows = [[names.get(k, k), why] for k, why in not_run.items()]
    return section("Not run", [table(["analysis", "why"], rows)], "not-run")


def compare_section(outdir: Path, summary: dict) -> Html:
    """The reference model (A) against the audited one (B): differences with paired intervals."""
    folder = outdir / "compare"
    result = read_json_optional(folder / "compare.json")
    if not isinstance(result, dict) or "_error" in result:
        return Html("")
    a, b, d = result.get("a") or {}, result.get("b") or {}, result.get("decisions") or {}
    parts = [facts([("A (reference)", f"{a.get('file')} ({a.get('layout')})"),
                    ("B (audited)", f"{b.get('file')} ({b.get('layout')})"),
                    ("Decisions at 0.5", f"{fmt(d.get('changed'))} of {fmt(d.get('pairs'))} change: "
                                         f"{fmt(d.get('fixed'))} fixed by B, {fmt(d.get('broken'))} broken by B")]),
             note("diff = B - A with a 95% paired patient-bootstrap interval; p_holm: Holm-adjusted over every row "
                  "of compare.csv. B is better where the interval lies above 0 and p_holm < 0.05.")]
    df = read_csv_optional(folder / "compare.csv")
    if df is not None:
        shown = df[df["scope"] != "group"].drop(columns=["scope", "group_col", "group"])
        parts.append(frame_table(shown))
    parts += [figure(p, f"B - A per label and slice, {p.stem.removeprefix('compare_')}, 95% paired bootstrap "
                        "intervals; filled markers: p_holm < 0.05.") for p in sorted(folder.glob("compare_*.png"))]
    return section("Compared with a reference model", parts, "compare")


def stress_section(outdir: Path, summary: dict) -> Html:
    """Metric against corruption severity, example corrupted films and the summary table."""
    folder = outdir / "stress"
    if not folder.is_dir():
        return Html("")
    captions = {
        "stress_auroc.png": "AUROC against severity for each corruption (severity 0 = clean input); "
                            "a falling line means the model is fragile to that corruption.",
        "stress_auprc.png": "AUPRC against severity for each corruption (severity 0 = clean input).",
        "stress_examples.png": "the first image at model resolution under each corruption and severity, "
                               "to judge how strong the perturbations look.",
    }
    parts = []
    worst = summary.get("most_harmful_corruption")
    if isinstance(worst, dict):
        text = (f"{worst.get('corruption')} severity {fmt(worst.get('severity'))}: {worst.get('label')} "
                f"AUROC {fmt(worst.get('delta_auroc'), signed=True)}")
        parts.append(facts([("Most harmful", text)]))
    parts += [figure(folder / name, text) for name, text in captions.items()]
    df = read_csv_optional(folder / "stress_summary.csv")
    if df is not None:
        parts += acquisition_table(df["corruption"])
        parts += [Html("<h3>stress_summary.csv</h3>"),
                  note("One row per corruption and severity; delta = corrupted minus clean."),
                  frame_table(df, summary.get("labels") or [])]
    parts += other_figures(folder, set(captions))
    return section("Stress test (image corruptions)", parts, "stress")


def acquisition_table(corruptions) -> list[Html]:
    """What each severity of the acquisition faults that ran means (README "DICOM")."""
    names = [name for name in FAMILIES["acquisition"] if name in set(corruptions)]
    if not names:
        return []
    rows = [[name, PARAM_NAMES[name], *(param_label(name, k) for k in (1, 2, 3))] for name in names]
    return [Html("<h3>Acquisition faults</h3>"),
            note("How films go wrong between the detector and the model: read with the wrong photometric "
                 "interpretation, a narrower window, fewer bits, rotated, tightly collimated, with burned-in "
                 "markers. Each is applied to the film at model resolution."),
            table(["corruption", "parameter", "severity 1", "severity 2", "severity 3"], rows)]


def spread_table(uncertainty: dict) -> Html:
    """MC-Dropout / TTA spread summary, one row per method that ran."""
    keys = ("samples", "mean_std", "max_std", "ece", "nll", "brier", "auroc", "error_detection_auroc")
    rows = []
    for name, stats in (uncertainty or {}).items():
        if isinstance(stats, dict):
            rows.append([name, *[stats.get(k) for k in keys]])
    if not rows:
        return Html("")
    present = [i for i, k in enumerate(keys) if any(r[i + 1] is not None for r in rows)]
    return table(["method", *[keys[i] for i in present]], [[r[0], *[r[i + 1] for i in present]] for r in rows])


def spread_per_class_table(uncertainty: dict) -> Html:
    """Per label: mean std and error-detection AUROC of each method."""
    rows = []
    for name, stats in (uncertainty or {}).items():
        for label, m in ((stats or {}).get("per_class") or {}).items() if isinstance(stats, dict) else []:
            rows.append([name, label, m.get("mean_std"), m.get("error_detection_auroc")])
    return table(["method", "label", "mean_std", "error_detection_auroc"], rows) if rows else Html("")


def calibration_section(outdir: Path, summary: dict) -> Html:
    """Temperature, ECE/NLL/Brier before and after, reliability diagrams and sample spread."""
    folder = outdir / "calibrate"
    cal = read_json_optional(folder / "calibration_summary.json")
    brief = summary.get("calibration") or {}
    if cal is None and not brief and not folder.is_dir():
        return Html("")
    cal = cal if isinstance(cal, dict) else {}
    merged = {**brief, **{k: v for k, v in cal.items() if k != "_error"}}
    parts = [error_note(cal)]
    temperature = merged.get("temperature")
    if isinstance(temperature, dict):
        temperature = ", ".join(f"{k} {fmt(v)}" for k, v in temperature.items())
    elif isinstance(temperature, list):
        temperature = ", ".join(fmt(v) for v in temperature)
    else:
        temperature = fmt(temperature)
    t_ci = merged.get("temperature_ci95")
    if isinstance(t_ci, list):
        temperature = f"{temperature} {fmt_interval(t_ci)}"
    fitted = merged.get("fit_split") or merged.get("fitted_on")
    parts.append(facts([("Temperature", temperature),
                        ("Fitted on", f"{fitted} split" if fitted else "not fitted (no validation split): T = 1")]))
    if fitted == "val":
        parts.append(note("The temperature was fitted on the split train chose the checkpoint on, so its fit can be "
                          "optimistic; a split set aside for it (split value calib) is cleaner.", "warn"))
    if merged.get("ece_change_verdict"):
        parts.append(note(merged["ece_change_verdict"]))
    rows = [[name, merged.get(f"{key}_before"), fmt_interval(merged.get(f"{key}_before_ci95")),
             merged.get(f"{key}_after"), fmt_interval(merged.get(f"{key}_after_ci95"))]
            for name, key in (("ECE (pairs pooled)", "ece"), ("ECE (top label)", "ece_toplabel"), ("NLL", "nll"),
                              ("Brier", "brier"), ("AUROC (pairs pooled)", "auroc"))
            if f"{key}_before" in merged or f"{key}_after" in merged]
    for label, m in (merged.get("per_class") or {}).items():
        if isinstance(m, dict) and ("ece_before" in m or "ece_after" in m):
            rows.append([f"ECE {label}", m.get("ece_before"), "", m.get("ece_after"), ""])
    if rows:
        parts += [Html("<h3>Before and after temperature scaling</h3>"),
                  note("ECE: 15 equal-width probability bins, |mean prediction - positive rate| weighted by bin "
                       "mass; lower is better for ECE, NLL and Brier. Temperature scaling leaves AUROC unchanged. "
                       "95% CI: patient bootstrap of the reported split, with T held at its fitted value (the "
                       "temperature's own interval comes from refits on resamples of the fit split)."),
                  table(["measure", "before", "95% CI", "after", "95% CI"], rows)]
    captions = {
        "reliability_uncal.png": "reliability diagram of the raw model probabilities: observed positive rate "
                                 "per probability bin against the diagonal of perfect calibration, with the "
                                 "number of (image, label) pairs per bin below.",
        "reliability_temp_scaled.png": "the same diagram after dividing the logits by the fitted temperature.",
        "reliability_mc_dropout.png": "the same diagram for the MC-Dropout mean probability.",
        "reliability_tta.png": "the same diagram for the test-time-augmentation mean probability.",
    }
    parts += [figure(folder / name, text) for name, text in captions.items()]
    uncertainty = summary.get("uncertainty") or {k: cal.get(k) for k in ("mc_dropout", "tta") if cal.get(k)}
    spread = spread_table(uncertainty)
    if spread:
        parts += [Html("<h3>MC-Dropout and test-time augmentation spread</h3>"),
                  note("std = standard deviation of the sampled probabilities per (image, label) pair. "
                       "error_detection_auroc: how well a larger std flags wrong decisions at 0.5 (0.5 = chance)."),
                  spread, spread_per_class_table(uncertainty)]
    if folder.is_dir():
        parts += other_figures(folder, set(captions))
    return section("Calibration and uncertainty", parts, "calibration")


def selective_section(outdir: Path, summary: dict) -> Html:
    """Risk-coverage plot, AURC per confidence signal and coverage at target risks."""
    folder = outdir / "selective"
    sel_file = read_json_optional(folder / "selective_summary.json")
    sel = {**(summary.get("selective") or {}),
           **({k: v for k, v in sel_file.items() if k != "_error"} if isinstance(sel_file, dict) else {})}
    if not sel and not folder.is_dir():
        return Html("")
    parts = [error_note(sel_file),
             facts([("Confidence", sel.get("confidence")), ("AURC", fmt(sel.get("aurc"))),
                    ("E-AURC", fmt(sel.get("e_aurc"))),
                    ("Risk at full coverage", fmt(sel.get("risk_at_full_coverage"))),
                    ("Decisions (pairs)", fmt(sel.get("n")) if "n" in sel else None)])]
    parts += figures(folder, "risk_coverage_*.png",
                     lambda p: "risk (error rate of the decisions kept) against coverage (fraction kept) when the "
                               "least confident (image, label) decisions are abstained on first, per confidence "
                               "signal, with the oracle and random orderings for reference.")
    signals = sel.get("signals") or {}
    if signals:
        parts += [Html("<h3>AURC per confidence signal</h3>"),
                  note("Area under the risk-coverage curve (lower is better); E-AURC subtracts the oracle's. 95% CI: "
                       "patient bootstrap."),
                  table(["signal", "AURC", "95% CI", "E-AURC", "95% CI"],
                        [[name, (v or {}).get("aurc"), fmt_interval((v or {}).get("aurc_ci95")), (v or {}).get("e_aurc"),
                          fmt_interval((v or {}).get("e_aurc_ci95"))] for name, v in signals.items()])]
    comparisons = [c for c in sel.get("comparisons") or [] if isinstance(c, dict)]
    if comparisons:
        parts += [note(sel.get("best_signal") or ""),
                  table(["a", "b", "AURC a - b", "paired 95% CI", "p"],
                        [[c.get("a"), c.get("b"), fmt(c.get("aurc_diff"), signed=True),
                          fmt_interval(c.get("ci95"), signed=True), fmt_p(c.get("p_value"))] for c in comparisons])]
    car = sel.get("coverage_at_risk") or {}
    if car:
        parts += [Html("<h3>Coverage at target risk</h3>"),
                  note("Largest coverage whose risk stays at or below the target, and the confidence threshold "
                       "that gives it."),
                  table(["target risk", "coverage", "95% CI", "threshold", "risk achieved"],
                        [[k, (v or {}).get("coverage"), fmt_interval((v or {}).get("coverage_ci95")),
                          (v or {}).get("threshold"), (v or {}).get("risk")] for k, v in car.items()])]
    per_label = sel.get("per_label") or {}
    if per_label:
        parts += [Html("<h3>Per label</h3>"),
                  table(["label", "AURC", "E-AURC", "risk at full coverage"],
                        [[k, (v or {}).get("aurc"), (v or {}).get("e_aurc"), (v or {}).get("risk_at_full_coverage")]
                         for k, v in per_label.items()])]
    if folder.is_dir():
        parts += other_figures(folder, {p.name for p in folder.glob("risk_coverage_*.png")})
    return section("Selective prediction", parts, "selective")


def case_caption(record: dict) -> str:
    """A one-line description of one case study from its JSON record."""
    if not isinstance(record, dict):
        return "case study figure."
    clean = ((record.get("probabilities") or {}).get("clean") or {}).get(record.get("label"))
    text = (f"{record.get('image_path', '?')}, view {record.get('view') or 'n/a'}: {record.get('label', '?')} "
            f"truth {fmt(record.get('truth'))}, clean probability {fmt(clean)}; "
            f"selected as {record.get('selected_as', 'n/a')}")
    if record.get("nearest"):
        text += f" (nearest case: {record.get('why_nearest') or 'no exact match'})"
    drops = record.get("confidence_drop") or {}
    if drops:
        text += "; confidence drop " + ", ".join(f"{k} {fmt(v, signed=True)}" for k, v in drops.items())
    return text + "."


def case_studies_section(outdir: Path) -> Html:
    """Case-study figures with captions from case_studies.json, and the JSON itself."""
    folder = outdir / "case_studies"
    if not folder.is_dir():
        return Html("")
    data = read_json_optional(folder / "case_studies.json")
    cases = (data or {}).get("cases") if isinstance(data, dict) else None
    cases = cases if isinstance(cases, dict) else {}
    by_figure = {c.get("figure"): c for c in cases.values() if isinstance(c, dict)}
    parts = [error_note(data)]
    parts += [figure(p, case_caption(by_figure[p.name]) if p.name in by_figure else "case study figure.")
              for p in sorted(folder.glob("*.png"))]
    if isinstance(data, dict) and "_error" not in data:
        parts.append(json_details("case_studies.json", data))
    return section("Case studies", parts, "cases")


def finding_lists(obj, prefix: str = "") -> list[tuple[str, list[str]]]:
    """Every non-empty list in ``obj`` (nested dicts too) under a key named like a finding
    (problems, warnings, errors, ...), as (dotted key, item texts), in file order; a bare top-level
    list counts as messages. Lists such as labels or columns are metadata and are left out."""
    def text(item):
        return item if isinstance(item, str) else json.dumps(item)

    if isinstance(obj, list) and not prefix:
        return [("messages", [text(v) for v in obj])] if obj else []
    found = []
    for key, value in (obj.items() if isinstance(obj, dict) else []):
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, list) and value and FINDING_KEY.search(str(key)):
            found.append((name, [text(v) for v in value]))
        elif isinstance(value, dict):
            found += finding_lists(value, name)
    return found


def data_checks_section(outdir: Path) -> Html:
    """Problems and warnings from data_checks/data_checks.json, whatever its exact layout."""
    data = read_json_optional(outdir / "data_checks" / "data_checks.json")
    if data is None:
        return Html("")
    lists = finding_lists({k: v for k, v in data.items() if k != "_error"} if isinstance(data, dict) else data)
    lists.sort(key=lambda kv: 0 if "problem" in kv[0].split(".")[-1].lower() else 1)  # problems first
    parts = [error_note(data)]
    if isinstance(data, dict) and "ok" in data:
        parts.append(facts([("Data checks", "passed" if data["ok"] else "problems found")]))
    for key, messages in lists:
        items = "".join(f"<li>{esc(m)}</li>" for m in messages)
        parts.append(Html(f"<h3>{esc(key)} ({len(messages)})</h3><ul>{items}</ul>"))
    if not lists:
        parts.append(note("No problems or warnings listed."))
    return section("Data-check warnings", parts, "data-checks")


def unlabelled_section(outdir: Path, summary: dict) -> Html:
    """No ground truth: mean probabilities, spread, prediction shifts and image quality."""
    parts = []
    probs = summary.get("mean_probability") or {}
    if probs:
        parts += [Html("<h3>Mean predicted probability</h3>"),
                  table(["label", "mean probability"], [[k, v] for k, v in probs.items()])]
    spread = spread_table(summary.get("uncertainty") or {})
    if spread:
        parts += [Html("<h3>MC-Dropout and test-time augmentation spread</h3>"),
                  note("std = standard deviation of the sampled probabilities per (image, label) pair."), spread]
    largest = summary.get("largest_prediction_shift")
    if isinstance(largest, dict):
        parts.append(facts([("Largest shift", f"{largest.get('corruption')} severity {fmt(largest.get('severity'))}: "
                                              f"{largest.get('label')} probability moves "
                                              f"{fmt(largest.get('mean_abs_shift'))} on average")]))
    shifts = read_csv_optional(outdir / "stress" / "prediction_shifts.csv")
    if shifts is not None:
        parts += [Html("<h3>Prediction shifts under corruption</h3>"),
                  note("Mean and largest absolute change of each label's probability against the clean image, and "
                       "how many images cross the 0.5 threshold (flips)."),
                  frame_table(shifts, summary.get("labels") or [])]
    parts.append(figure(outdir / "stress" / "stress_examples.png",
                        "the first image at model resolution under each corruption and severity."))
    quality = read_csv_optional(outdir / "quality" / "image_quality.csv")
    if quality is not None:
        flags = [c for c in quality.columns if c.startswith("flag_")]
        rows = [[c.removeprefix("flag_").replace("_", " "), int(quality[c].eq(True).sum()), len(quality)]
                for c in flags]
        parts += [Html("<h3>Image quality flags</h3>"),
                  note("Images per flag (small: shorter side below the model input size; low contrast: intensity "
                       "std below 10; dark: mean below 30; saturated: over 20% of pixels at 250 or more)."),
                  table(["flag", "images flagged", "images"], rows)]
    return section("Unlabelled folder: predictions without ground truth", parts, "unlabelled")


def drift_section(outdir: Path, summary: dict) -> Html:
    """Is this site like the reference? The verdict with its tests and sample sizes, the estimated
    performance (greyed with a warning when drift makes it invalid), the image properties, the
    predicted prevalences and the most atypical films."""
    title, anchor = "Is this site like the reference?", "drift"
    folder = outdir / "drift"
    found = read_json_optional(folder / "drift_summary.json")
    if not isinstance(found, dict) or "_error" in found:
        why = ((summary.get("not_run") or {}).get("drift") or "drift/drift_summary.json is missing")
        return section(title, [error_note(found), note(f"Not assessed: {why}.", "warn")], anchor)
    ref = found.get("reference") or {}
    n_ref, n_new = fmt(found.get("n_reference")), fmt(found.get("n_new"))
    detected = found.get("drift_detected")
    line = ("Drift detected: the new films differ from the reference's" if detected
            else "No drift detected at this sample size")
    parts = [Html(f'<p class="verdict{" warn" if detected else ""}">{esc(line)} '
                  f"(n_reference = {esc(n_ref)}, n_new = {esc(n_new)}).</p>"),
             facts([("Reference", f"{ref.get('csv')}, split {ref.get('split') or 'all rows'} (from {ref.get('origin')})"),
                    ("Domain classifier", f"AUROC {fmt_ci(found.get('domain_auroc'), found.get('domain_auroc_ci'))}, "
                                          f"p {fmt_p(found.get('domain_p_value'))}"),
                    ("MMD^2", f"{fmt(found.get('mmd'), 4)}, p {fmt_p(found.get('mmd_p_value'))}"),
                    ("Decision rule", found.get("decision_rule"))]),
             note("Domain classifier: a logistic regression from the model's backbone features (principal components "
                  "of both samples) to 'new site', scored out of fold; 0.5 = the sites cannot be told apart. MMD^2: "
                  "Gaussian-kernel maximum mean discrepancy on the same features. Both p-values come from "
                  f"{fmt(found.get('permutations'))} permutations of which film came from where.")]
    parts += _estimate_parts(read_json_optional(folder / "estimated_performance.json"))
    props = read_csv_optional(folder / "property_drift.csv")
    if props is not None:
        rows = [[r["property"], r["statistic"],
                 fmt_ci(r["distance"], [r.get("distance_ci_low"), r.get("distance_ci_high")]),
                 fmt_p(r["p_value"]), fmt_p(r.get("q_value")),
                 r["reference_mean"] if pd.notna(r["reference_mean"]) else r["reference_mode"],
                 r["new_mean"] if pd.notna(r["new_mean"]) else r["new_mode"]] for _, r in props.iterrows()]
        parts += [Html("<h3>Image properties</h3>"),
                  note("Distance: Kolmogorov-Smirnov statistic for a number, total variation distance for a category "
                       "(0 = the same distribution, 1 = no overlap), with its 95% interval over resamples of both "
                       "sides' films; p from the KS or chi-square test, q "
                       "Benjamini-Hochberg over the properties. Typical value: the mean, or the most common value."),
                  table(["property", "test", "distance [95% CI]", "p", "q", "reference", "new site"], rows),
                  figure(folder / "property_drift.png", "each property's distribution at the reference and the new site.")]
    preds = read_csv_optional(folder / "prediction_drift.csv")
    if preds is not None:
        rows = [[r["label"], r["reference_mean_prob"], r["new_mean_prob"],
                 f"{fmt(r['difference'], signed=True)} {fmt_interval([r['ci_low'], r['ci_high']], signed=True)}",
                 fmt_p(r["p_value"]), r["reference_positive_rate"], r["new_positive_rate"]] for _, r in preds.iterrows()]
        parts += [Html("<h3>Predicted prevalence</h3>"),
                  note("Mean predicted probability and share of films at or above 0.5, with the 95% bootstrap interval "
                       "of the difference (reference patients and new films resampled). A shift can be a real change "
                       "of prevalence as well as a failure."),
                  table(["label", "reference mean", "new mean", "difference [95% CI]", "p", "reference share >= 0.5",
                         "new share >= 0.5"], rows),
                  figure(folder / "prediction_drift.png", "mean predicted probability per label and the difference.")]
    ood = found.get("ood") or {}
    parts += [Html("<h3>Films unlike the reference</h3>"),
              note(f"{fmt(ood.get('count'))} of {fmt(ood.get('n'))} films lie farther from the reference than "
                   f"{_percent(ood.get('quantile'))} of the reference's own films (distance {fmt(ood.get('threshold'), 2)}; "
                   f"{fmt(ood.get('expected'), 1)} expected if the site were like the reference, p "
                   f"{fmt_p(ood.get('p_value'))}). Distance: Mahalanobis, on the backbone features, with a Ledoit-Wolf "
                   "shrunk covariance; the reference's own distances are out of sample (cross-fitted). Every film: "
                   "drift/ood_scores.csv."),
              figure(folder / "ood_montage.png", "the most atypical films, farthest first."),
              figure(folder / "ood_distances.png", "distances of the reference's films (out of sample) and the new ones.")]
    return section(title, parts, anchor)


def _percent(share) -> str:
    return f"{100 * float(share):.0f}%" if is_number(share) else "n/a"


def _estimate_parts(estimates) -> list[Html]:
    """The label-free performance table: greyed, under a warning, when the estimate is not valid."""
    if not isinstance(estimates, dict) or "_error" in estimates:
        return [error_note(estimates)]
    valid = bool(estimates.get("valid"))
    rows, classes = [], []
    for label, e in (estimates.get("per_label") or {}).items():
        measured = e.get("reference_measured") or {}
        rows.append([label, fmt_ci(e.get("auroc"), e.get("auroc_ci")), fmt_ci(e.get("f1@0.5"), e.get("f1@0.5_ci")),
                     fmt_ci(e.get("sensitivity"), e.get("sensitivity_ci")),
                     fmt_ci(e.get("specificity"), e.get("specificity_ci")), e.get("expected_prevalence"),
                     measured.get("auroc")])
        classes.append("" if e.get("valid") else "invalid")
    parts = [Html("<h3>Expected performance without labels</h3>")]
    if not valid:
        parts.append(note(f"Not valid: {estimates.get('invalid_reason')}", "warn"))
    parts += [note("Confidence-based performance estimation: each film's probability, calibrated on the reference "
                   "(Platt scaling per label), is taken as its chance of being positive; the metrics are their "
                   "expected values, with 95% intervals from labels drawn from those probabilities. It holds only "
                   "when the reference's calibration holds here: no concept shift, films like the reference's."),
              table(["label", "AUROC [95% CI]", "F1@0.5 [95% CI]", "sensitivity@0.5 [95% CI]",
                     "specificity@0.5 [95% CI]", "expected prevalence", "reference AUROC (measured)"], rows, classes)]
    return parts


def config_section(config) -> Html:
    """config.json pretty-printed in a collapsed block."""
    if config is None:
        return section("Configuration", [note("config.json not found in this folder.")], "config")
    return section("Configuration", [json_details("config.json (arguments, versions, device, commit)", config)],
                   "config")


def page(title: str, body: str, generated: str) -> str:
    """The whole document: inline CSS, no script, no external resource."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body><main>{body}</main>"
            f'<footer><p class="notice">{esc(NOTICE)}</p>'
            f"<p>Generated {esc(generated)} by main.py valtool from the files in this folder.</p></footer>"
            f"</body></html>\n")


# ====== the page ======

def build_report(outdir, generated: str | None = None) -> str:
    """The report HTML for a valtool output folder (``summary.json`` is required)."""
    outdir = Path(outdir)
    summary = read_json_optional(outdir / "summary.json")
    if summary is None:
        raise UserError(f"{outdir / 'summary.json'}: not found; run `main.py valtool ... --outdir {outdir}` first")
    if not isinstance(summary, dict) or "_error" in summary:
        raise UserError(f"{outdir / 'summary.json'}: not a valid valtool summary; rerun main.py valtool")
    config = read_json_optional(outdir / "config.json")
    generated = generated or datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z").strip()
    parts = [header_section(summary, config if isinstance(config, dict) else None, generated)]
    if summary.get("mode") == "unlabelled":
        parts += [drift_section(outdir, summary), failures_section(summary), not_run_section(summary),
                  unlabelled_section(outdir, summary)]
    else:
        parts += [headline_section(summary), internal_section(summary), failures_section(summary),
                  not_run_section(summary), compare_section(outdir, summary), discover_section(outdir),
                  eval_section(outdir), stress_section(outdir, summary), calibration_section(outdir, summary),
                  selective_section(outdir, summary)]
    parts += [case_studies_section(outdir), data_checks_section(outdir), config_section(config)]
    title = f"cxr failure analysis: {summary.get('csv') or summary.get('image_dir') or outdir.name}"
    # ASCII with character references: the file reads the same whatever the reader's default encoding
    return page(title, "".join(parts), generated).encode("ascii", "xmlcharrefreplace").decode("ascii")


def write_report(outdir) -> Path:
    """Write ``<outdir>/report.html`` (atomically) and return its path."""
    outdir = Path(outdir)
    return write_text(outdir / "report.html", build_report(outdir))
