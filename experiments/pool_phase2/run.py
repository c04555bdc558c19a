"""Phase 2 on the unlabelled pool: does it help, and at which weight? The sweep behind the shipped model.

    python -m experiments.pool_phase2.run [--base bundle/models/model.pt] [--weights 0.2 0.4]
        [--out runs/pool_phase2]

From ``--base`` (the previous release's model: phase 1, then phase 2 on extra's 18 unlabelled images), the
same schedule (``experiments/recipes/generalist_cpu_pool.json``: 12 epochs, lr 0.02) for each arm:

- ``control``: labelled images alone (``train.json``): what more epochs on the labels give;
- ``w<w>``: the semi-supervised phase (``semi.json``) with the pool (``experiments/recipes/pool_semi.json``:
  8 images per source, sources balanced) at ``w_unlabelled`` = w.

Then every arm's final model (and the base) is scored on dev val + extra val (the 69 rows the model card
uses), with ``auto`` and with the stored diameter, through ``python -m monai.bundle run evaluating``. Runs
each process alone (two torch jobs on 2 cores collapse each other): about 30 minutes per pool arm, 10 for
the control, 3 per evaluation. Writes ``<out>/<arm>/`` and prints a markdown table per diameter.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.common import REPO
from mmcs_monai.workflows import bundle_command

RECIPES = REPO / "experiments" / "recipes"
CONFIGS = REPO / "bundle" / "configs"
DATA = [str(CONFIGS / "train.json"), str(RECIPES / "generalist_data.json")]
MODALITIES = [
    "fluorescence_nuclei (grey)",
    "brightfield_H&E_tissue (RGB)",
    "phase_contrast_cells (grey)",
    "phase_contrast_cells+nucleus (2-channel)",
    "phase_contrast_bacteria (grey)",
]


def train(folder: Path, base: Path, w: float | None) -> Path:
    """Train one arm from ``base`` (``w`` None: the labelled control); returns its final model."""
    if w is None:
        configs = [*DATA, str(RECIPES / "generalist_cpu_pool.json")]
        overrides = {}
    else:
        configs = [DATA[0], str(CONFIGS / "semi.json"), DATA[1], str(RECIPES / "generalist_cpu_pool.json"), str(RECIPES / "pool_semi.json")]
        overrides = {"w_unlabelled": w}
    model = folder / "model_final.pt"
    if not model.is_file():
        overrides.update(pretrained=base, ckpt_dir=folder, output_dir=folder / "tensorboard")
        cmd = [sys.executable, "-m", *bundle_command("training", configs, REPO / "bundle", overrides)]
        with open(folder / "train.log", "w") as log:
            subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
    return model


def evaluate(model: Path, folder: Path, diameter: str) -> dict:
    """F1 per modality (``f1_summary.json`` of the evaluating workflow) of ``model`` at ``diameter``."""
    summary = folder / f"eval_{diameter}" / "f1_summary.json"
    if not summary.is_file():
        overrides = {"model_path": model, "inference_diameter": diameter, "output_dir": summary.parent}
        cmd = [sys.executable, "-m", *bundle_command("evaluating", [*DATA, str(CONFIGS / "evaluate.json")], REPO / "bundle", overrides)]
        with open(folder / f"eval_{diameter}.log", "w") as log:
            subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
    return json.loads(summary.read_text())


def table(results: dict[str, dict], diameter: str) -> str:
    arms = list(results)
    lines = [f"| modality ({diameter}) | images | " + " | ".join(arms) + " |", "|---|---|" + "---|" * len(arms)]
    first = results[arms[0]]
    for name in ["overall", *MODALITIES]:
        lines.append(f"| {name} | {first[name]['images']} | " + " | ".join(f"{results[a][name]['f1']:.3f}" for a in arms) + " |")
    means = [sum(results[a][m]["f1"] for m in MODALITIES) / len(MODALITIES) for a in arms]
    lines.append("| mean over the modalities | | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=str(REPO / "bundle" / "models" / "model.pt"))
    parser.add_argument("--weights", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument("--out", default=str(REPO / "runs" / "pool_phase2"))
    args = parser.parse_args(argv)
    out, base = Path(args.out), Path(args.base).resolve()
    runs = [("control", None), *((f"w{w:g}", w) for w in args.weights)]
    for name in ["base", *(name for name, _ in runs)]:
        (out / name).mkdir(parents=True, exist_ok=True)
    arms = {"base": base, **{name: train(out / name, base, w) for name, w in runs}}
    for diameter in ("auto", "stored"):
        results = {name: evaluate(model, out / name, diameter) for name, model in arms.items()}
        print(table(results, diameter), end="\n\n")


if __name__ == "__main__":
    main()
