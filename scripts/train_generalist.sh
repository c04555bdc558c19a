#!/usr/bin/env bash
# Rebuild the shipped generalist model (bundle/models/model.pt) and its size network (bundle/models/size_model.pt, a
# copy of bundle/models/fast.pt), one command:
# - the model: phase 1 (supervised, dev + extra train, subsets balanced), phase 2 (mean teacher on extra's 18
#   unlabelled phase-contrast images) from the phase-1 model, then phase 2 on the unlabelled pool
#   (../shared/data/unlabelled, 8 images per source, sources balanced) from that: about 2 h 10 min on 2 CPU cores
#   (74 + 26 + 30 minutes);
# - its size network: phase 1 and the pool phase again at half the network's width (--nbase 2,16,32,64,128; the
#   18-image phase skipped, as for the permissive model): about 50 minutes more (41.5 + 8.8 measured).
# Needs ../shared/data. Writes runs/generalist/{phase1,phase2,pool}/ and runs/generalist/size/{phase1,pool}/ (models,
# TensorBoard, logs); the shipped files are not touched (copy them there yourself, see docs/training.md).
# Extra arguments go to every phase (e.g. --precision fp32, --device cuda).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${MMCS_VENV:-$HOME/.venvs/mmcs}
py="$venv/bin/python"
out=${MMCS_RUN_DIR:-$repo/runs/generalist}
cd "$repo"
source scripts/training_phases.sh

labelled="'bundle/configs/train.json','$recipes/generalist_data.json'"
semi="'bundle/configs/train.json','bundle/configs/semi.json','$recipes/generalist_data.json'"
pool="[$semi,'$recipes/generalist_cpu_pool.json','$recipes/pool_semi.json']"

train_phase "$out/phase1" "[$labelled,'$recipes/generalist_cpu.json']" "$@"
train_phase "$out/phase2" "[$semi,'$recipes/generalist_cpu_semi.json']" --pretrained "$out/phase1/model.pt" "$@"
train_phase "$out/pool" "$pool" --pretrained "$out/phase2/model.pt" "$@"
train_phase "$out/size/phase1" "[$labelled,'$recipes/generalist_cpu.json']" --nbase "$half_width" "$@"
train_phase "$out/size/pool" "$pool" --pretrained "$out/size/phase1/model.pt" --nbase "$half_width" "$@"
echo "phase 1: $out/phase1/model.pt; phase 2: $out/phase2/model.pt; on the pool (shipped as model.pt): $out/pool/model_final.pt"
echo "size network (shipped as fast.pt and size_model.pt): $out/size/pool/model_final.pt"
