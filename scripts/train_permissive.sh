#!/usr/bin/env bash
# Rebuild the permissive model (bundle/models/permissive.pt) and its size network (bundle/models/size_permissive.pt),
# trained only on rows whose licence allows commercial use (experiments/recipes/permissive_data.json and
# permissive_pool.json list them; the model card's "Permissive model" section gives each licence). Each is phase 1
# (supervised, DSB 2018 + Usiigaci train, subsets balanced) from scratch, then phase 2 on the permissive part of the
# unlabelled pool; the size network is the same recipe at half the network's width (--nbase 2,16,32,64,128), as
# bundle/models/fast.pt is the generalist's. About 2 hours on 2 CPU cores (68 + 20 and 25 + 7 minutes measured).
# Needs ../shared/data. Writes runs/permissive/{phase1,pool}/ and runs/permissive/size/{phase1,pool}/ (models,
# TensorBoard, logs); the shipped files are not touched (see docs/training.md).
# Extra arguments go to every phase (e.g. --precision fp32, --device cuda).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${MMCS_VENV:-$HOME/.venvs/mmcs}
py="$venv/bin/python"
out=${MMCS_RUN_DIR:-$repo/runs/permissive}
cd "$repo"
source scripts/training_phases.sh

labelled="['bundle/configs/train.json','$recipes/generalist_data.json','$recipes/permissive_data.json','$recipes/generalist_cpu.json','$recipes/permissive_cpu.json']"
pool="['bundle/configs/train.json','bundle/configs/semi.json','$recipes/generalist_data.json','$recipes/permissive_data.json','$recipes/generalist_cpu_pool.json','$recipes/pool_semi.json','$recipes/permissive_pool.json']"

train_phase "$out/phase1" "$labelled" "$@"
train_phase "$out/pool" "$pool" --pretrained "$out/phase1/model.pt" "$@"
train_phase "$out/size/phase1" "$labelled" --nbase "$half_width" "$@"
train_phase "$out/size/pool" "$pool" --pretrained "$out/size/phase1/model.pt" --nbase "$half_width" "$@"
echo "phase 1: $out/phase1/model.pt; on the permissive pool (shipped as permissive.pt): $out/pool/model_final.pt"
echo "size network (shipped as size_permissive.pt): $out/size/pool/model_final.pt"
