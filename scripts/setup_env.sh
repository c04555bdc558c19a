#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment.
# torch is installed first from the local CPU build and pinned by constraints.txt, so no later
# install can replace it with a CUDA build.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${MMCS_VENV:-$HOME/.venvs/mmcs}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$py" -m pip install -q "torch==2.13.0"
"$py" -m pip install -q -c "$repo/constraints.txt" -e "$repo[dev]"
echo "environment ready: $venv"
