#!/usr/bin/env bash
# Rebuild the permissive model (bundle/models/permissive.pt): trained only on rows whose licence allows
# commercial use (experiments/recipes/permissive_data.json and permissive_pool.json list them; the model
# card's "Permissive model" section gives each licence). Phase 1 (supervised, DSB 2018 + Usiigaci train,
# subsets balanced) from scratch, then phase 2 on the permissive part of the unlabelled pool: about
# 90 minutes on 2 CPU cores (68 + 20 measured). Needs ../shared/data. Writes runs/permissive/{phase1,pool}/ (models,
# TensorBoard, logs); the shipped bundle/models/permissive.pt is not touched (see bundle/docs/README.md).
# Extra arguments go to every phase (e.g. --precision fp32, --device cuda).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${MMCS_VENV:-$HOME/.venvs/mmcs}
py="$venv/bin/python"
out=${MMCS_RUN_DIR:-$repo/runs/permissive}
recipes=experiments/recipes
cd "$repo"
mkdir -p "$out/phase1" "$out/pool"
"$py" -m monai.bundle run training --bundle_root bundle --logging_file bundle/configs/logging.conf \
    --config_file "['bundle/configs/train.json','$recipes/generalist_data.json','$recipes/permissive_data.json','$recipes/generalist_cpu.json','$recipes/permissive_cpu.json']" \
    --ckpt_dir "$out/phase1" --output_dir "$out/phase1/tensorboard" "$@" 2>&1 | tee "$out/phase1/train.log"
"$py" -m monai.bundle run training --bundle_root bundle --logging_file bundle/configs/logging.conf \
    --config_file "['bundle/configs/train.json','bundle/configs/semi.json','$recipes/generalist_data.json','$recipes/permissive_data.json','$recipes/generalist_cpu_pool.json','$recipes/pool_semi.json','$recipes/permissive_pool.json']" \
    --pretrained "$out/phase1/model.pt" \
    --ckpt_dir "$out/pool" --output_dir "$out/pool/tensorboard" "$@" 2>&1 | tee "$out/pool/train.log"
echo "phase 1: $out/phase1/model.pt; on the permissive pool (shipped): $out/pool/model_final.pt"
