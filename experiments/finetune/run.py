"""Is fine-tuning the shipped model worth it? Fine-tuned vs trained from scratch on 5 and 20 labelled images.

Both runs go through the bundle (``python -m monai.bundle run training``) for the same number of
optimiser steps (``--steps``, batch 8, 128 px patches, bf16 on CPU) on the first N train images of one
modality of ``../shared/data/extra`` (default: phase-contrast whole cells, MIT licensed):

- fine-tuned: ``bundle/configs/train.json`` + ``bundle/configs/recipes/finetune.json`` (starts from ``bundle/models/model.pt``,
  learning rate 0.02, halved over the last quarter);
- from scratch: ``bundle/configs/train.json`` with the same step count (learning rate 0.1, 10 % warm-up,
  halved over the last quarter).

Each model is then scored by ``evaluate.json`` (default settings: ``auto`` diameter) on that modality's
val images, next to the shipped model as it is. Prints a Markdown table.

    python -m experiments.finetune.run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO
from mmcs_monai.data import load_datalist
from mmcs_monai.workflows import bundle_command

BUNDLE = REPO / "bundle"


def _bundle(workflow: str, configs: list[str], overrides: dict, threads: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", *bundle_command(workflow, [REPO / c for c in configs], BUNDLE, overrides)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"bundle run failed ({workflow}):\n{result.stderr[-3000:]}")


def _f1(model: Path, data: Path, out: Path, threads: int) -> float:
    overrides = {"model_path": model, "data_source": data, "output_dir": out}
    _bundle("evaluating", ["bundle/configs/train.json", "bundle/configs/evaluate.json"], overrides, threads)
    return json.loads((out / "f1_summary.json").read_text())["overall"]["f1"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", default=str(REPO.parent / "shared" / "data" / "extra" / "manifest.csv"))
    parser.add_argument("--modality", default="phase_contrast_cells (grey)")
    parser.add_argument("--sizes", default="5,20")
    parser.add_argument("--steps", type=int, default=150, help="optimiser steps per run (batch 8)")
    parser.add_argument("--model", default=str(BUNDLE / "models" / "model.pt"))
    parser.add_argument("--work", default=str(REPO / "runs" / "bench_finetune"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train = [i for i in load_datalist(args.manifest, split="train") if i["subset"] == args.modality and i.get("label")]
    val = [i for i in load_datalist(args.manifest, split="val", exclude_partial=True) if i["subset"] == args.modality and i.get("label")]
    if not train or not val:
        raise SystemExit(f"{args.manifest}: no train/val images of modality {args.modality!r}")
    shipped = _f1(Path(args.model), _write(work / "val.json", [], val), work / "eval_shipped", args.threads)
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        data = _write(work / f"data_{n}.json", train[:n], val)
        epochs = max(1, math.ceil(args.steps / math.ceil(min(n, len(train)) / 8)))
        common = {"data_source": data, "epochs": epochs, "val_interval": 10**6}
        common.update(halving_start=int(epochs * 0.75), halving_every=max(1, epochs // 12))
        result = {"n": min(n, len(train)), "epochs": epochs}
        for name, config, extra in (
            ("finetuned", ["bundle/configs/train.json", "bundle/configs/recipes/finetune.json"], {"pretrained": args.model}),
            ("scratch", ["bundle/configs/train.json"], {"warmup_epochs": max(1, epochs // 10)}),
        ):
            run = work / f"{name}_{n}"
            start = time.perf_counter()
            overrides = {"ckpt_dir": run / "models", "output_dir": run / "tensorboard", **common, **extra}
            _bundle("training", config, overrides, args.threads)
            result[f"{name}_s"] = time.perf_counter() - start
            result[name] = _f1(run / "models" / "model.pt", data, run / "eval", args.threads)
        rows.append(result)
        print(result, flush=True)
    print(f"\nmodality {args.modality!r}, {len(val)} val images, {args.steps} steps of batch 8 per run\n")
    print("| labelled images | epochs | shipped, as it is | fine-tuned | from scratch | fine-tuned - scratch | time fine-tuned / scratch |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['n']} | {r['epochs']} | {shipped:.3f} | {r['finetuned']:.3f} | {r['scratch']:.3f} | "
            f"{r['finetuned'] - r['scratch']:+.3f} | {r['finetuned_s']:.0f} s / {r['scratch_s']:.0f} s |"
        )
    return 0


def _write(path: Path, train: list[dict], val: list[dict]) -> Path:
    path.write_text(json.dumps({"training": train, "validation": val}, indent=1))
    return path


if __name__ == "__main__":
    sys.exit(main())
