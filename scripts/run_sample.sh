#!/usr/bin/env bash
# The main job on the built-in sample data: set up, train through the MONAI bundle, segment the
# sample images. Writes bundle/models/model.pt and outputs/sample/{*_masks.tif,*_overlay.png}.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${MMCS_VENV:-$HOME/.venvs/mmcs}
bash "$repo/scripts/setup_env.sh"
cd "$repo"
py="$venv/bin/python"
"$py" -m monai.bundle run training \
    --config_file bundle/configs/train.json --meta_file bundle/configs/metadata.json \
    --logging_file bundle/configs/logging.conf --bundle_root bundle "$@"
"$py" -m monai.bundle run inference \
    --config_file bundle/configs/inference.json --meta_file bundle/configs/metadata.json \
    --logging_file bundle/configs/logging.conf --bundle_root bundle \
    --input_dir bundle/sample_data/images --output_dir outputs/sample --skip_done False
echo "model: bundle/models/model.pt; masks and overlays: outputs/sample/"
