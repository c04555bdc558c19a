"""Images per second with 1 and N processes (``torchrun``): training through the bundle, folder inference.

    python -m benchmarks.scaling [--data ../shared/data/dev/manifest.csv] [--nproc 2]
        [--model runs/.../model_final.pt] [--train_images 32] [--epochs 3] [--infer_images 16]

- Training: full-size CPnet, batch 8 per process, 128 px patches, fp32, ``--train_images`` dev-train
  images (each epoch sees them all, split over the processes), timed by the trainer's own clock
  (caching the flow targets is excluded).
- Inference: ``mmcs infer`` on ``--infer_images`` dev-val images (precision auto), timed by the
  evaluator's clock (slowest rank); process start and model loading excluded, then also the whole
  command's wall time.

One process gets all the cores (PyTorch's default); N processes get cores / N threads each
(``OMP_NUM_THREADS``), so on one machine the comparison is the same hardware split two ways.
Prints a markdown table. One run each; run it alone on the machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import BUNDLE, DEV_MANIFEST, REPO, cpu_description, engine_seconds, training_command


def _run(command: list[str], nproc: int, threads: int) -> tuple[str, float]:
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", *command]
    else:
        command = [sys.executable, "-m", *command]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(threads))
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return result.stdout + result.stderr, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEV_MANIFEST))
    parser.add_argument("--model", default=str(BUNDLE / "models" / "model.pt"))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--train_images", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--infer_images", type=int, default=16)
    args = parser.parse_args()
    print(f"CPU: {cpu_description()}", flush=True)

    from mmcs_monai.data import load_datalist

    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="bench_scaling_"))
    val = load_datalist(args.data, split="val")[: args.infer_images]
    images = work / "images"
    images.mkdir()
    for item in val:
        shutil.copy(item["image"], images / Path(item["image"]).name)

    rows = []
    for nproc in (1, args.nproc):
        threads = max(1, cores // nproc)
        configs = [str(BUNDLE / "configs" / "train.json")] + ([str(BUNDLE / "configs" / "multi_gpu_train.json")] if nproc > 1 else [])
        log, _ = _run(training_command(args.data, work / f"train{nproc}", args.train_images, args.epochs, configs=configs), nproc, threads)
        seconds = engine_seconds(log)
        rows.append(
            (
                "training (full CPnet, fp32, batch 8/process, 128 px)",
                nproc,
                threads,
                args.train_images * args.epochs / seconds,
                seconds,
                None,
            )
        )
        log, wall = _run(["mmcs_monai.cli", "infer", str(images), str(work / f"infer{nproc}"), "--model", args.model], nproc, threads)
        seconds = engine_seconds(log, "SupervisedEvaluator")
        rows.append(("inference (mmcs infer, precision auto)", nproc, threads, len(val) / seconds, seconds, wall))

    print(f"\n{cores} CPU cores; {args.train_images} train images x {args.epochs} epochs; {len(val)} val images\n")
    print("| workload | processes | threads each | images/s | engine s | command wall s | speed-up vs 1 process |")
    print("|---|---|---|---|---|---|---|")
    base = {}
    for name, nproc, threads, rate, seconds, wall in rows:
        base.setdefault(name, rate)
        wall_text = f"{wall:.1f}" if wall is not None else ""
        print(f"| {name} | {nproc} | {threads} | {rate:.3f} | {seconds:.1f} | {wall_text} | {rate / base[name]:.2f} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
