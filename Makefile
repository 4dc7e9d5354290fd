# Two commands matter: `make demo` (set up + run the main job offline) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0
OUT    ?= runs/demo

.PHONY: setup demo test bench lint clean browser

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# CPU torch first (see DESIGN.md §8): any other spec pulls GBs of CUDA wheels.
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(PY) -m sims.cli demo --out $(OUT)

test: setup browser
	# two workers, one test file each at a time; a worker that crashes (a segfault in a native
	# library) fails the run at once and names its test: restarting it hung xdist with loadfile
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --max-worker-restart=0

# The console's browser tests drive Debian's chromium (Playwright's own browser download
# does not work here); installed only when missing. Without it those tests fail, loudly.
CHROMIUM ?= /usr/bin/chromium

browser:
	@test -x $(CHROMIUM) || { \
	  echo "browser: $(CHROMIUM) is missing; installing Debian's chromium (apt-get)"; \
	  { apt-get update -q && apt-get install -y -q chromium; } >/dev/null 2>&1 || \
	  echo "browser: could not install chromium (need root and Debian's package archive):" \
	       "the console's browser tests (tests/console) will fail; install it by hand:" \
	       "apt-get install chromium, or set CHROMIUM=/path/to/chromium"; }

BENCH  ?= runs/bench

bench: setup
	HF_HUB_OFFLINE=1 $(PY) -m sims.cli bench embed --json $(BENCH)/embed.json
	HF_HUB_OFFLINE=1 $(PY) -m sims.cli bench node --json $(BENCH)/node.json
	HF_HUB_OFFLINE=1 $(PY) -m sims.cli bench broker --json $(BENCH)/broker.json

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs
