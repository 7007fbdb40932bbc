#!/usr/bin/env bash
# Create .venv (if missing or stale) and install slimmable with its test, export, serve and timm extras.
# Sourced by run.sh and test.sh; safe to run repeatedly (a stamp file skips reinstalling unchanged deps).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"
STAMP="$VENV/.slimmable-installed"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PY" -m venv "$VENV"
fi
# Reinstall when pyproject.toml changed since the last install.
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
    echo "[setup] installing slimmable and its dependencies into .venv (first run: a few minutes)"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT[dev,export,serve,timm]"
    echo "$want" > "$STAMP"
fi
