#!/usr/bin/env bash
# The main job on the built-in sample data: set up, score the shipped model on the sample validation
# images, fine-tune it briefly through the MONAI bundle, segment the sample images with the result,
# and score it again. Writes bundle/trained/ (the fine-tuned model), bundle/eval/ (TensorBoard),
# outputs/sample/{*_masks.tif,*_overlay.png} and outputs/sample_f1/{shipped,finetuned}/; the shipped
# bundle/models/model.pt is only read.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${MMCS_VENV:-$HOME/.venvs/mmcs}
bash "$repo/scripts/setup_env.sh"
cd "$repo"
py="$venv/bin/python"
common=(--meta_file bundle/configs/metadata.json --logging_file bundle/configs/logging.conf --bundle_root bundle)
evaluate() {  # evaluate <model> <output folder>
    "$py" -m monai.bundle run evaluating --config_file "['bundle/configs/train.json','bundle/configs/evaluate.json']" \
        "${common[@]}" --model_path "$1" --output_dir "$2"
}
evaluate bundle/models/model.pt outputs/sample_f1/shipped
"$py" -m monai.bundle run training --config_file "['bundle/configs/train.json','bundle/configs/recipes/finetune.json']" "${common[@]}" "$@"
"$py" -m monai.bundle run inference --config_file bundle/configs/inference.json "${common[@]}" \
    --model_path bundle/trained/model.pt --input_dir bundle/sample_data/images --output_dir outputs/sample --skip_done False
evaluate bundle/trained/model.pt outputs/sample_f1/finetuned
"$py" - <<'PY'
import json
f1 = {name: json.load(open(f"outputs/sample_f1/{name}/f1_summary.json")) for name in ("shipped", "finetuned")}
print("fine-tuned model: bundle/trained/model.pt; masks and overlays: outputs/sample/")
for name, label in (("shipped", "shipped model, as it is"), ("finetuned", "after fine-tuning on the sample data")):
    print(f"sample val F1 ({label}): {f1[name]['overall']['f1']:.3f}")
PY
