# Two commands matter: `make demo` (set up + run the main job offline) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0
OUT    ?= runs/demo

.PHONY: setup demo test bench lint clean

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

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider

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
