"""Specification of tools/html_report.py: report.html is one self-contained, escaped, offline page
built from a valtool output folder, with the sections present in the folder and no others."""

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import cv2
import numpy as np
import pandas as pd
import pytest

from tools.errors import UserError
from tools.html_report import NOTICE, fmt, fmt_ci, label_groups, rank_problems, write_report

LABELS = ["Cardiomegaly", "Edema", "Effusion"]
XSS = "<script>alert(1)</script>"


# ====== a small fake valtool folder ======

def metric_block(auroc, ci_auroc, **extra):
    """One entry of the metrics schema with CIs (other metrics fixed)."""
    return {"auroc": auroc, "auprc": 0.8, "f1@0.5": 0.5, "sens@95spec": 0.25,
            "ci95": {"auroc": ci_auroc, "auprc": [0.7, 0.9], "f1@0.5": [0.4, 0.6], "sens@95spec": [0.1, 0.4]},
            **extra}


def labelled_summary():
    """The keys valtool writes for a labelled CSV (shape of a real summary.json)."""
    return {
        "mode": "labelled", "csv": "/data/cxr.csv", "split": "test", "n": 24, "labels": LABELS,
        "headline": {
            "macro": metric_block(0.91234, [0.8801, 0.9399]),
            "micro": metric_block(0.7, [0.6, 0.8]),
            "per_class": {
                "Cardiomegaly": metric_block(0.95, [0.9, 1.0], n=24, n_pos=12, prevalence=0.5),
                "Edema": metric_block(None, None, n=24, n_pos=0, prevalence=0.0),
                "Effusion": metric_block(0.6643, [0.4571, 0.8252], n=24, n_pos=13, prevalence=0.54),
            },
        },
        "worst_slices": [{"group_col": "view", "group": "<b>AP</b>", "label": "Effusion", "metric": "f1@0.5",
                          "gap": -0.53636, "ci95": [-0.94133, -0.19081], "n": 11, "small": True,
                          "p_value": 0.0004, "q_value": 0.0123, "finding": True}],
        "label_defined_columns": ["num_findings_bin"],
        "failure_family": {"tests": 31, "by_kind": {"calibration": 1, "corruption": 12, "slice": 18},
                           "method": "Benjamini-Hochberg", "alpha": 0.05, "findings": 2, "candidates": 1},
        "most_harmful_corruption": {"corruption": "jpeg", "severity": 2, "label": "Edema", "delta_auroc": -0.25},
        "calibration": {"temperature": 1.5, "fitted_on": "val", "ece_before": 0.1891, "ece_after": 0.0426,
                        "nll_before": 0.64, "nll_after": 0.59, "ece_toplabel_before": 0.18,
                        "ece_toplabel_after": 0.17},
        "uncertainty": {"mc_dropout": {"samples": 10, "mean_std": 0.0197, "max_std": 0.0332, "ece": 0.148,
                                       "nll": 0.64, "brier": 0.22, "auroc": 0.70, "error_detection_auroc": 0.4154},
                        "tta": None},
        "selective": {"aurc": 0.2076, "e_aurc": 0.0947, "risk_at_full_coverage": 0.4306,
                      "coverage_at_risk": {"0.05": {"coverage": 0.3194, "threshold": 0.54712, "risk": 0.0}},
                      "signals": {"maxprob": {"aurc": 0.2076, "e_aurc": 0.0947},
                                  "mc_std": {"aurc": 0.4848, "e_aurc": 0.3720}}},
        "model_passes_over_split": 16,
        "flagged_problems": [
            {"kind": "corruption", "message": "jpeg severity 2 (50.0): Edema AUROC -0.100", "size": -0.1,
             "ci95": None, "p_value": 0.004, "q_value": 0.062, "finding": False},
            {"kind": "slice", "message": f"view=AP: {XSS}", "size": -0.53636, "ci95": [-0.94133, -0.19081],
             "p_value": 0.0004, "q_value": 0.0123, "finding": True},
            {"kind": "calibration", "message": "ECE 0.189 before temperature scaling", "size": 0.1891,
             "ci95": [0.15, 0.23], "p_value": 0.001, "q_value": 0.0123, "finding": True},
        ],
        "note": NOTICE,
    }


def config_json():
    return {"command": "valtool", "argv": ["main.py", "valtool"],
            "args": {"weights": "/models/best.pt", "labels": LABELS, "group_col": [XSS]},
            "checkpoint": {"arch": "densenet121", "epoch": 3, "image_size": 64}}


def write_png(path, seed=0):
    """A small PNG with structure (a gradient and a block), written with cv2."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (30, 1))
    img[5:15, 5 + seed:15 + seed] = 255
    assert cv2.imwrite(str(path), img)
    return path


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def stress_summary_frame():
    rows = [("clean", 0, None, 0.91234), ("jpeg", 1, 70.0, 0.9), ("jpeg", 2, 50.0, 0.812345)]
    df = pd.DataFrame(rows, columns=["corruption", "severity", "param", "macro_auroc"])
    df["delta_auroc"] = df["macro_auroc"] - df["macro_auroc"].iloc[0]
    for lbl in LABELS:
        df[f"auroc_{lbl}"] = df["macro_auroc"]
    return df


@pytest.fixture
def labelled_dir(tmp_path):
    out = tmp_path / "vt"
    write_json(out / "summary.json", labelled_summary())
    write_json(out / "config.json", config_json())
    for i, rel in enumerate(["eval/roc_test.png", "eval/pr_test.png", "eval/group_metrics_view.png",
                             "stress/stress_auroc.png", "stress/stress_auprc.png", "stress/stress_examples.png",
                             "calibrate/reliability_uncal.png", "calibrate/reliability_temp_scaled.png",
                             "selective/risk_coverage_test.png"]):
        write_png(out / rel, seed=i)
    stress_summary_frame().to_csv(out / "stress" / "stress_summary.csv", index=False)
    write_json(out / "calibrate" / "calibration_summary.json",
               {"temperature": 1.5, "fitted_on": "val", "fit_split": "val", "ece_before": 0.1891, "ece_after": 0.0426,
                "ece_before_ci95": [0.15, 0.23], "ece_after_ci95": [0.031, 0.061], "temperature_ci95": [1.3, 1.8],
                "ece_change": -0.1465, "ece_change_ci95": [-0.19, -0.11],
                "ece_change_verdict": "ECE 0.1891 -> 0.0426: temperature scaling lowered the ECE",
                "brier_before": 0.2236, "brier_after": 0.2071,
                "per_class": {"Edema": {"ece_before": 0.429, "ece_after": 0.3462}}})
    return out


def read_report(outdir):
    return write_report(outdir).read_text(encoding="ascii")


class Tags(HTMLParser):
    """Every start tag with its attributes, in document order."""

    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def tags_of(text):
    parser = Tags()
    parser.feed(text)
    return parser.tags


def row_with(text, first_cell):
    """The <tr> whose first cell is ``first_cell`` (escaped text)."""
    match = re.search(rf"<tr[^>]*><td[^>]*>{re.escape(first_cell)}</td>(.*?)</tr>", text)
    assert match, f"no table row starting with {first_cell!r}"
    return match.group(1)


# ====== formatting ======

def test_numbers_have_three_decimals_and_null_is_na():
    assert fmt(0.91234) == "0.912"
    assert fmt(np.float32(0.5)) == "0.500"
    assert fmt(np.int64(7)) == "7"
    assert fmt(None) == fmt(float("nan")) == "n/a"
    assert fmt(-0.1, signed=True) == "-0.100" and fmt(0.1, signed=True) == "+0.100"
    assert fmt_ci(0.91234, [0.8801, 0.9399]) == "0.912 [0.880, 0.940]"
    assert fmt_ci(None, [0.1, 0.2]) == "n/a"
    assert fmt_ci(0.5, None) == fmt_ci(0.5, [None, 0.3]) == "0.500"


def test_problems_rank_by_absolute_size_with_unsized_last():
    problems = [{"size": -0.1}, {"size": None, "id": "a"}, {"size": 0.3}, {"size": -0.5}, {"size": 11}]
    assert [p["size"] for p in rank_problems(problems)] == [11, -0.5, 0.3, -0.1, None]


def test_label_columns_are_grouped_by_the_longest_matching_label():
    plain, grouped = label_groups(["corruption", "auroc_Effusion", "auroc_Pleural_Effusion", "flips_Edema"],
                                  ["Effusion", "Pleural_Effusion", "Edema", "Mass"])
    assert plain == ["corruption"]
    assert grouped == {"Effusion": ["auroc_Effusion"], "Pleural_Effusion": ["auroc_Pleural_Effusion"],
                       "Edema": ["flips_Edema"]}


# ====== the labelled page ======

def test_headline_table_shows_values_with_ci_and_na(labelled_dir):
    text = read_report(labelled_dir)
    macro = row_with(text, "macro")
    assert "0.912 [0.880, 0.940]" in macro  # AUROC 0.91234, CI [0.8801, 0.9399]
    assert "0.800 [0.700, 0.900]" in macro  # AUPRC
    effusion = row_with(text, "Effusion")
    assert "0.664 [0.457, 0.825]" in effusion and "24 / 13" in effusion
    edema = row_with(text, "Edema")
    assert re.search(r"<td[^>]*>n/a</td>", edema)  # AUROC null (one class only)


def test_notice_in_header_and_footer(labelled_dir):
    text = read_report(labelled_dir)
    assert text.count(NOTICE) >= 2
    footer = text[text.index("<footer>"):]
    assert NOTICE in footer
    assert text.index(NOTICE) < text.index("Headline metrics")


def test_every_image_is_an_embedded_png_of_the_file(labelled_dir):
    text = read_report(labelled_dir)
    imgs = [attrs for tag, attrs in tags_of(text) if tag == "img"]
    pngs = sorted(labelled_dir.rglob("*.png"))
    assert len(imgs) == len(pngs) == 9
    assert all(a["src"].startswith("data:image/png;base64,") for a in imgs)
    embedded = {base64.b64decode(a["src"].split(",", 1)[1]) for a in imgs}
    assert embedded == {p.read_bytes() for p in pngs}


def test_page_is_offline_and_script_free(labelled_dir):
    text = read_report(labelled_dir)
    tags = tags_of(text)
    links = [v for _, attrs in tags for k, v in attrs.items() if k in ("src", "href") and v]
    assert not [v for v in links if v.startswith(("http://", "https://", "//"))]
    assert "http://" not in text and "https://" not in text
    assert not [t for t, _ in tags if t in ("script", "link", "iframe")]
    assert "@import" not in text and "url(" not in text


def test_text_from_files_is_escaped(labelled_dir):
    text = read_report(labelled_dir)
    assert "<script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text  # flagged message and config both escaped
    assert "&lt;b&gt;AP&lt;/b&gt;" in text and "<b>AP</b>" not in text


def test_findings_then_candidates_with_p_and_q_and_worst_slices(labelled_dir):
    text = read_report(labelled_dir)
    order = [text.index(m) for m in ("<h3>Findings</h3>", "view=AP: &lt;script", "ECE 0.189 before",
                                     "<h3>Candidates</h3>", "jpeg severity 2 (50.0)")]
    assert order == sorted(order)  # findings (same q: larger |size| first), then the candidate
    assert 'class="badge badge-slice"' in text and 'class="badge badge-calibration"' in text
    assert "31 tests (1 calibration, 12 corruption, 18 slice)" in text and "Benjamini-Hochberg" in text
    assert "Not tested: num_findings_bin, a function of the labels" in text
    jpeg_row = re.search(r"<tr>(?:(?!</tr>).)*jpeg severity 2(?:(?!</tr>).)*</tr>", text).group(0)
    assert "<td>0.004</td>" in jpeg_row and "<td>0.062</td>" in jpeg_row
    slice_row = row_with(text, "view")
    for cell in ("Effusion", "f1@0.5", "-0.536", "[-0.941, -0.191]", "&lt;0.001", "0.012", "11", "small group"):
        assert cell in slice_row


def test_stress_table_has_three_decimals(labelled_dir):
    text = read_report(labelled_dir)
    jpeg2 = [m for m in re.findall(r"<tr><td>jpeg</td>(.*?)</tr>", text)]
    assert len(jpeg2) == 2
    cells = re.findall(r"<td[^>]*>(.*?)</td>", jpeg2[1])
    assert cells[:3] == ["2", "50.000", "0.812"]  # severity, param, macro_auroc 0.812345
    assert "0.812345" not in text
    assert f"{0.812345 - 0.91234:.3f}" in cells  # delta_auroc computed here, shown with 3 decimals
    assert "Most harmful" in text and "-0.250" in text


def test_calibration_and_selective_tables(labelled_dir):
    text = read_report(labelled_dir)
    assert re.search(r"ECE \(pairs pooled\)</td><td[^>]*>0.189</td><td[^>]*>\[0.150, 0.230\]</td>"
                     r"<td[^>]*>0.043</td><td[^>]*>\[0.031, 0.061\]</td>", text)
    assert re.search(r"Brier</td><td[^>]*>0.224</td><td[^>]*>n/a</td><td[^>]*>0.207</td>", text)
    assert re.search(r"ECE Edema</td><td[^>]*>0.429</td><td[^>]*></td><td[^>]*>0.346</td>", text)
    assert "1.500 [1.300, 1.800]" in text  # temperature with its interval
    assert "temperature scaling lowered the ECE" in text
    assert "the split train chose the checkpoint on" in text  # fitted on val: warned
    assert re.search(r"<td>mc_dropout</td><td[^>]*>10</td><td[^>]*>0.020</td>", text)
    assert re.search(r"<td>mc_std</td><td[^>]*>0.485</td><td[^>]*>n/a</td><td[^>]*>0.372</td>", text)
    assert re.search(r"<td>0.05</td><td[^>]*>0.319</td><td[^>]*>n/a</td><td[^>]*>0.547</td><td[^>]*>0.000</td>", text)


def test_config_is_in_a_details_block(labelled_dir):
    text = read_report(labelled_dir)
    block = re.search(r"<details><summary>config.json.*?<pre>(.*?)</pre></details>", text, re.S).group(1)
    assert "densenet121" in block and "&quot;command&quot;: &quot;valtool&quot;" in block


def test_output_is_ascii_and_written_in_place(labelled_dir):
    summary = labelled_summary()
    summary["csv"] = "/data/\u00e9tude.csv"
    write_json(labelled_dir / "summary.json", summary)
    path = write_report(labelled_dir)
    assert path == labelled_dir / "report.html"
    assert "&#233;tude.csv" in path.read_bytes().decode("ascii")
    assert not list(labelled_dir.glob(".report*"))  # no temporary file left behind


# ====== optional parts and the unlabelled mode ======

def test_missing_optional_sections_do_not_crash(tmp_path):
    summary = labelled_summary()
    summary.update(headline=None, worst_slices=[], flagged_problems=[], selective=None, calibration=None,
                   uncertainty=None, most_harmful_corruption=None)
    write_json(tmp_path / "summary.json", summary)
    text = read_report(tmp_path)
    assert NOTICE in text and "config.json not found" in text
    assert "No problem passed the flagging thresholds." in text
    for absent in ("Stress test", "Selective prediction", "Case studies", "Data-check", "<img"):
        assert absent not in text


def test_unreadable_optional_file_is_named_not_fatal(labelled_dir):
    (labelled_dir / "calibrate" / "calibration_summary.json").write_text("{not json")
    text = read_report(labelled_dir)
    assert "calibration_summary.json: could not be read" in text
    assert re.search(r"ECE \(pairs pooled\)</td><td[^>]*>0.189</td>", text)  # summary.json still has it


def test_missing_summary_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="summary.json"):
        write_report(tmp_path)


def test_data_checks_and_case_studies_when_present(labelled_dir):
    write_json(labelled_dir / "data_checks" / "data_checks.json",
               {"labels": LABELS, "problems": [f"row 3: value 2 in Edema {XSS}"],
                "warnings": ["test split, label Edema: only negatives"],
                "images": {"warnings": ["2 image(s) are 16-bit"], "errors": [{"path": "x.png", "why": "truncated"}]},
                "ok": False})
    write_png(labelled_dir / "case_studies" / "case_ap_miss.png")
    write_json(labelled_dir / "case_studies" / "case_studies.json",
               {"label": "Effusion", "cases": {"ap_miss": {
                   "figure": "case_ap_miss.png", "image_path": "img/7.png", "view": "AP", "label": "Effusion",
                   "truth": 1, "nearest": False, "selected_as": "AP, finding present, p < 0.5",
                   "probabilities": {"clean": {"Effusion": 0.3125}}}}})
    text = read_report(labelled_dir)
    assert "row 3: value 2 in Edema &lt;script&gt;" in text
    assert "only negatives" in text and "2 image(s) are 16-bit" in text and "problems found" in text
    assert "truncated" in text  # a list of records is shown too, as JSON text
    assert "<h3>labels" not in text  # metadata lists are not warnings
    assert text.index("row 3: value 2") < text.index("only negatives")  # problems first
    assert "img/7.png, view AP: Effusion truth 1, clean probability 0.312" in text
    assert text.index("Case studies") < text.index("Data-check warnings") < text.index("Configuration")


def test_unlabelled_mode_renders_without_metric_tables(tmp_path):
    out = tmp_path / "unl"
    write_json(out / "summary.json", {
        "mode": "unlabelled", "image_dir": "/data/new_site", "n": 3, "labels": LABELS,
        "mean_probability": {"Cardiomegaly": 0.5895, "Edema": 0.46, "Effusion": 0.5122},
        "uncertainty": {"mc_dropout": {"samples": 5, "mean_std": 0.0175, "max_std": 0.0374}, "tta": None},
        "largest_prediction_shift": {"corruption": "gaussian_blur", "severity": 3, "label": "Cardiomegaly",
                                     "mean_abs_shift": 0.1548},
        "model_passes_over_split": 13,
        "flagged_problems": [{"kind": "quality", "message": "2 image(s) dark", "size": 2, "ci95": None}],
        "note": NOTICE})
    shifts = pd.DataFrame({"corruption": ["jpeg"], "severity": [3]})
    for lbl in LABELS:
        shifts[f"mean_abs_shift_{lbl}"], shifts[f"max_abs_shift_{lbl}"], shifts[f"flips_{lbl}"] = 0.04321, 0.2, 4
    (out / "stress").mkdir()
    shifts.to_csv(out / "stress" / "prediction_shifts.csv", index=False)
    write_png(out / "stress" / "stress_examples.png")
    quality = pd.DataFrame({"image_path": ["a.png", "b.png", "c.png"], "flag_dark": [True, True, False],
                            "flag_small": [False, False, False]})
    (out / "quality").mkdir()
    quality.to_csv(out / "quality" / "image_quality.csv", index=False)
    text = read_report(out)
    assert NOTICE in text and "/data/new_site" in text
    assert "Headline metrics" not in text and "AUROC [95% CI]" not in text and "Calibration and" not in text
    assert re.search(r"<td>Cardiomegaly</td><td[^>]*>0.590</td>", text)
    assert re.search(r"<td>dark</td><td[^>]*>2</td><td[^>]*>3</td>", text)
    assert re.search(r"<td>small</td><td[^>]*>0</td><td[^>]*>3</td>", text)
    assert re.search(r"<td>jpeg</td><td[^>]*>3</td><td[^>]*>0.043</td><td[^>]*>0.200</td><td[^>]*>4</td>", text)
    assert 'colspan="3" class="group">Edema' in text  # per-label columns under one header
    assert "2 image(s) dark" in text and 'class="badge badge-quality"' in text
    assert text.count("data:image/png;base64,") == 1


def test_drift_section_comes_first_and_greys_an_invalid_estimate(tmp_path):
    out = tmp_path / "site"
    write_json(out / "summary.json", {"mode": "unlabelled", "image_dir": "/data/new_site", "n": 40, "labels": LABELS,
                                      "flagged_problems": [], "not_run": {}, "note": NOTICE})
    write_json(out / "drift" / "drift_summary.json", {
        "reference": {"csv": "/data/ref.csv", "split": "val", "origin": "--reference"}, "drift_detected": True,
        "decision_rule": "either test's Holm-adjusted p-value (Holm over 2) below 0.05", "n_reference": 50,
        "n_new": 40, "domain_auroc": 0.91234, "domain_auroc_ci": [0.85, 0.96], "domain_p_value": 0.0004,
        "mmd": 0.0321, "mmd_p_value": 0.002, "permutations": 200,
        "ood": {"count": 3, "n": 40, "threshold": 12.5, "expected": 0.4, "quantile": 0.99, "p_value": 0.001}})
    per_label = {lbl: {"auroc": 0.7, "auroc_ci": [0.6, 0.8], "f1@0.5": 0.5, "f1@0.5_ci": [0.4, 0.6],
                       "sensitivity": 0.6, "sensitivity_ci": [0.5, 0.7], "specificity": 0.8,
                       "specificity_ci": [0.7, 0.9], "expected_prevalence": 0.3, "valid": False,
                       "reference_measured": {"auroc": 0.75}} for lbl in LABELS}
    write_json(out / "drift" / "estimated_performance.json",
               {"valid": False, "invalid_reason": "feature drift detected: " + XSS, "per_label": per_label})
    pd.DataFrame({"property": ["brightness", "file_format"], "kind": ["numeric", "categorical"],
                  "statistic": ["ks", "chi2"], "distance": [0.41234, 0.0], "p_value": [0.0001, 1.0],
                  "reference_mean": [100.0, None], "new_mean": [130.0, None], "reference_mode": [None, "PNG"],
                  "new_mode": [None, "PNG"], "distance_ci_low": [0.3, 0.0], "distance_ci_high": [0.55, 0.0],
                  "q_value": [0.0002, 1.0]}).to_csv(out / "drift" / "property_drift.csv", index=False)
    write_png(out / "drift" / "ood_montage.png")
    text = read_report(out)
    assert text.index("Is this site like the reference?") < text.index("Failures found")
    assert "Drift detected" in text and "n_reference = 50, n_new = 40" in text and "0.912 [0.850, 0.960]" in text
    assert text.count('<tr class="invalid">') == 3 and "Not valid: feature drift detected" in text
    assert XSS not in text  # the reason is escaped like any text from a file
    assert re.search(r"<td>brightness</td><td>ks</td><td[^>]*>0.412 \[0.300, 0.550\]</td>", text)
    assert re.search(r"<td>file_format</td><td>chi2</td>.*?<td>PNG</td><td>PNG</td>", text)
    assert "3 of 40 films" in text and text.count("data:image/png;base64,") == 1


def test_drift_section_says_why_it_did_not_run(tmp_path):
    out = tmp_path / "site"
    write_json(out / "summary.json", {"mode": "unlabelled", "image_dir": "/data/new_site", "n": 4, "labels": LABELS,
                                      "not_run": {"drift": "needs a labelled reference: pass --reference CSV"},
                                      "note": NOTICE})
    text = read_report(out)
    assert "Not assessed: needs a labelled reference: pass --reference CSV." in text
    assert re.search(r"<td>Drift against a reference, label-free performance estimate</td>", text)


# ====== in a real browser ======

def chromium_binary():
    return next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)


def test_report_renders_in_headless_chromium(labelled_dir, tmp_path):
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no chromium or chromium-browser on PATH (Debian: apt-get install -y chromium)")
    report = write_report(labelled_dir)
    shot = tmp_path / "shot.png"
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2000", f"--screenshot={shot}",
           report.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert shot.is_file(), f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-2000:]}"
    img = cv2.imread(str(shot))
    assert img is not None and img.shape[:2] == (2000, 1200)
    assert img.std() > 5
    non_white = (img < 235).any(axis=2)
    assert non_white.mean() > 0.01
    # text, the notice's yellow box and table headers: several distinct colours, not one flat fill
    colours = np.unique((img // 32).reshape(-1, 3), axis=0)
    assert len(colours) >= 4
    notice_yellow = (np.abs(img.astype(int) - [214, 244, 255]).sum(axis=2) < 12).mean()  # #fff4d6 in BGR
    assert notice_yellow > 0.001
