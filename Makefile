# The README's two commands: `make demo` and `make test` do all the set-up themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-cuda.txt | cksum | cut -d' ' -f1)
BENCH_STAMP := $(VENV)/.bench-$(shell cksum requirements-bench.txt | cut -d' ' -f1)
DEMO := data/demo
SITE := data/demo_site
OUT := outputs/demo
# Demo model: 128 px, trained from scratch on the CPU (no ImageNet weights offline), hence lr 1e-3.
DEMO_FLAGS := --csv $(DEMO)/demo.csv --img-root $(DEMO)
EPOCHS ?= 5
# auto: bf16 where the CPU or GPU has it natively, else fp32; PRECISION=bf16 gives a bf16 CPU's
# arithmetic on any CPU (slowly where it is emulated), PRECISION=fp32 the other way round.
PRECISION ?= auto
NPROC := $(shell nproc 2>/dev/null || echo 1)
# Test processes (pytest-xdist): one per core, at most 4; each builds its own small fixtures.
TEST_WORKERS ?= $(shell n=$(NPROC); [ $$n -gt 4 ] && n=4; echo $$n)

.PHONY: install demo test bench clean-demo

install: $(STAMP)

$(STAMP): requirements.txt requirements-cuda.txt
	$(PYTHON) -m venv $(VENV)
	# pip unpacks wheels on one core: both pinned lists at once, each without resolving (--no-deps),
	# then one pip that resolves the whole and installs whatever they missed (nothing, normally).
	$(PY) -m pip install -q --no-compile --no-deps -r requirements-cuda.txt & \
	$(PY) -m pip install -q --no-compile --no-deps -r requirements.txt; wait
	$(PY) -m pip install -q --no-compile -r requirements.txt
	# Byte-compile only what the suite imports: pip would compile every file of torch (a minute more).
	env -u PYTHONDONTWRITEBYTECODE $(PY) -c "import torch, torchvision, sklearn.linear_model, sklearn.model_selection, \
	sklearn.cluster, sklearn.metrics, scipy.stats, scipy.special, pandas, matplotlib.figure, \
	matplotlib.backends.backend_agg, cv2, albumentations, pydicom, pytest"
	rm -f $(VENV)/.installed-*
	touch $@

demo: install
	$(PY) -m tools.make_demo_data --out $(DEMO) --n 1000 --seed 0 --workers $(NPROC) --format mixed
	$(PY) -m tools.check_data $(DEMO_FLAGS)
	$(PY) main.py train $(DEMO_FLAGS) --image-size 128 --epochs $(EPOCHS) --lr 1e-3 --pretrained none --precision $(PRECISION) --outdir $(OUT)/train
	$(PY) main.py valtool $(DEMO_FLAGS) --weights $(OUT)/train/best.pt --group-col view site num_findings_bin --precision $(PRECISION) --outdir $(OUT)/valtool
	@echo "report: $(CURDIR)/$(OUT)/valtool/report.html"
	# A new site without labels (another detector) against the demo's validation split: one corruption, no TTA, to stay short.
	$(PY) -m tools.make_demo_data --out $(SITE) --n 150 --seed 1 --site-shift device --workers $(NPROC)
	$(PY) main.py valtool --image-dir $(SITE)/images --weights $(OUT)/train/best.pt --reference $(DEMO)/demo.csv \
	--img-root $(DEMO) --corruptions gaussian_blur --tta-samples 0 --precision $(PRECISION) --outdir $(OUT)/new_site
	@echo "new-site report: $(CURDIR)/$(OUT)/new_site/report.html"

test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

bench: install $(BENCH_STAMP)
	$(PY) -m tools.bench
	$(PY) -m tools.bench --backends --out outputs/bench/backends.json

# The runtimes the bench compares with PyTorch eager (item 8); the suite itself does not need them.
$(BENCH_STAMP): requirements-bench.txt $(STAMP)
	$(PY) -m pip install -q --no-compile -r requirements-bench.txt
	rm -f $(VENV)/.bench-*
	touch $@

clean-demo:
	rm -rf $(DEMO) $(SITE) $(OUT)
