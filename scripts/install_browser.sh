#!/usr/bin/env bash
# Installs what the browser tests (tests/browser/) need, and nothing else:
#   - Debian's `chromium` and `chromium-driver` (apt-get, only if missing);
#   - the `playwright` Python package into the virtualenv (pip, only if missing).
# Playwright drives the SYSTEM chromium (executable_path=/usr/bin/chromium): we never run
# `playwright install`, which downloads a browser build from outside the package registries.
# Idempotent and quiet: a second run does nothing and prints one line.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
# Pinned so the CDP protocol Playwright speaks is a known quantity; the browser itself is Debian's.
PLAYWRIGHT_SPEC="${PLAYWRIGHT_SPEC:-playwright==1.65.2}"

missing_debs=()
for pkg in chromium chromium-driver; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing_debs+=("$pkg")
    fi
done

if ((${#missing_debs[@]})); then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        SUDO="sudo"
    fi
    echo "install_browser: apt-get install ${missing_debs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing_debs[@]}" >/dev/null
fi

if [ ! -x "$PY" ]; then
    echo "install_browser: no virtualenv at $VENV (run scripts/setup_venv.sh first)" >&2
    exit 1
fi

if ! "$PY" -c "import playwright.sync_api" 2>/dev/null; then
    echo "install_browser: pip install $PLAYWRIGHT_SPEC"
    "$PY" -m pip install -q "$PLAYWRIGHT_SPEC"
fi

echo "install_browser: $(/usr/bin/chromium --version 2>/dev/null || echo 'chromium missing'), playwright $("$PY" -c 'from importlib.metadata import version; print(version("playwright"))')"
