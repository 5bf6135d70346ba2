# make demo   - set up .venv, build the demo data, train all five stages small on CPU (about 20 min on 2 cores), write grids + the table
# make demo-quality - the per-stage quality runs (stages 1-5, up to ~30 min each, runs/quality)
# make test   - set up .venv and run the test suite (under ~15 min on 2 cores)
# make test-slow - the slow tests (long training runs)
# make bench  - speed benchmarks (training step, loader, ours vs diffusers); make bench-curriculum - stage 2 with/without stage 1
# GPU machines: keep your CUDA torch with `make CONSTRAINTS= test` (or install the project yourself).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONSTRAINTS ?= -c constraints-cpu.txt
STAMP := $(VENV)/.installed

.PHONY: demo demo-quality test test-slow bench bench-curriculum clean-venv browser

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(CONSTRAINTS) -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/run_demo.py

demo-quality: $(STAMP)
	$(PY) scripts/run_demo.py --profile quality

test: $(STAMP) browser
	$(PY) -m pytest -q

# The app test drives a real headless Chromium; install it where we may (root + apt-get), else that test skips.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) ; } || \
	  echo "note: no Chromium and no way to install it here; the browser test of the app will be skipped"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) scripts/bench_train_step.py
	$(PY) scripts/bench_loader.py
	$(PY) scripts/bench_vs_diffusers.py

# ~50 minutes on 2 cores: stage 2 from the reparameterized stage 1 vs from scratch (needs the demo's stage 1)
bench-curriculum: $(STAMP)
	$(PY) scripts/bench_curriculum.py

clean-venv:
	rm -rf $(VENV)
