# The two commands of the README. Each sets up the local virtual environment(s) first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
# The test host besides ComfyUI 0.3.75 (.venv): the ComfyUI 0.33.0 source tree, in its own environment
# (scripts/setup_venv.sh --comfyui). CI clones the repository with shared/ beside it. `make test` runs the suite
# on 0.3.75, then on 0.33.0; `COMFYUI_DIR=/path/to/ComfyUI make test` on that checkout only (in $(COMFY_VENV)),
# e.g. COMFYUI_DIR=../shared/hosts/comfyui-0.8.0 (docs/hosts.md says why 0.8.0 left the default run).
COMFYUI_033 ?= ../shared/hosts/comfyui-0.33.0
VENV_033 ?= .venv-comfyui-0.33
COMFY_VENV ?= .venv-comfyui
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup setup-comfyui demo test lint bench

setup:
	@VENV=$(VENV) bash scripts/setup_venv.sh

# One environment per ComfyUI source tree under test: $(COMFYUI_DIR) alone when it is set, else 0.33.0
# (left out with a message when it is not beside the repository, except in CI, where it must be there).
setup-comfyui:
ifeq ($(strip $(COMFYUI_DIR)),)
	@if [ -d "$(COMFYUI_033)" ] || [ "$$CI" = true ]; then COMFY_VENV=$(VENV_033) bash scripts/setup_venv.sh --comfyui "$(COMFYUI_033)"; \
	else echo "setup: no ComfyUI source tree at $(COMFYUI_033): that host is left out (CI always has it)"; fi
else
	@COMFY_VENV=$(COMFY_VENV) bash scripts/setup_venv.sh --comfyui "$(COMFYUI_DIR)"
endif

# The demo's own output folder: --force replaces the previous run's four files (scripts/demo.py --help).
# It runs on ComfyUI 0.33.0 ($(COMFYUI_033)) where that tree is present, on $(COMFYUI_DIR) when that is set, else
# on the pip-installable ComfyUI 0.3.75 in $(VENV).
DEMO_TREE := $(or $(COMFYUI_DIR),$(wildcard $(COMFYUI_033)))
DEMO_VENV := $(if $(COMFYUI_DIR),$(COMFY_VENV),$(VENV_033))
ifeq ($(strip $(DEMO_TREE)),)
demo: setup
	$(PY) scripts/demo.py --out demo_output --force
else
demo:
	@COMFY_VENV=$(DEMO_VENV) bash scripts/setup_venv.sh --comfyui "$(DEMO_TREE)"
	COMFYUI_DIR="$(DEMO_TREE)" $(DEMO_VENV)/bin/python scripts/demo.py --out demo_output --force
endif

# Each host's pytest run prints its wall time (scripts/test_hosts.sh); every host runs even if one fails.
ifeq ($(strip $(COMFYUI_DIR)),)
test: setup setup-comfyui
else
test: setup-comfyui
endif
	@VENV=$(VENV) COMFY_VENV=$(COMFY_VENV) COMFYUI_033=$(COMFYUI_033) VENV_033=$(VENV_033) bash scripts/test_hosts.sh

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
