"""Training in fp32 vs bf16 autocast + channels_last through the bundle: loss curves and step time.

    python -m experiments.training_speed.precision [--data ../shared/data/dev/manifest.csv] [--steps 300]
        [--train_images 64] [--plot experiments/training_speed/training_loss_fp32_vs_bf16.png]

Both runs: the same bundle config, seed, images and augmentations (``set_determinism``), full-size
CPnet, batch 8, 128 px patches, SGD with the default schedule, only ``--precision`` and
``--channels_last`` differ. The per-iteration training loss comes from the runs' TensorBoard logs.
Prints seconds per step (trainer clock; flow caching excluded) and the loss over windows of steps,
with the noise of the fp32 curve for scale, and saves a plot. One run each; run it alone.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import DEV_MANIFEST, REPO, engine_seconds, python_module, training_command


def train(out: Path, precision: str, channels_last: bool, args) -> tuple[np.ndarray, float]:
    """(loss per iteration, trainer seconds) of one bundle training run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps_per_epoch = -(-args.train_images // 8)
    epochs = -(-args.steps // steps_per_epoch)
    command = training_command(args.data, out, args.train_images, epochs, precision)
    command[command.index("--channels_last") + 1] = str(channels_last)
    result = subprocess.run(python_module(command), cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    seconds = engine_seconds(result.stdout + result.stderr)
    events = EventAccumulator(str(out / "eval"))
    events.Reload()
    losses = np.array([e.value for e in events.Scalars("train_loss")])
    return losses, seconds


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    return np.convolve(values, np.ones(window) / window, mode="valid")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEV_MANIFEST))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--train_images", type=int, default=64)
    parser.add_argument("--plot", default=str(REPO / "experiments" / "training_speed" / "training_loss_fp32_vs_bf16.png"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_precision_"))
    runs = {
        "fp32": train(work / "fp32", "fp32", False, args),
        "bf16 + channels_last": train(work / "bf16", "bf16", True, args),
    }
    fp32 = runs["fp32"][0]
    n = min(len(v[0]) for v in runs.values())
    window = 20
    noise = float(np.std(fp32[:n][window:] - smooth(fp32[:n], window)[: n - window]))
    print(
        f"\n{n} steps, {args.train_images} dev-train images, full CPnet, batch 8, 128 px; fp32 step-to-step noise "
        f"(std of loss minus its {window}-step mean) {noise:.3f}\n"
    )
    print("| precision | s/step | speed-up | mean loss steps 1-100 | 101-200 | 201-300 | last 50 |")
    print("|---|---|---|---|---|---|---|")
    base = runs["fp32"][1] / len(fp32)
    for name, (losses, seconds) in runs.items():
        per_step = seconds / len(losses)
        windows = [losses[a:b].mean() for a, b in ((0, 100), (100, 200), (200, 300))] + [losses[n - 50 : n].mean()]
        print(f"| {name} | {per_step:.3f} | {base / per_step:.2f} | " + " | ".join(f"{w:.3f}" for w in windows) + " |")
    bf16 = runs["bf16 + channels_last"][0]
    gap = np.abs(smooth(bf16[:n], window) - smooth(fp32[:n], window))
    print(f"\n|{window}-step mean bf16 - fp32|: mean {gap.mean():.3f}, max {gap.max():.3f} (fp32 noise {noise:.3f})")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, (losses, _)), color in zip(runs.items(), ("tab:blue", "tab:orange")):
        ax.plot(np.arange(1, len(losses) + 1), losses, color=color, alpha=0.25, lw=0.8)
        ax.plot(np.arange(window, len(losses) + 1), smooth(losses, window), color=color, lw=1.8, label=f"{name} ({window}-step mean)")
    ax.set_xlabel("training step (batch 8, 128 px)")
    ax.set_ylabel("training loss")
    ax.set_title("CPnet from scratch on dev train: fp32 vs bf16 autocast")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
