"""Flows: ours (mmcs_monai.flows) vs Cellpose 3.1.1.3 (cellpose.dynamics) on the CPU, same inputs.

    python -m benchmarks.flows [--data ../shared/data/dev] [--split val] [--limit N] [--repeats R]

- labels -> flows: ``labels_to_flows(gt)`` vs ``cellpose.dynamics.masks_to_flows(gt, device=cpu)``;
  quality = cosine of the flow vectors inside cells (per image, and over all cell pixels).
- flows -> masks: ``flows_to_masks`` vs ``cellpose.dynamics.compute_masks`` (niter 200, cellprob
  threshold 0, flow threshold 0.4, min size 15), both given the same input: Cellpose's flows of
  the ground truth times 5 and cellprob = +10 inside cells, -10 outside.  Quality = F1 at IoU 0.5
  against the ground truth for both, and F1 of our masks against Cellpose's.  Our own full round
  trip ``flows_to_masks(5 * labels_to_flows(gt))`` is reported too.

Timing: one warm-up call each, then the wall time over all images (best of ``--repeats`` passes),
as seconds per megapixel; ratio = Cellpose time / our time (> 1: we are faster).  Measured with the
default number of torch threads, and again with ``torch.set_num_threads(1)``.
Prints markdown tables.
"""

from __future__ import annotations

import argparse
import csv
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import tifffile
import torch

from benchmarks.common import REPO, cpu_description
from mmcs_monai.flows import flows_to_masks, labels_to_flows
from mmcs_monai.metrics import f1_score

CPU = torch.device("cpu")


def load_labels(root: Path, split: str, limit: int | None):
    with open(root / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == split]
    rows = rows[:limit] if limit else rows
    return [(r, tifffile.imread(root / r["label"]).astype(np.int32)) for r in rows]


def wall_time(fn, items, repeats: int) -> float:
    """Seconds for ``fn(item)`` over all items, after one warm-up call; best of ``repeats`` passes."""
    fn(items[0])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - start)
    return best


def inside_cosine(a: np.ndarray, b: np.ndarray, labels: np.ndarray):
    """(sum, count) of the cosines of flow vectors inside cells; two zero vectors count as 1."""
    m = labels > 0
    a, b = a[:, m], b[:, m]
    cos = np.where(~a.any(0) & ~b.any(0), 1.0, (a * b).sum(0))
    return float(cos.sum()), int(m.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "dev")
    parser.add_argument("--split", default="val")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=1, help="timed passes over the images (best is kept)")
    args = parser.parse_args()
    print(f"CPU: {cpu_description()}", flush=True)

    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    from cellpose import dynamics
    from cellpose import version as cp_version

    data = load_labels(args.data, args.split, args.limit)
    rows, labels = [r for r, _ in data], [lab for _, lab in data]
    mpix = sum(lab.size for lab in labels) / 1e6
    print(
        f"{len(labels)} {args.split} label images, {mpix:.2f} MP, {sum(int(lab.max() > 0) for lab in labels)} non-empty; "
        f"cellpose {cp_version}, torch {torch.__version__}, default threads {torch.get_num_threads()}\n"
    )

    # ---- quality (not timed) ----
    ours_flows = [labels_to_flows(lab) for lab in labels]
    cp_flows = [dynamics.masks_to_flows(lab, device=CPU) for lab in labels]
    per_image, tot, cnt = [], 0.0, 0
    for lab, a, b in zip(labels, ours_flows, cp_flows):
        s, n = inside_cosine(a, b, lab)
        if n:
            per_image.append(s / n)
            tot, cnt = tot + s, cnt + n
    inputs = [((5 * f).astype(np.float32), np.where(lab > 0, 10.0, -10.0).astype(np.float32)) for lab, f in zip(labels, cp_flows)]

    def ours_masks(x):
        return flows_to_masks(*x)

    def cp_masks(x):
        return dynamics.compute_masks(*x, niter=200, cellprob_threshold=0.0, flow_threshold=0.4, min_size=15, device=CPU)

    m_ours = [ours_masks(x) for x in inputs]
    m_cp = [cp_masks(x) for x in inputs]
    m_round = [flows_to_masks(5 * f, x[1]) for f, x in zip(ours_flows, inputs)]
    f1 = {
        "ours": [f1_score(g, m)["f1"] for g, m in zip(labels, m_ours)],
        "cellpose": [f1_score(g, m)["f1"] for g, m in zip(labels, m_cp)],
        "ours vs cellpose": [f1_score(c, m)["f1"] for c, m in zip(m_cp, m_ours)],
        "round trip": [f1_score(g, m)["f1"] for g, m in zip(labels, m_round)],
    }

    # ---- speed ----
    results = {}
    default_threads = torch.get_num_threads()
    for threads in (default_threads, 1):
        torch.set_num_threads(threads)
        results[threads] = dict(
            l2f_ours=wall_time(labels_to_flows, labels, args.repeats) / mpix,
            l2f_cp=wall_time(lambda lab: dynamics.masks_to_flows(lab, device=CPU), labels, args.repeats) / mpix,
            f2m_ours=wall_time(ours_masks, inputs, args.repeats) / mpix,
            f2m_cp=wall_time(cp_masks, inputs, args.repeats) / mpix,
        )
    torch.set_num_threads(default_threads)

    print("| step | torch threads | Cellpose s/MP | ours s/MP | ratio (Cellpose/ours) | quality |")
    print("|---|---|---|---|---|---|")
    for threads, r in results.items():
        label = f"{threads} (default)" if threads == default_threads else str(threads)
        print(
            f"| labels -> flows | {label} | {r['l2f_cp']:.3f} | {r['l2f_ours']:.3f} "
            f"| {r['l2f_cp'] / r['l2f_ours']:.1f}x | cosine: mean/image {np.mean(per_image):.6f}, "
            f"min/image {np.min(per_image):.6f}, all pixels {tot / cnt:.6f} |"
        )
        print(
            f"| flows -> masks | {label} | {r['f2m_cp']:.3f} | {r['f2m_ours']:.3f} "
            f"| {r['f2m_cp'] / r['f2m_ours']:.1f}x "
            f"| F1 vs GT: Cellpose {np.mean(f1['cellpose']):.4f}, ours {np.mean(f1['ours']):.4f}; "
            f"ours vs Cellpose {np.mean(f1['ours vs cellpose']):.4f} |"
        )

    print(
        f"\nRound trip `flows_to_masks(5 * labels_to_flows(gt))` vs gt: mean F1 {np.mean(f1['round trip']):.4f} "
        f"(min {np.min(f1['round trip']):.4f})\n"
    )
    by_mod = defaultdict(list)
    for i, r in enumerate(rows):
        by_mod[r["modality"]].append(i)
    print("| modality | images | F1 ours (Cellpose flows) | F1 Cellpose | F1 ours vs Cellpose | F1 round trip (our flows) |")
    print("|---|---|---|---|---|---|")
    for mod, idx in sorted(by_mod.items()):
        keys = ("ours", "cellpose", "ours vs cellpose", "round trip")
        cells = " | ".join(f"{np.mean([f1[k][i] for i in idx]):.4f}" for k in keys)
        print(f"| {mod} | {len(idx)} | {cells} |")


if __name__ == "__main__":
    main()
