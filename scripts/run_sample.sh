#!/usr/bin/env bash
# The main job: set up, then segment and score the shipped model, with every default, on the 12 sample images
# it was not trained on (bundle/sample_data/unseen: DSB 2018 stage 1 test images, CC0). Writes
# outputs/sample/{*_masks.tif,*_overlay.png,segmentation_summary.csv} and outputs/sample_f1/ (F1 per image and
# summary); the shipped bundle/models/model.pt is only read. Fine-tuning on your own images: docs/training.md.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${MMCS_VENV:-$HOME/.venvs/mmcs}
bash "$repo/scripts/setup_env.sh"
cd "$repo"
py="$venv/bin/python"
unseen=bundle/sample_data/unseen
common=(--meta_file bundle/configs/metadata.json --logging_file bundle/configs/logging.conf --bundle_root bundle)
"$py" -m monai.bundle run inference --config_file bundle/configs/inference.json "${common[@]}" \
    --input_dir "$unseen/images" --output_dir outputs/sample --skip_done False "$@"
"$py" -m monai.bundle run evaluating --config_file "['bundle/configs/train.json','bundle/configs/evaluate.json']" \
    "${common[@]}" --data_source "$unseen" --model_path bundle/models/model.pt --output_dir outputs/sample_f1 "$@"
"$py" - <<'PY'
import json
summary = json.load(open("outputs/sample_f1/f1_summary.json"))
print("masks and overlays: outputs/sample/; F1 per image: outputs/sample_f1/f1_per_image.csv")
print(f"F1 (IoU 0.5) of the shipped model on 12 sample images it was not trained on: {summary['overall']['f1']:.3f}")
print("to fine-tune on your own corrected images: mmcs train --data_source my_corrected/ --recipe finetune (docs/training.md)")
PY
