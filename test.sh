#!/usr/bin/env bash
# Run the test suite (installs what it needs into .venv first). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
