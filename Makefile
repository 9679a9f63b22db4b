# The two commands of the README: `make demo` (set up, run the main job) and `make test` (set up, run the tests).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.attnscope-installed

.PHONY: setup demo test test-fast test-slow bench browsers clean

setup: $(STAMP)

# torch first and pinned: an unpinned torch (also pulled in by a dependency) downloads GBs of CUDA packages.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	$(PY) -c "import torch, sys; sys.exit('torch was replaced: ' + torch.__version__ if '+cpu' not in torch.__version__ and not torch.cuda.is_available() else 0)"
	touch $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/attnscope demo --out results/demo

test: setup browsers
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --dist loadfile -m "not slow" tests
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --doctest-modules src/attnscope
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow tests; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

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
