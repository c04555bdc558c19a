"""Training curves of the shipped model from its TensorBoard scalars (phase 1, then phase 2), as one PNG.

python -m experiments.recipes.plot_training_curves runs/generalist --output bundle/docs/training_curves.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of every scalar in the event files under ``log_dir``."""
    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(log_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return {tag: sorted(values) for tag, values in out.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="folder with phase1/ and phase2/ (scripts/train_generalist.sh)")
    parser.add_argument("--output", default="training_curves.png")
    args = parser.parse_args(argv)
    run = Path(args.run_dir)
    phases = [(name, scalars(run / name / "tensorboard")) for name in ("phase1", "phase2") if (run / name / "tensorboard").is_dir()]
    if not phases:
        raise SystemExit(f"{run}: no phase1/tensorboard or phase2/tensorboard")
    fig, (loss_ax, f1_ax) = plt.subplots(1, 2, figsize=(11, 4))
    offset = 0
    for name, tags in phases:
        loss = tags.get("train_loss", [])
        epochs_per_step = None
        if loss:
            # iteration-level loss: plot against epochs (steps per epoch from the F1/lr logs' epoch count)
            lr = tags.get("lr", [])
            n_epochs = max((s for s, _ in lr), default=0)
            epochs_per_step = n_epochs / max(s for s, _ in loss) if n_epochs else 1.0
            window = 50
            values = [v for _, v in loss]
            smooth = [sum(values[max(0, i - window) : i + 1]) / (i + 1 - max(0, i - window)) for i in range(len(values))]
            loss_ax.plot([offset + s * epochs_per_step for s, _ in loss], smooth, label=f"{name} (mean of {window} steps)")
        for tag in ("val_f1", "val_f1_teacher"):
            if tags.get(tag):
                f1_ax.plot([offset + s for s, _ in tags[tag]], [v for _, v in tags[tag]], "o-", label=f"{name} {tag}")
        offset += max((s for s, _ in tags.get("lr", [])), default=0)
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="loss (phase 2: (1-w) L_lab + w L_unlab)")
    f1_ax.set(xlabel="epoch", ylabel="F1 at IoU 0.5", title="validation F1 (dev val + extra val, stored diameter)")
    for ax in (loss_ax, f1_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output, dpi=100)
    print(f"wrote {args.output}: {', '.join(f'{n}: {sorted(t)}' for n, t in phases)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
