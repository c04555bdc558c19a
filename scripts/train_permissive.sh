#!/usr/bin/env bash
# Rebuild the permissive model (bundle/models/permissive.pt) and its size network (bundle/models/size_permissive.pt),
# trained only on rows whose licence allows commercial use (experiments/recipes/permissive_data.json and
# permissive_pool.json list them; the model card's "Permissive model" section gives each licence). Each is phase 1
# (supervised, DSB 2018 + Usiigaci train, subsets balanced) from scratch, then phase 2 on the permissive part of the
# unlabelled pool; the size network is the same recipe at half the network's width (--nbase 2,16,32,64,128), as
# bundle/models/fast.pt is the generalist's. About 2 hours on 2 CPU cores (68 + 20 and 25 + 7 minutes measured).
# Needs ../shared/data. Writes runs/permissive/{phase1,pool}/ and runs/permissive/size/{phase1,pool}/ (models,
# TensorBoard, logs); the shipped files are not touched (see bundle/docs/README.md).
# Extra arguments go to every phase (e.g. --precision fp32, --device cuda).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${MMCS_VENV:-$HOME/.venvs/mmcs}
py="$venv/bin/python"
out=${MMCS_RUN_DIR:-$repo/runs/permissive}
recipes=experiments/recipes
cd "$repo"

# two_phases OUT [bundle overrides...]: phase 1 into OUT/phase1, the pool phase from it into OUT/pool
two_phases() {
    local dir=$1
    shift
    mkdir -p "$dir/phase1" "$dir/pool"
    "$py" -m monai.bundle run training --bundle_root bundle --logging_file bundle/configs/logging.conf \
        --config_file "['bundle/configs/train.json','$recipes/generalist_data.json','$recipes/permissive_data.json','$recipes/generalist_cpu.json','$recipes/permissive_cpu.json']" \
        --ckpt_dir "$dir/phase1" --output_dir "$dir/phase1/tensorboard" "$@" 2>&1 | tee "$dir/phase1/train.log"
    "$py" -m monai.bundle run training --bundle_root bundle --logging_file bundle/configs/logging.conf \
        --config_file "['bundle/configs/train.json','bundle/configs/semi.json','$recipes/generalist_data.json','$recipes/permissive_data.json','$recipes/generalist_cpu_pool.json','$recipes/pool_semi.json','$recipes/permissive_pool.json']" \
        --pretrained "$dir/phase1/model.pt" \
        --ckpt_dir "$dir/pool" --output_dir "$dir/pool/tensorboard" "$@" 2>&1 | tee "$dir/pool/train.log"
}

two_phases "$out" "$@"
two_phases "$out/size" --nbase "[2,16,32,64,128]" "$@"
echo "phase 1: $out/phase1/model.pt; on the permissive pool (shipped as permissive.pt): $out/pool/model_final.pt"
echo "size network (shipped as size_permissive.pt): $out/size/pool/model_final.pt"
