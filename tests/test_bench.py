"""The benchmark's smoke run: every item measured, its timings finite and positive, the JSON
readable, and the one exact number (model passes of valtool over the test split) right."""
import json
import math

import pytest

from tools import bench
from tools.errors import UserError

ITEMS = ("predict", "data_wait", "mc_dropout", "stress", "valtool_passes", "film_io", "analyses")


def numbers(obj):
    """Every number in a nested dict/list, booleans excluded."""
    if isinstance(obj, dict):
        for value in obj.values():
            yield from numbers(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from numbers(value)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    rc = bench.main(["--quick", "--n-images", "16", "--image-size", "64", "--n-films", "6",
                     "--film-size", "128", "--repeats", "2", "--batch-size", "8", "--scale-rows", "800",
                     "--scale-resamples", "40", "--reference-resamples", "2", "--out", str(out)])
    assert rc == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_every_item_has_finite_positive_timings(quick):
    assert quick["complete"] is True  # written after each item with false, at the end with true
    assert set(quick["items"]) == set(ITEMS)
    for key in ITEMS:
        item = quick["items"][key]
        values = list(numbers(item["timings"]))
        assert values, key
        assert all(math.isfinite(v) and v > 0 for v in values), (key, item["timings"])
        assert math.isfinite(item["ratio"]) and item["ratio"] > 0, key


# the value each target is on, and the target
TARGETS = {"predict": ("ratio", ">= 2.5"), "data_wait": ("warm_fraction", "<= 0.1"), "mc_dropout": ("ratio", "<= 1.1"),
           "stress": ("ratio", "<= 1"), "valtool_passes": ("counted", "<= 16")}  # 15 passes expected, 1 to spare


@pytest.mark.slow
def test_met_says_whether_the_reported_value_is_within_the_target(quick):
    for key, (value, target) in TARGETS.items():
        item = quick["items"][key]
        assert item["target"] == target, key
        op, bound = target.split()
        within = item[value] >= float(bound) if op == ">=" else item[value] <= float(bound)
        assert item["met"] is within, (key, item[value])
    assert quick["items"]["film_io"]["target"] == "info" and quick["items"]["film_io"]["met"] is None


@pytest.mark.slow
def test_interleaved_sides_have_one_timing_per_repeat(quick):
    t = quick["items"]["predict"]["timings"]
    # the plain loop's --batch-size 8 differs from the suite's CPU default, so the suite ran at 8 too
    assert len(t["predict_s"]) == len(t["plain_s"]) == len(t["predict_batch8_s"]) == 2
    assert "batch 16" in quick["items"]["predict"]["suite"] and "batch 8" in quick["items"]["predict"]["plain"]
    m = quick["items"]["mc_dropout"]["timings"]
    assert len(m["clean_features_mc_s"]) == len(m["clean_s"]) == 2
    assert len(m["mc_sampling_s"]) == 2 * quick["items"]["mc_dropout"]["chunks"]  # sampled once per chunk
    # the clean pass, then one group of 3 severities per corruption; a naive and a cached pass after each
    s = quick["items"]["stress"]["timings"]
    assert s["passes_per_group"] == [1, 3, 3, 3, 3]
    assert len(s["stress_s_per_group"]) == len(s["naive_clean_s"]) == len(s["cached_clean_s"]) == 5
    assert s["stress_total_s"] == pytest.approx(sum(s["stress_s_per_group"]))


@pytest.mark.slow
def test_ratios_are_the_medians_of_the_timings(quick):
    import statistics

    p = quick["items"]["predict"]
    n = p["images"]
    t = p["timings"]
    assert p["predict_img_s"] == pytest.approx(n / statistics.median(t["predict_s"]))
    # the ratio pairs the two sides of the same (interleaved) repeat
    assert p["ratio"] == pytest.approx(statistics.median(a / b for a, b in zip(t["plain_s"], t["predict_s"])))
    s = quick["items"]["stress"]["timings"]
    naive_13 = sum(p * t for p, t in zip(s["passes_per_group"], s["naive_clean_s"]))  # 13 passes' worth
    assert quick["items"]["stress"]["ratio"] == pytest.approx(s["stress_total_s"] / naive_13)


@pytest.mark.slow
def test_valtool_passes_over_the_test_split_are_counted_exactly(quick):
    v = quick["items"]["valtool_passes"]
    tta = v["flags"]["tta_samples"]
    assert v["counted"] == 1 + 12 + tta  # the clean pass, 4 corruptions x 3 severities, TTA draws
    assert v["summary_json"] == v["counted"] and v["matches_summary"] is True
    assert v["other_passes"] >= 1  # the val split's pass for the temperature is not over the test rows
    assert v["met"] is True


@pytest.mark.slow
def test_sanity_compares_the_two_precisions_on_the_same_images(quick):
    p = quick["items"]["predict"]
    s = p["sanity"]
    assert s["auroc_diff"] == pytest.approx(abs(s["macro_auroc_suite"] - s["macro_auroc_plain_fp32"]))
    if p["precision"] == "fp32":
        # the same fp32 model on the same pixels on both sides: only the order of summation differs,
        # so logits of different images compared (rows out of order) would show here
        assert s["max_abs_logit_diff"] < 1e-3
        assert s["decisions_agree"] == 1.0
    else:
        assert s["max_abs_logit_diff"] > 0  # the suite's side really ran in bf16


@pytest.mark.slow
def test_machine_description(quick):
    import os

    import torch

    from tools.runtime import cpu_has_bf16

    m = quick["machine"]
    assert m["cores"] == os.cpu_count() and m["torch_threads"] == torch.get_num_threads()
    assert m["torch"] == torch.__version__ and m["cpu"] == bench.cpu_model()
    assert m["device"] == "cpu" and m["precision"] == ("bf16" if cpu_has_bf16() else "fp32")


@pytest.mark.slow
def test_table_has_a_row_per_item(quick):
    text = bench.format_table(quick["items"])
    for tag in ("1 ", "1b ", "1 fp32", "1 bf16", "2 ", "3 ", "4 ", "5 ", "6 ", "7 ", "7b ", "7c ", "7d "):
        assert any(line.startswith(tag) for line in text.splitlines()), tag


def test_timed_loader_splits_waiting_from_stepping():
    import time

    import torch

    class Slow:
        dataset = list(range(3))

        def __len__(self):
            return 3

        def __iter__(self):
            for i in range(3):
                time.sleep(0.01)
                yield i

    loader = bench.TimedLoader(Slow(), torch.device("cpu"))
    for _ in loader:
        time.sleep(0.1)
    assert len(loader.waits) == len(loader.steps) == 3
    # a wait holds the loader's 10 ms, never the 100 ms step after it
    assert all(0.01 <= w < 0.1 for w in loader.waits)
    assert all(s >= 0.1 for s in loader.steps)


def test_gpu_mode_refuses_without_cuda(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--gpu", "--out", "unused.json"]) == 2
    assert "--gpu: no CUDA device" in capsys.readouterr().err


def test_sizes_are_checked():
    with pytest.raises(UserError, match="--repeats 0"):
        bench.resolve_options(bench.build_parser().parse_args(["--repeats", "0"]))


def test_a_failed_item_is_kept_as_a_row_not_lost():
    def broken():
        raise ImportError("cannot import name 'x'")

    item = bench.run_item(broken)
    assert item["error"] == "ImportError: cannot import name 'x'" and item["met"] is None
    assert "failed: ImportError" in bench.format_table({"stress": item})


def test_chunks_cover_every_row_once_in_order():
    import numpy as np

    parts = bench.chunk_rows(10, 4)
    assert [p.tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert np.array_equal(np.concatenate(parts), np.arange(10))


def test_in_chunks_alternates_sides_chunk_by_chunk():
    import torch

    order = []
    times = bench.in_chunks({"a": lambda k: order.append(("a", k)), "b": lambda k: order.append(("b", k))},
                            n_chunks=2, repeats=2, device=torch.device("cpu"))
    assert order == [("a", 0), ("b", 0), ("a", 1), ("b", 1)] * 2
    assert len(times["a"]) == len(times["b"]) == 2


def test_other_load_leaves_out_this_process_own_work(monkeypatch):
    import os
    import time

    def measure(busy_all, busy_own):
        """OtherLoad's fraction when the machine's busy CPU seconds grow by ``busy_all`` and this
        process's by ``busy_own`` (cpu_seconds gives both, machine first)."""
        readings = iter([(100.0, 5.0), (100.0 + busy_all, 5.0 + busy_own)])
        monkeypatch.setattr(bench, "cpu_seconds", lambda: next(readings))
        with bench.OtherLoad() as load:
            time.sleep(0.05)
        return load.fraction

    assert measure(0.04, 0.04) == pytest.approx(0.0, abs=1e-9)  # all the busy time was this process's own
    fraction = measure(0.09, 0.04)  # 0.05 s of it came from other jobs
    wall_upper = 0.05 * 20  # the sleep took at least 0.05 s; bound the fraction from both sides
    cores = os.cpu_count() or 1
    assert 0.05 / (wall_upper * cores) <= fraction <= 0.05 / (0.05 * cores)


@pytest.mark.slow
def test_the_precisions_are_measured_side_by_side_or_said_to_be_unsupported(quick):
    from tools.runtime import cpu_has_bf16

    p = quick["items"]["predict"]
    assert set(p["precisions"]) == {"fp32", "bf16"}
    assert p["precisions"]["fp32"]["supported"] is True and p["precisions"]["fp32"]["img_s"] > 0
    bf16 = p["precisions"]["bf16"]
    assert bf16["supported"] is cpu_has_bf16()
    if not bf16["supported"]:
        assert bf16["note"].startswith("not supported here")
        assert any("not supported here" in line for line in bench.format_table(quick["items"]).splitlines()
                   if line.startswith("1 bf16"))


def test_a_precision_without_hardware_support_is_a_row_that_says_so():
    item = {"precision": "fp32", "image_size": 64, "predict_img_s": 10.0, "plain_img_s": 4.0, "ratio": 2.5,
            "target": ">= 2.5", "met": True, "plain": "batch 16",
            "sanity": {"max_abs_logit_diff": 0.0, "macro_auroc_suite": 0.8, "macro_auroc_plain_fp32": 0.8,
                       "decisions_agree": 1.0},
            "precisions": {"fp32": {"supported": True, "img_s": 10.0, "ratio_vs_plain_fp32": 2.5},
                           "bf16": {"supported": False, "note": "not supported here: no bf16"}}}
    rows = {r[0]: r for r in bench.table_rows({"predict": item})}
    assert rows["1 fp32"][2] == "10.00 img/s" and rows["1 fp32"][4] == "2.50x"
    assert rows["1 bf16"][1] == "predict at bf16: not supported here: no bf16" and rows["1 bf16"][2] == ""


@pytest.mark.slow
def test_the_analyses_at_scale_run_alone_and_agree_with_the_reference_loop(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--analyses", "--quick", "--scale-rows", "600", "--scale-resamples", "30",
                       "--reference-resamples", "2", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc["items"]) == {"analyses"}  # no demo images, no model
    a = doc["items"]["analyses"]
    assert a["rows"] == 600 and a["labels"] == 14 and a["resamples"] == 30 and a["reference_resamples"] == 2
    assert a["group_cols"] == ["view", "sex", "age"]
    assert 100 <= a["patients"] <= 600 / 3  # about 3.7 films per patient
    assert a["sanity"]["undefined_agree"] is True
    assert max(a["sanity"]["max_abs_diff"].values()) < 1e-9
    t = a["timings"]
    assert a["suite_s"] == pytest.approx(sum(t[f"suite_{k}_s"] for k in ("eval", "calibrate", "selective")))
    per_resample = sum(t[f"reference_{k}_s_per_resample"] for k in ("eval", "calibrate", "selective"))
    assert a["reference_s_extrapolated"] == pytest.approx(per_resample * 30)
    assert a["ratio"] == pytest.approx(a["reference_s_extrapolated"] / a["suite_s"])
    assert a["met"] is (a["suite_s"] <= 60)


def test_reference_resamples_cannot_exceed_the_resamples():
    with pytest.raises(UserError, match="--reference-resamples 50"):
        bench.resolve_options(bench.build_parser().parse_args(["--scale-resamples", "20", "--reference-resamples", "50"]))


@pytest.mark.slow
def test_backends_item_compares_runtimes_with_eager_and_says_what_it_could_not_measure(tmp_path):
    out = tmp_path / "backends.json"
    assert bench.main(["--backends", "--no-compile-backend", "--image-size", "32", "--repeats", "1",
                       "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc["items"]) == {"backends"}
    item = doc["items"]["backends"]
    assert item["eager_img_s"] > 0 and all(v > 0 for v in item["timings"]["eager_s"])
    assert item["backends"]["torch.compile"] == {"measured": False, "note": "not measured (--no-compile-backend)"}
    ort = item["backends"]["onnxruntime"]
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        assert ort == {"measured": False, "note": f"{exc.name} is not installed (pip install -r requirements-bench.txt "
                                                   "to measure ONNX Runtime)"}
        return
    assert ort["max_abs_logit_diff"] <= bench.BACKEND_TOLERANCE
    assert ort["adopt"] is (ort["ratio_vs_eager"] >= bench.BACKEND_MARGIN)


def test_backends_item_refuses_the_gpu_mode():
    with pytest.raises(UserError, match="--backends measures CPU runtimes"):
        bench.resolve_options(bench.build_parser().parse_args(["--backends", "--gpu"]))
