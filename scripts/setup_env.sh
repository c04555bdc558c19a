#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment: bash scripts/setup_env.sh [EXTRAS]
# (EXTRAS e.g. "dev" for the tests' dependencies).
# torch is installed first from the local CPU build and pinned by constraints.txt, so no later
# install can replace it with a CUDA build.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${MMCS_VENV:-$HOME/.venvs/mmcs}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q "torch==2.13.0"
extras=${1:+[$1]}
"$py" -m pip install -q -c "$repo/constraints.txt" -e "$repo$extras"
if [[ ",${1:-}," == *,label,* ]]; then
    # monailabel pulls torchvision (through monai[torchvision] and sam2), whose wheel is a CUDA build that
    # fails on import against the CPU torch ("operator torchvision::nms does not exist") and breaks
    # MONAI's optional imports. Nothing here uses it.
    "$py" -m pip uninstall -q -y torchvision
fi
echo "environment ready: $venv"
