# The two commands of the README. Each sets up the local virtual environment first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup demo test lint bench

setup:
	@VENV=$(VENV) bash scripts/setup_venv.sh

# The demo's own output folder: --force replaces the previous run's four files (scripts/demo.py --help).
demo: setup
	$(PY) scripts/demo.py --out demo_output --force

test: setup
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .

bench: setup
	$(PY) -m bench

# MiniBench (bench/minibench/README.md): the paper's evaluation in miniature on CPU. Uses the base model in
# bench/minibench/checkpoints/ if present (else trains it), then classifiers, LoRAs, the comparison table.
.PHONY: minibench
minibench: setup
	OMP_NUM_THREADS=1 $(PY) bench/minibench/minibench.py
