#!/usr/bin/env bash
# Rebuild the shipped generalist model: phase 1 (supervised, dev + extra train, subsets balanced),
# phase 2 (mean teacher on extra's 18 unlabelled phase-contrast images) from the phase-1 model, then
# phase 2 on the unlabelled pool (../shared/data/unlabelled, 8 images per source, sources balanced) from
# that: about 2 h 15 min on 2 CPU cores. Needs ../shared/data. Writes runs/generalist/{phase1,phase2,pool}/
# (models, TensorBoard, logs); the shipped bundle/models/model.pt is not touched (copy it there yourself,
# see bundle/docs/README.md).
# Extra arguments go to every phase (e.g. --precision fp32, --device cuda).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${MMCS_VENV:-$HOME/.venvs/mmcs}
py="$venv/bin/python"
out=${MMCS_RUN_DIR:-$repo/runs/generalist}
cd "$repo"
mkdir -p "$out/phase1" "$out/phase2" "$out/pool"
"$py" -m monai.bundle run training --bundle_root bundle --logging_file bundle/configs/logging.conf \
    --config_file "['bundle/configs/train.json','experiments/recipes/generalist_data.json','experiments/recipes/generalist_cpu.json']" \
    --ckpt_dir "$out/phase1" --output_dir "$out/phase1/tensorboard" "$@" 2>&1 | tee "$out/phase1/train.log"
"$py" -m monai.bundle run training --bundle_root bundle --logging_file bundle/configs/logging.conf \
    --config_file "['bundle/configs/train.json','bundle/configs/semi.json','experiments/recipes/generalist_data.json','experiments/recipes/generalist_cpu_semi.json']" \
    --pretrained "$out/phase1/model.pt" \
    --ckpt_dir "$out/phase2" --output_dir "$out/phase2/tensorboard" "$@" 2>&1 | tee "$out/phase2/train.log"
"$py" -m monai.bundle run training --bundle_root bundle --logging_file bundle/configs/logging.conf \
    --config_file "['bundle/configs/train.json','bundle/configs/semi.json','experiments/recipes/generalist_data.json','experiments/recipes/generalist_cpu_pool.json','experiments/recipes/pool_semi.json']" \
    --pretrained "$out/phase2/model.pt" \
    --ckpt_dir "$out/pool" --output_dir "$out/pool/tensorboard" "$@" 2>&1 | tee "$out/pool/train.log"
echo "phase 1: $out/phase1/model.pt; phase 2: $out/phase2/model.pt; on the pool (shipped): $out/pool/model_final.pt"
