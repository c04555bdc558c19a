"""Same wall-time budget: ours vs Cellpose 3.1.1.3 trained from scratch on dev train, scored on dev val.

    python -m experiments.same_budget.run --minutes 15 [--out runs/same_budget] [--only ours|cellpose]

Each side trains with its own default recipe on ``../shared/data/dev`` train (378 images):

- ours: the bundle, ``train.json + experiments/recipes/dev_data.json + recipes/cpu.json`` (SGD lr 0.1, 10-epoch
  warm-up, halving over the last epochs, full CPnet, 128 px patches, batch 8, precision auto), its
  epochs sized to the budget, with the ``time_budget_minutes`` handler as the hard stop;
- Cellpose: ``cellpose.train.train_seg`` defaults (AdamW lr 0.005, batch 8, 224 px patches,
  channels [0, 0] grey), a model saved every epoch, the process stopped at the budget; the last
  complete epoch's model is the result.

Both are then scored the same way: F1 at IoU 0.5 (CellSeg protocol, 2-px border cells dropped) on
dev val rows with gt_complete yes/mostly, at the model's own training-set diameter, per modality.
The budget counts everything after the process starts (flow computation included, validation
excluded). Writes ``<out>/same_budget.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import DEV_MANIFEST, REPO
from mmcs_monai.workflows import bundle_command

DEV = DEV_MANIFEST.parent

CELLPOSE_TRAIN = r"""
import sys, numpy as np, torch
from cellpose import resnet_torch, train
from mmcs_monai.data import load_datalist
from mmcs_monai.io import read_image, read_labels
items = load_datalist(sys.argv[1], split="train")
# Cellpose's default input for an unnamed-channel image: grey (mean of RGB), channels [0, 0].
imgs = [read_image(i["image"]).mean(0) for i in items]
labels = [read_labels(i["label"]) for i in items]
net = resnet_torch.CPnet(nbase=[2, 32, 64, 128, 256], nout=3, sz=3, mkldnn=False, max_pool=True, diam_mean=30.0)
train.train_seg(net, train_data=imgs, train_labels=labels, channels=[0, 0], save_path=sys.argv[2],
                model_name="cp", save_every=1, save_each=True, n_epochs=2000)
"""


def _run_with_budget(cmd: list[str], minutes: float, log: Path, env=None) -> float:
    """Run ``cmd``; kill it at ``minutes`` (a small grace period for ours, which stops itself). Returns seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        try:
            proc.wait(timeout=minutes * 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return time.monotonic() - start


def train_ours(out: Path, minutes: float) -> Path:
    configs = [
        str(REPO / "bundle/configs/train.json"),
        str(REPO / "experiments/recipes/dev_data.json"),
        str(REPO / "bundle/configs/recipes/cpu.json"),
    ]
    overrides = {"ckpt_dir": out / "models", "output_dir": out / "eval", "time_budget_minutes": minutes, "val_interval": 100000}
    # the recipe's own epochs and learning-rate halving; the budget stops it if the machine is slower
    cmd = [sys.executable, "-m", *bundle_command("training", configs, REPO / "bundle", overrides)]
    # Grace period: the handler stops at the budget, then the final model is written.
    seconds = _run_with_budget(cmd, minutes + 3, out / "train.log")
    print(f"ours: trained {seconds / 60:.1f} min (budget {minutes} min)")
    return out / "models" / "model_final.pt"


def train_cellpose(out: Path, minutes: float) -> Path:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-c", CELLPOSE_TRAIN, str(DEV / "manifest.csv"), str(out)]
    seconds = _run_with_budget(cmd, minutes, out / "train.log")
    saved = sorted((out / "models").glob("cp_epoch_*"))
    for path in reversed(saved):  # the newest file may be half written when the process was killed
        try:
            torch.load(path, map_location="cpu", weights_only=True)
            print(f"cellpose: trained {seconds / 60:.1f} min, last complete model {path.name}")
            return path
        except Exception:
            continue
    raise RuntimeError(f"cellpose saved no complete model in {out / 'models'}; see {out / 'train.log'}")


def score(model_path: Path, masks_fn, border: int = 2) -> dict:
    """Per-modality mean F1 of ``masks_fn(image_array) -> masks`` on dev val (complete rows)."""
    from mmcs_monai.data import load_datalist
    from mmcs_monai.io import read_image, read_labels
    from mmcs_monai.metrics import f1_score

    groups: dict[str, list[float]] = {}
    for item in load_datalist(DEV / "manifest.csv", split="val", exclude_partial=True):
        f1 = f1_score(read_labels(item["label"]), masks_fn(read_image(item["image"])), border=border)["f1"]
        groups.setdefault("overall", []).append(f1)
        groups.setdefault(item["subset"], []).append(f1)
    return {k: {"f1": float(np.mean(v)), "images": len(v)} for k, v in groups.items()}


def ours_masks_fn(model_path: Path):
    import torch

    from mmcs_monai.flows import flows_to_masks
    from mmcs_monai.inference import CellInferer
    from mmcs_monai.networks import load_cellpose_checkpoint
    from mmcs_monai.transforms import NormalizePercentile, StackNucleusChannel

    net = load_cellpose_checkpoint(model_path).eval()
    inferer = CellInferer()

    def fn(image):
        x = torch.from_numpy(NormalizePercentile()(StackNucleusChannel()(image)))[None]
        out = inferer(x, net)[0]
        return flows_to_masks(out[:2].numpy(), out[2].numpy())

    return fn


def cellpose_masks_fn(model_path: Path):
    from cellpose import models

    model = models.CellposeModel(gpu=False, pretrained_model=str(model_path))

    def fn(image):
        masks, _, _ = model.eval(image.mean(0), channels=[0, 0], diameter=None)  # its diam_labels
        return masks

    return fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--out", default=str(REPO / "runs" / "same_budget"))
    parser.add_argument("--only", choices=["ours", "cellpose"], default=None)
    parser.add_argument("--score_only", action="store_true", help="score models already trained in --out")
    args = parser.parse_args()
    if not (DEV / "manifest.csv").is_file():
        raise SystemExit(f"dev data not found at {DEV}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "same_budget.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    sides = [args.only] if args.only else ["ours", "cellpose"]
    for side in sides:
        if side == "ours":
            model = out / "ours" / "models" / "model_final.pt"
            if not args.score_only:
                model = train_ours(out / "ours", args.minutes)
            results["ours"] = score(model, ours_masks_fn(model))
        else:
            if args.score_only:
                model = sorted((out / "cellpose" / "models").glob("cp_epoch_*"))[-1]
            else:
                model = train_cellpose(out / "cellpose", args.minutes)
            results["cellpose"] = score(model, cellpose_masks_fn(model))
        results_path.write_text(json.dumps(results, indent=1))
    names = sorted({k for r in results.values() for k in r}, key=lambda k: (k != "overall", k))
    print(f"\nF1@0.5 on dev val after {args.minutes:g} min of training (2 CPU cores)\n")
    print("| subset | images | ours | Cellpose 3.1.1.3 |\n|---|---|---|---|")
    for name in names:
        row = [results.get(s, {}).get(name, {}) for s in ("ours", "cellpose")]
        images = next((r["images"] for r in row if r), 0)
        cells = [f"{r['f1']:.3f}" if r else "-" for r in row]
        print(f"| {name} | {images} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
