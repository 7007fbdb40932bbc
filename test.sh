#!/usr/bin/env bash
# Run the test suite (installs what it needs into .venv first). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh
# -n auto: one pytest worker per core (pytest-xdist); each test uses one torch thread (tests/conftest.py)
exec .venv/bin/python -m pytest -q -n auto "$@"
