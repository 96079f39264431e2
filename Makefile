# The two commands of the README. Each sets up the local virtual environment(s) first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
# The second test host: a ComfyUI source tree in its own environment (scripts/setup_venv.sh --comfyui).
# `make test` runs the suite on ComfyUI 0.3.75 (.venv), then on 0.8.0 (CI clones the repository with shared/
# beside it); `COMFYUI_DIR=/path/to/ComfyUI make test` runs it on that checkout only.
COMFY_VENV ?= .venv-comfyui
COMFYUI_08 ?= ../shared/hosts/comfyui-0.8.0
COMFYUI_TREE := $(or $(COMFYUI_DIR),$(COMFYUI_08))
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup setup-comfyui demo test lint bench

setup:
	@VENV=$(VENV) bash scripts/setup_venv.sh

setup-comfyui:
	@COMFY_VENV=$(COMFY_VENV) bash scripts/setup_venv.sh --comfyui "$(COMFYUI_TREE)"

# The demo's own output folder: --force replaces the previous run's four files (scripts/demo.py --help).
demo: setup
	$(PY) scripts/demo.py --out demo_output --force

# Each host's pytest run prints its wall time (scripts/test_hosts.sh); both run even if the first fails.
ifeq ($(strip $(COMFYUI_DIR)),)
test: setup setup-comfyui
else
test: setup-comfyui
endif
	@VENV=$(VENV) COMFY_VENV=$(COMFY_VENV) COMFYUI_08=$(COMFYUI_08) bash scripts/test_hosts.sh

lint: setup
	$(PY) -m ruff check .

bench: setup
	$(PY) -m bench

# MiniBench 2 (bench/minibench/README.md): the paper's evaluation in miniature on CPU (or a CUDA GPU when there
# is one). Uses the committed base, classifiers and LoRAs, then the paired comparison on the dev and test splits
# (cached runs are reused). `make minibench PAIR=content_dir:style_dir` trains two LoRAs from your folders of
# images and compares the methods on that pair alone; SPLIT=dev runs only the dev split; SEEDS="0 1 …" other seeds;
# WORKERS=N processes side by side (default: one per CPU core, one on a GPU).
.PHONY: minibench
minibench: setup
	OMP_NUM_THREADS=1 $(PY) bench/minibench/minibench.py $(if $(PAIR),--pair "$(PAIR)",) $(if $(SPLIT),--split $(SPLIT),) $(if $(SEEDS),--seeds $(SEEDS),) $(if $(WORKERS),--workers $(WORKERS),)
