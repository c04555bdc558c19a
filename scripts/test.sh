#!/usr/bin/env bash
# Set up the environment and run the test suite (what CI runs).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${MMCS_VENV:-$HOME/.venvs/mmcs}
bash "$repo/scripts/setup_env.sh" dev
cd "$repo"
exec "$venv/bin/python" -m pytest -q "$@"
