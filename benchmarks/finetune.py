"""The human-in-the-loop's gain: fine-tuning on a few corrected images of one modality, with and without that
modality's unlabelled images, against the shipped model as it is and against training from scratch.

For each count of labelled images (``--sizes``, default 2, 5, 10: the first N train images of ``--modality``
in ``--manifest``), every arm trains through the bundle for the same wall-time budget (``--minutes``, the
``time_budget_minutes`` option) and is scored by ``evaluate.json`` with every default (``auto`` diameter) on
that modality's val images (held out by biological set):

- ``shipped``: ``--model`` (default ``bundle/models/model.pt``) as it is (no training);
- ``finetune``: ``mmcs train --recipe finetune`` from that model;
- ``finetune_semi``: ``mmcs train --recipe finetune_semi`` from that model, plus the modality's
  unlabelled images (``--unlabelled_split``) through the semi-supervised phase (and with ``--more_unlabelled K``
  the K train images after the labelled ones, their labels dropped: the rest of a lab's images);
- ``scratch``: ``train.json`` from random weights, the same sampler as ``finetune`` (8 batches an epoch).

The fine-tune arms run their recipe as a user does (``finetune``: 20 epochs; ``finetune_semi``: the same 20, the last
10 with pseudo labels), the budget a cap they may stop short of; ``scratch`` trains until the budget is spent. Each
cell gives the F1 and the seconds the arm took (training and scoring).

Training runs alone at ``--threads`` threads (two torch jobs on 2 cores collapse each other). Prints one
Markdown table of F1 per arm and count, and the CPU's name and bf16 flag.

    python -m benchmarks.finetune --sizes 2,5,10 --minutes 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import BUNDLE, REPO, cpu_description
from mmcs_monai.data import load_datalist
from mmcs_monai.workflows import bundle_command, recipe_files, workflow_config_files

EXTRA_MANIFEST = REPO.parent / "shared" / "data" / "extra" / "manifest.csv"
ARMS = ("finetune", "finetune_semi", "scratch")


def _bundle(workflow: str, configs: list[str], overrides: dict, threads: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", *bundle_command(workflow, configs, BUNDLE, overrides)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"bundle run failed ({workflow}):\n{result.stderr[-3000:]}")


def _f1(model: Path, data: Path, out: Path, threads: int) -> float:
    configs = workflow_config_files("evaluating", BUNDLE)
    _bundle("evaluating", configs, {"model_path": model, "data_source": data, "output_dir": out}, threads)
    return json.loads((out / "f1_summary.json").read_text())["overall"]["f1"]


def _semi(arm: str) -> bool:
    """Whether ``arm`` (a recipe name or file) takes the unlabelled images: its recipe builds on ``semi``."""
    return arm != "scratch" and any(f.name == "semi.json" for f in recipe_files(arm, BUNDLE))


def _train(arm: str, model: Path, data: Path, unlabelled: Path, run: Path, minutes: float, threads: int) -> Path:
    overrides: dict = {"data_source": data, "ckpt_dir": run / "models", "output_dir": run / "tensorboard"}
    overrides.update(time_budget_minutes=minutes, val_interval=10**6)
    if arm == "scratch":  # no schedule of its own: trains at lr 0.1 until the budget is spent
        recipe = ["finetune"]
        overrides.update(pretrained=None, learning_rate=0.1, warmup_epochs=5, epochs=10**4, halving_start=None)
    else:  # the recipe as a user runs it (its epochs and schedule), the budget as a cap
        recipe = [arm]
        overrides.update(pretrained=model)  # the model under test (the recipes' default: the shipped one)
    if _semi(arm):
        overrides.update(unlabelled_source=unlabelled, unlabelled_split=None)
    _bundle("training", workflow_config_files("training", BUNDLE, recipe, distributed=False), overrides, threads)
    return run / "models" / "model.pt"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", default=str(EXTRA_MANIFEST))
    parser.add_argument("--modality", default="phase_contrast_cells (grey)")
    parser.add_argument("--unlabelled_split", default="unlabelled")
    parser.add_argument("--sizes", default="2,5,10")
    parser.add_argument("--arms", default=",".join(ARMS), help="scratch, or recipe names or files (a variant to compare)")
    parser.add_argument("--minutes", type=float, default=5.0, help="wall-time budget of every training run")
    parser.add_argument("--model", default=str(BUNDLE / "models" / "model.pt"))
    parser.add_argument("--work", default=str(REPO / "runs" / "bench_finetune"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--more_unlabelled", type=int, default=0,
        help="the K train images after the labelled ones join the unlabelled set, their labels dropped",
    )  # fmt: skip
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    def of_modality(split: str, **kwargs) -> list[dict]:
        return [i for i in load_datalist(args.manifest, split=split, **kwargs) if i.get("subset") == args.modality]

    train = [i for i in of_modality("train") if i.get("label")]
    val = [i for i in of_modality("val", exclude_partial=True) if i.get("label")]
    unlabelled = of_modality(args.unlabelled_split)
    if not train or not val:
        raise SystemExit(f"{args.manifest}: no train/val images of modality {args.modality!r}")
    val_data = work / "val.json"
    val_data.write_text(json.dumps({"training": [], "validation": val}))
    shipped = _f1(Path(args.model), val_data, work / "eval_shipped", args.threads)
    print(f"shipped model: F1 {shipped:.3f} on {len(val)} val images", flush=True)
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        data = work / f"data_{n}.json"
        data.write_text(json.dumps({"training": train[:n], "validation": val}))
        # the lab's other images, their labels dropped, join the modality's unlabelled ones
        others = [{k: v for k, v in i.items() if k != "label"} for i in train[n : n + args.more_unlabelled]]
        unlabelled_data = work / f"unlabelled_{n}.json"
        unlabelled_data.write_text(json.dumps(unlabelled + others))
        row = {"n": min(n, len(train)), "unlabelled": len(unlabelled) + len(others)}
        for arm in args.arms.split(","):
            if _semi(arm) and not unlabelled + others:
                continue
            start = time.perf_counter()
            run = work / f"{Path(arm).stem}_{n}"
            model = _train(arm, Path(args.model), data, unlabelled_data, run, args.minutes, args.threads)
            row[arm] = _f1(model, val_data, run / "eval", args.threads)
            row[f"{arm}_s"] = time.perf_counter() - start
            print(json.dumps(row), flush=True)
        rows.append(row)
    more = f" + up to {args.more_unlabelled} unlabelled train images" if args.more_unlabelled else ""
    print(
        f"\n{args.modality}: {len(val)} val images, {len(unlabelled)} unlabelled{more}; {args.minutes:g} min per run; CPU: {cpu_description()}\n"
    )
    arms = [a for a in args.arms.split(",") if any(a in r for r in rows)]
    print("| labelled images | shipped, as it is | " + " | ".join(arms) + " |")
    print("|---|---|" + "---|" * len(arms))
    for r in rows:
        cells = [f"{r[a]:.3f} ({r[a] - shipped:+.3f}), {r[a + '_s']:.0f} s" if a in r else "-" for a in arms]
        print(f"| {r['n']} | {shipped:.3f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
