# The README's two commands: `make demo` and `make test` do all the set-up themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)
DEMO := data/demo
OUT := outputs/demo

.PHONY: install demo test bench clean-demo

install: $(STAMP)

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	rm -f $(VENV)/.installed-*
	touch $@

demo: install
	$(PY) -m tools.make_demo_data --out $(DEMO) --n 1000 --seed 0
	$(PY) -m tools.check_data --csv $(DEMO)/demo.csv --img-root $(DEMO)

test: install
	$(PY) -m pytest -q tests

clean-demo:
	rm -rf $(DEMO) $(OUT)
