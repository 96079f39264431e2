# The two commands of the README. Each sets up the local virtual environment first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup demo test lint bench

setup:
	@VENV=$(VENV) bash scripts/setup_venv.sh

demo: setup
	$(PY) -m duolora demo --out demo_output

test: setup
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .

bench: setup
	$(PY) -m bench
