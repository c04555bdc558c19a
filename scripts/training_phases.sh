# Sourced by scripts/train_generalist.sh and scripts/train_permissive.sh: the one way a recipe runs a training phase.
# Needs $py (the environment's python) and the repository root as the working directory.

recipes=experiments/recipes
# the half width of the size networks (bundle/models/size_model.pt = fast.pt, size_permissive.pt): a quarter of the
# full network's compute per pixel (experiments/half_width/README.md)
half_width="[2,16,32,64,128]"

# train_phase DIR CONFIGS [bundle overrides...]: one `monai.bundle run training` of the merged CONFIGS (a Python list
# literal of JSON files) into DIR: models, DIR/tensorboard, DIR/train.log
train_phase() {
    local dir=$1 configs=$2
    shift 2
    mkdir -p "$dir"
    "$py" -m monai.bundle run training --bundle_root bundle --logging_file bundle/configs/logging.conf \
        --config_file "$configs" --ckpt_dir "$dir" --output_dir "$dir/tensorboard" "$@" 2>&1 | tee "$dir/train.log"
}
