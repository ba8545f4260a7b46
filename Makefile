# The README's two commands: `make demo` and `make test` do all the set-up themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)
DEMO := data/demo
OUT := outputs/demo
# Demo model: 128 px, trained from scratch on the CPU (no ImageNet weights offline), hence lr 1e-3.
DEMO_FLAGS := --csv $(DEMO)/demo.csv --img-root $(DEMO)
EPOCHS ?= 8

.PHONY: install demo test bench clean-demo

install: $(STAMP)

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	rm -f $(VENV)/.installed-*
	touch $@

demo: install
	$(PY) -m tools.make_demo_data --out $(DEMO) --n 1000 --seed 0
	$(PY) -m tools.check_data $(DEMO_FLAGS)
	$(PY) main.py train $(DEMO_FLAGS) --image-size 128 --epochs $(EPOCHS) --lr 1e-3 --pretrained none --outdir $(OUT)/train
	$(PY) main.py eval $(DEMO_FLAGS) --weights $(OUT)/train/best.pt --group-col view site num_findings_bin --outdir $(OUT)/eval
	$(PY) main.py stress $(DEMO_FLAGS) --weights $(OUT)/train/best.pt --group-col view site --outdir $(OUT)/stress
	$(PY) main.py calibrate $(DEMO_FLAGS) --weights $(OUT)/train/best.pt --outdir $(OUT)/calibrate
	$(PY) main.py selective --calibrated $(OUT)/calibrate/predictions_calibrated_test.csv --weights $(OUT)/train/best.pt --confidence all --outdir $(OUT)/selective
	$(PY) main.py valtool $(DEMO_FLAGS) --weights $(OUT)/train/best.pt --group-col view site num_findings_bin --outdir $(OUT)/valtool
	@echo "report: $(CURDIR)/$(OUT)/valtool/report.html"

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) -m tools.bench

clean-demo:
	rm -rf $(DEMO) $(OUT)
