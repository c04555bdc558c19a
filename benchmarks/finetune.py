"""The human-in-the-loop's gain: fine-tuning on a few corrected images of one modality, with and without that
modality's unlabelled images, against the shipped model as it is and against training from scratch.

For each count of labelled images (``--sizes``, default 2, 5, 10: the first N train images of ``--modality``
in ``--manifest``), every arm trains through the bundle for the same wall-time budget (``--minutes``, the
``time_budget_minutes`` option) and is scored by ``evaluate.json`` with every default (``auto`` diameter) on
that modality's val images (held out by biological set):

- ``shipped``: ``--model`` (default ``bundle/models/model.pt``) as it is (no training);
- ``finetune``: ``mmcs train --recipe finetune`` from that model;
- ``finetune_semi``: ``mmcs train --recipe finetune_semi`` from that model, plus the modality's
  unlabelled images (``--unlabelled_split``) through the semi-supervised phase;
- ``scratch``: ``train.json`` from random weights, the same sampler as ``finetune`` (8 batches an epoch).

Training runs alone at ``--threads`` threads (two torch jobs on 2 cores collapse each other). Prints one
Markdown table of F1 per arm and count, and the CPU's name and bf16 flag.

    python -m benchmarks.finetune --sizes 2,5,10 --minutes 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import BUNDLE, REPO
from mmcs_monai.data import load_datalist
from mmcs_monai.workflows import bundle_command, workflow_config_files

EXTRA_MANIFEST = REPO.parent / "shared" / "data" / "extra" / "manifest.csv"
ARMS = ("finetune", "finetune_semi", "scratch")


def cpu_name() -> str:
    """The CPU's model name and whether it has AVX-512 BF16 (``lscpu``; what every timing is read against)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")
    return f"{model}, {os.cpu_count()} cores, {'AVX-512 BF16' if 'avx512_bf16' in out else 'no AVX-512 BF16'}"


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


def _train(arm: str, model: Path, data: Path, unlabelled: Path, run: Path, minutes: float, threads: int) -> Path:
    overrides: dict = {"data_source": data, "ckpt_dir": run / "models", "output_dir": run / "tensorboard"}
    overrides.update(time_budget_minutes=minutes, val_interval=10**6, epochs=10**4, halving_start=None)
    if arm == "scratch":
        recipe = ["finetune"]
        overrides.update(pretrained=None, learning_rate=0.1, warmup_epochs=5)
    else:
        recipe = [arm]
        overrides.update(pretrained=model)  # the model under test (the recipes' default: the shipped one)
    if arm == "finetune_semi":
        overrides.update(unlabelled_source=unlabelled, unlabelled_split=None)
    _bundle("training", workflow_config_files("training", BUNDLE, recipe, distributed=False), overrides, threads)
    return run / "models" / "model.pt"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", default=str(EXTRA_MANIFEST))
    parser.add_argument("--modality", default="phase_contrast_cells (grey)")
    parser.add_argument("--unlabelled_split", default="unlabelled")
    parser.add_argument("--sizes", default="2,5,10")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--minutes", type=float, default=4.0, help="wall-time budget of every training run")
    parser.add_argument("--model", default=str(BUNDLE / "models" / "model.pt"))
    parser.add_argument("--work", default=str(REPO / "runs" / "bench_finetune"))
    parser.add_argument("--threads", type=int, default=2)
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
    (work / "unlabelled.json").write_text(json.dumps(unlabelled))
    val_data = work / "val.json"
    val_data.write_text(json.dumps({"training": [], "validation": val}))
    shipped = _f1(Path(args.model), val_data, work / "eval_shipped", args.threads)
    print(f"shipped model: F1 {shipped:.3f} on {len(val)} val images", flush=True)
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        data = work / f"data_{n}.json"
        data.write_text(json.dumps({"training": train[:n], "validation": val}))
        row = {"n": min(n, len(train))}
        for arm in args.arms.split(","):
            if arm == "finetune_semi" and not unlabelled:
                continue
            start = time.perf_counter()
            model = _train(arm, Path(args.model), data, work / "unlabelled.json", work / f"{arm}_{n}", args.minutes, args.threads)
            row[arm] = _f1(model, val_data, work / f"{arm}_{n}" / "eval", args.threads)
            row[f"{arm}_s"] = time.perf_counter() - start
            print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\n{args.modality}: {len(val)} val images, {len(unlabelled)} unlabelled; {args.minutes:g} min per run; {cpu_name()}\n")
    arms = [a for a in args.arms.split(",") if any(a in r for r in rows)]
    print("| labelled images | shipped, as it is | " + " | ".join(arms) + " |")
    print("|---|---|" + "---|" * len(arms))
    for r in rows:
        cells = [f"{r[a]:.3f} ({r[a] - shipped:+.3f})" if a in r else "-" for a in arms]
        print(f"| {r['n']} | {shipped:.3f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
