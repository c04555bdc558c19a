#!/usr/bin/env bash
# Set up the environments and run the test suite (what CI runs).
# Two environments: $MMCS_VENV (default ~/.venvs/mmcs) for everything, and $MMCS_DEPLOY_VENV
# (default ~/.venvs/mmcs-deploy) for the MONAI Deploy app, whose SDK makes every `import monai` load
# holoscan; tests/deploy runs the app there as a subprocess.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${MMCS_VENV:-$HOME/.venvs/mmcs}
deploy_venv=${MMCS_DEPLOY_VENV:-$HOME/.venvs/mmcs-deploy}
bash "$repo/scripts/setup_env.sh" dev
MMCS_VENV="$deploy_venv" bash "$repo/scripts/setup_env.sh" deploy
export MMCS_DEPLOY_PYTHON="$deploy_venv/bin/python" MMCS_REQUIRE_DEPLOY=1
cd "$repo"
exec "$venv/bin/python" -m pytest -q "$@"
