"""How much F1 does a half-width CPnet cost, for how much speed? (Issue 37, item 3: every default 2x Cellpose.)

    python -m experiments.half_width.run              # trains (about 50 minutes on 2 cores), evaluates, prints the table
    python -m experiments.half_width.run --no-train   # evaluates runs/half_width/{phase1/model.pt,pool/model_final.pt} again

The full CPnet (``nbase`` 2-32-64-128-256, 6.6 M parameters) costs 618 GFLOP per network megapixel; on 2 cores with
AVX2 kernels ``auto`` spends 38 s of ``mmcs infer``'s 48 s in it (benchmarks/README.md, "0.4.2"), and 2x Cellpose
leaves it about 17. Halving every width (2-16-32-64-128, 1.65 M parameters) quarters the FLOPs (155 GFLOP/MPix):
3.5x faster per pixel on the same cores (3.14 -> 0.89 s/MPix, batch of 8 x 224 x 224, channels-last fp32).

Trains that network with the shipped model's phase-1 recipe unchanged (``experiments/recipes/generalist_data.json``
+ ``generalist_cpu.json``: 150 epochs, subsets balanced, bf16 where the CPU has it) into ``runs/half_width/phase1``,
then its phase on the unlabelled pool as the shipped model's (``generalist_cpu_pool.json`` + ``pool_semi.json``, from
phase 1: the 0.2.0 phase 2 on 18 images is skipped, as for the permissive model) into ``runs/half_width/pool``,
then scores both on the 69 dev + extra val images with the ``evaluating`` workflow, at ``auto`` and at its stored
diameter. The comparison is the model card's "phase 1, stored" column (the full width, same recipe) and the shipped
model. Speed end to end: ``python -m benchmarks.defaults --isa avx2 --model runs/half_width/phase1/model.pt
--cellpose_model bundle/models/model.pt`` (Cellpose cannot load a narrower CPnet; it runs the shipped weights).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.common import REPO, cpu_description
from mmcs_monai.workflows import bundle_command

CONFIGS = REPO / "bundle" / "configs"
RECIPE_DIR = REPO / "experiments" / "recipes"
RECIPES = [str(CONFIGS / "train.json"), str(RECIPE_DIR / "generalist_data.json")]
HALF = [2, 16, 32, 64, 128]


def _bundle(workflow: str, configs: list[str], overrides: dict, log: Path) -> None:
    command = [sys.executable, "-m", *bundle_command(workflow, configs, REPO / "bundle", overrides)]
    with open(log, "w") as out:
        if subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"{workflow} failed: see {log}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "runs" / "half_width"))
    parser.add_argument("--no-train", dest="train", action="store_false")
    args = parser.parse_args(argv)
    out = Path(args.out)
    print(f"CPU: {cpu_description()}", flush=True)
    if args.train:
        (out / "phase1").mkdir(parents=True, exist_ok=True)
        configs = [*RECIPES, str(RECIPE_DIR / "generalist_cpu.json")]
        overrides = {"nbase": HALF, "ckpt_dir": out / "phase1", "output_dir": out / "phase1" / "tensorboard"}
        _bundle("training", configs, overrides, out / "phase1" / "train.log")
        (out / "pool").mkdir(parents=True, exist_ok=True)
        semi = str(CONFIGS / "semi.json")
        configs = [RECIPES[0], semi, RECIPES[1], str(RECIPE_DIR / "generalist_cpu_pool.json"), str(RECIPE_DIR / "pool_semi.json")]
        overrides = {
            "nbase": HALF,
            "pretrained": out / "phase1" / "model.pt",
            "ckpt_dir": out / "pool",
            "output_dir": out / "pool" / "tensorboard",
        }
        _bundle("training", configs, overrides, out / "pool" / "train.log")
    rows = {}
    for stage, model in (("phase1", out / "phase1" / "model.pt"), ("pool", out / "pool" / "model_final.pt")):
        for diameter in ("stored", "auto"):
            target = out / f"eval_{stage}_{diameter}"
            target.mkdir(parents=True, exist_ok=True)
            configs = [*RECIPES, str(CONFIGS / "evaluate.json")]
            overrides = {"model_path": model, "inference_diameter": diameter, "output_dir": target}
            _bundle("evaluating", configs, overrides, target / "evaluate.log")
            rows[stage, diameter] = json.loads((target / "f1_summary.json").read_text())
    columns = list(rows)
    print("\n| modality | val images | " + " | ".join(f"half width, {s}, {d}" for s, d in columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for group, row in rows[columns[0]].items():
        print(f"| {group} | {row['images']} | " + " | ".join(f"{rows[c][group]['f1']:.3f}" for c in columns) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
