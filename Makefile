# make demo   - set up .venv, build the demo data, train the CPU demo, write grids + the evaluation table
# make test   - set up .venv and run the test suite (under ~15 min on 2 cores)
# make test-slow - the slow tests (long training runs)
# GPU machines: keep your CUDA torch with `make CONSTRAINTS= test` (or install the project yourself).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONSTRAINTS ?= -c constraints-cpu.txt
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench clean-venv

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(CONSTRAINTS) -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/run_demo.py

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) scripts/bench_train_step.py

clean-venv:
	rm -rf $(VENV)
