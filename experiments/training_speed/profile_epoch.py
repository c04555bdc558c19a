"""Profile a bundle training run with py-spy and print where the time goes.

    python -m experiments.training_speed.profile_epoch [--data ../shared/data/dev/manifest.csv] [--train_images 64]
        [--epochs 2] [--precision bf16] [--num_workers 0] [--top 15]

Samples the whole process tree (``py-spy record --subprocesses``, 100 Hz) while the bundle trains
(full CPnet, batch 8, 128 px). Prints the share of the training loop's samples spent in the
forward pass, backward pass, optimizer step, batch loading/augmentation and the rest, the share of
the whole run spent before the loop (imports, reading images, caching flow targets), and the
functions with the most samples of their own inside the loop. Needs py-spy (``pip install py-spy``).
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import tempfile
from pathlib import Path

from benchmarks.common import DEV_MANIFEST, REPO, python_module, training_command

# (name, substrings of a frame that put a sample in it), first match from the innermost frame wins
LOOP_PARTS = [
    ("optimizer step", ("step (torch/optim/", "_single_tensor_sgd", "_multi_tensor_sgd")),
    ("backward", ("backward (torch/", "_engine_run_backward", "run_backward")),
    ("loss", ("losses.py",)),
    ("forward (network)", ("cpnet.py", "torch/nn/modules/")),
    ("batch: augmentation", ("transforms/dictionary.py", "transforms/array.py", "monai/transforms/")),
    ("batch: collate / loader", ("torch/utils/data/", "monai/data/")),
]


def categorise(stack: list[str]) -> str:
    for frame in reversed(stack):
        for name, keys in LOOP_PARTS:
            if any(k in frame for k in keys):
                return name
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEV_MANIFEST))
    parser.add_argument("--train_images", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="profile_epoch_"))
    raw = work / "profile.txt"
    train = python_module(training_command(args.data, work, args.train_images, args.epochs, args.precision, args.num_workers))
    subprocess.run(
        ["py-spy", "record", "--rate", "100", "--subprocesses", "--format", "raw", "--output", str(raw), "--", *train],
        check=True,
        capture_output=True,
        cwd=REPO,
    )

    total, loop, parts, own = 0, 0, collections.Counter(), collections.Counter()
    for line in raw.read_text().splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text:
            continue
        count = int(count_text)
        stack = stack_text.split(";")
        total += count
        if any("_run_once_on_dataset" in frame for frame in stack) or any("_worker_loop" in frame for frame in stack):
            loop += count
            parts[categorise(stack)] += count
            own[stack[-1]] += count

    print(
        f"\n{total} samples at 100 Hz ({total / 100:.0f} s of process time); training loop {loop / max(total, 1):.0%}, "
        f"before it (imports, reading, caching flow targets) {1 - loop / max(total, 1):.0%}\n"
    )
    print(f"precision {args.precision}, num_workers {args.num_workers}, {args.train_images} images x {args.epochs} epochs\n")
    print("| part of the training loop | share of loop samples |\n|---|---|")
    for name, count in parts.most_common():
        print(f"| {name} | {count / max(loop, 1):.1%} |")
    print("\n| function (own samples in the training loop) | share of loop samples |\n|---|---|")
    for frame, count in own.most_common(args.top):
        print(f"| `{frame[:110]}` | {count / max(loop, 1):.1%} |")


if __name__ == "__main__":
    main()
