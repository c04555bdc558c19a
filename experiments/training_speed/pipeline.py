"""Does the input pipeline starve the step? Training s/step with batch loading in 0, 1 or 2 worker processes.

    python -m experiments.training_speed.pipeline [--data ../shared/data/dev/manifest.csv] [--train_images 64]
        [--epochs 4] [--precision bf16] [--workers 0,1,2]

Flow targets are cached once (``SkippingCacheDataset``: read, normalise, labels -> flows, excluded
from the timing); per step only the random augmentation of the cached arrays runs, in the main
process (0) or in persistent DataLoader workers. Trainer clock, full CPnet, batch 8, 128 px. One run
each; run it alone.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from pathlib import Path

from benchmarks.common import DEV_MANIFEST, REPO, engine_seconds, python_module, training_command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEV_MANIFEST))
    parser.add_argument("--train_images", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--workers", default="0,1,2")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    steps = args.epochs * -(-args.train_images // 8)
    print(f"\n| DataLoader workers | s/step ({args.precision}, {steps} steps) |\n|---|---|")
    for workers in map(int, args.workers.split(",")):
        command = training_command(args.data, work / f"w{workers}", args.train_images, args.epochs, args.precision, workers)
        result = subprocess.run(
            python_module(command), cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore")
        )
        if result.returncode != 0:
            raise RuntimeError(result.stderr[-3000:])
        print(f"| {workers} | {engine_seconds(result.stdout + result.stderr) / steps:.3f} |")


if __name__ == "__main__":
    main()
