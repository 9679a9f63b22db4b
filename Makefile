# The two commands of the README: `make demo` (set up, run the main job) and `make test` (set up, run the tests).
# Both install the tested dependency set of constraints.txt; `make test-latest` resolves the newest versions that
# pyproject.toml allows in a separate venv and runs the same tests (how constraints.txt is refreshed).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.attnscope-installed
LATEST_VENV := .venv-latest
TORCH := torch==2.13.0

.PHONY: setup demo test run-tests test-latest constraints bench browsers clean

setup: $(STAMP)

# torch first and pinned: an unpinned torch (also pulled in by a dependency) downloads GBs of CUDA packages.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -c constraints.txt -e ".[all,dev]"
	$(PY) -c "import torch, sys; sys.exit('torch was replaced: ' + torch.__version__ if '+cpu' not in torch.__version__ and not torch.cuda.is_available() else 0)"
	touch $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/attnscope demo --out results/demo

test: setup browsers run-tests

run-tests:
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --dist loadfile -m "not slow" tests
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --doctest-modules src/attnscope
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow tests; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

# A fresh venv with the newest releases pyproject.toml allows (torch stays the CPU wheel), then the same tests;
# its resolved set is written to results/latest-constraints.txt (copy it over constraints.txt once it passes).
test-latest: browsers
	rm -rf $(LATEST_VENV) && python3 -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q $(TORCH)
	$(LATEST_VENV)/bin/python -m pip install -q -e ".[all,dev]"
	mkdir -p results && $(MAKE) --no-print-directory constraints VENV=$(LATEST_VENV) > results/latest-constraints.txt
	$(MAKE) run-tests VENV=$(LATEST_VENV)

# The installed set of $(VENV) as a constraints file (the editable attnscope left out, torch without +cpu).
constraints:
	@echo "# Tested dependency set (Python 3.11, CPU torch): make setup installs it; make test-latest refreshes it."
	@$(PIP) freeze --exclude-editable | sed -e 's/+cpu$$//' | grep -v '^attnscope'

# headless Chromium + chromedriver for tests/browser, and a C compiler for the fused CPU statistics kernel
# (Debian packages; skipped when already installed)
browsers:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] && command -v cc >/dev/null; then :; \
	else apt-get update -qq && apt-get install -y -qq chromium chromium-driver gcc; fi

bench: setup
	$(PY) benchmarks/capture.py
	$(PY) benchmarks/flow.py

clean:
	rm -rf $(VENV) results .pytest_cache
