"""One table, same inputs, one run: ours vs Cellpose 3.1.1.3 on this machine's CPU.

    python benchmarks/bench_table.py [--data ../shared/data/dev] [--model runs/.../model_final.pt] [--limit N]

Rows: training step (full CPnet, batch 8, 128 px, augmentation included; ours in fp32 and in bf16 +
channels_last, Cellpose in fp32), end-to-end inference s/MPix on dev val (ours fp32 and the default
``precision auto``, i.e. bf16 here; Cellpose fp32; same weights, same diameter), labels -> flows and
flows -> masks s/MPix on dev-val labels. Ratio = Cellpose time / our time (> 1: we are faster).
Reuses the measurement code of ``bench_speed.py`` and ``bench_flows.py``.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_flows  # noqa: E402
import bench_speed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "dev"))
    parser.add_argument("--model", default=str(HERE.parent / "bundle" / "models" / "model.pt"))
    parser.add_argument("--limit", type=int, default=None, help="first N dev-val images for inference and flows")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    from cellpose import dynamics

    from mmcs_monai.data import load_datalist
    from mmcs_monai.flows import flows_to_masks, labels_to_flows

    torch.manual_seed(0)
    root = Path(args.data)
    train = load_datalist(root / "manifest.csv", split="train")
    val = load_datalist(root / "manifest.csv", split="val", exclude_partial=True, limit=args.limit)
    nbase = (2, 32, 64, 128, 256)
    rows = []
    step_fp32, step_cp = bench_speed.training_step_times(train, nbase, precision="fp32")
    step_bf16, _ = bench_speed.training_step_times(train, nbase, precision="bf16")
    rows.append(("training step, fp32 (s)", step_fp32, step_cp))
    rows.append(("training step, ours bf16 + channels_last (s)", step_bf16, step_cp))
    times, agreement, mpix = bench_speed.inference_times(val, args.model, bf16=True)
    rows.append((f"inference end to end, fp32 (s/MPix, {mpix:.2f} MPix)", times["ours fp32"], times["cellpose"]))
    rows.append(("inference end to end, ours default (auto = bf16 + channels_last here) (s/MPix)", times["ours bf16"], times["cellpose"]))

    labels = [lab for _, lab in bench_flows.load_labels(root, "val", args.limit)]
    lpix = sum(lab.size for lab in labels) / 1e6
    cpu = torch.device("cpu")
    rows.append(
        (
            f"labels -> flows (s/MPix, {lpix:.2f} MPix)",
            bench_flows.wall_time(labels_to_flows, labels, 1) / lpix,
            bench_flows.wall_time(lambda lab: dynamics.masks_to_flows(lab, device=cpu), labels, 1) / lpix,
        )
    )
    inputs = [
        ((5 * f).astype(np.float32), np.where(lab > 0, 10.0, -10.0).astype(np.float32))
        for lab, f in zip(labels, (dynamics.masks_to_flows(lab, device=cpu) for lab in labels))
    ]
    rows.append(
        (
            "flows -> masks (s/MPix)",
            bench_flows.wall_time(lambda x: flows_to_masks(*x), inputs, 1) / lpix,
            bench_flows.wall_time(
                lambda x: dynamics.compute_masks(*x, niter=200, cellprob_threshold=0.0, flow_threshold=0.4, min_size=15, device=cpu),
                inputs,
                1,
            )
            / lpix,
        )
    )

    print(
        f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads; masks F1 vs Cellpose's: "
        + ", ".join(f"{k} {v:.3f}" for k, v in agreement.items() if k != "cellpose")
        + "\n"
    )
    print("| measurement | ours | Cellpose 3.1.1.3 | ratio (Cellpose / ours) |\n|---|---|---|---|")
    for name, ours, theirs in rows:
        print(f"| {name} | {ours:.3f} | {theirs:.3f} | {theirs / ours:.2f} |")


if __name__ == "__main__":
    main()
