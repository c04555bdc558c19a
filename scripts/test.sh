#!/usr/bin/env bash
# Set up the environments and run the test suite (what CI runs).
# Four environments: $MMCS_VENV (default ~/.venvs/mmcs) for everything; $MMCS_DEPLOY_VENV
# (default ~/.venvs/mmcs-deploy) for the MONAI Deploy app, whose SDK makes every `import monai` load
# holoscan (tests/deploy runs the app there as a subprocess); $MMCS_LABEL_VENV (default
# ~/.venvs/mmcs-label) for the MONAI Label server, which holds numpy at 1.26 (tests/label starts it there);
# $MMCS_BIOIMAGEIO_VENV (default ~/.venvs/mmcs-bioimageio) for bioimageio.core, which needs pydantic < 2.12
# (tests/test_export.py runs `bioimageio test` and its prediction API there).
# The napari plugin's tests (tests/napari) run in the main environment (the dev extra includes napari) on a virtual
# X display: napari draws with OpenGL, which Qt 6's offscreen platform lacks; tests/napari/conftest.py starts Xvfb.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${MMCS_VENV:-$HOME/.venvs/mmcs}
deploy_venv=${MMCS_DEPLOY_VENV:-$HOME/.venvs/mmcs-deploy}
label_venv=${MMCS_LABEL_VENV:-$HOME/.venvs/mmcs-label}
bioimageio_venv=${MMCS_BIOIMAGEIO_VENV:-$HOME/.venvs/mmcs-bioimageio}
bash "$repo/scripts/setup_env.sh" dev
MMCS_VENV="$deploy_venv" bash "$repo/scripts/setup_env.sh" deploy
MMCS_VENV="$label_venv" bash "$repo/scripts/setup_env.sh" label
MMCS_VENV="$bioimageio_venv" bash "$repo/scripts/setup_env.sh" bioimageio
export MMCS_DEPLOY_PYTHON="$deploy_venv/bin/python" MMCS_REQUIRE_DEPLOY=1
export MMCS_LABEL_PYTHON="$label_venv/bin/python" MMCS_REQUIRE_LABEL=1
# Xvfb and the two xcb libraries Qt 6's xcb platform needs beyond the base image (root with apt-get only, e.g. CI)
has_display_libs() { command -v Xvfb && ldconfig -p | grep -q libxcb-icccm.so.4 && ldconfig -p | grep -q libxcb-keysyms.so.1; }
if ! has_display_libs >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq xvfb libxcb-icccm4 libxcb-keysyms1 libxcb-cursor0 >/dev/null
fi
export MMCS_REQUIRE_NAPARI=1
export MMCS_BIOIMAGEIO_PYTHON="$bioimageio_venv/bin/python" MMCS_REQUIRE_BIOIMAGEIO=1
# the Cellpose reference (dev extra) must be there: its parity tests fail instead of skipping
export MMCS_REQUIRE_CELLPOSE=1
# the shared data sits beside the checkout in this project's workspaces (../shared): where that folder
# exists its dev data is expected, and tests that need it fail instead of skipping when it is missing
if [ -d "$repo/../shared" ]; then export MMCS_REQUIRE_DEV_DATA=1; fi
cd "$repo"
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
exec "$venv/bin/python" -m pytest -q --durations=15 "$@"
