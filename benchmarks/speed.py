"""Training step and end-to-end inference: ours vs Cellpose 3.1.1.3, same machine, same inputs, one run.

    python -m benchmarks.speed [--data ../shared/data/dev] [--model bundle/models/model.pt] [--limit N]

- Training step: CPnet of the same size (default full, nbase 2-32-64-128-256), batch 8, 128 px
  patches, SGD; ours = dataset augmentation (RandCellAffined on cached flows) + forward/backward/step;
  Cellpose = `transforms.random_rotate_and_resize` + its CPnet + `train._loss_fn_seg` + step.
- Inference end to end: image in memory -> label mask, seconds per megapixel over dev-val images,
  the same weights in both (the given model file, loaded by both), the same diameter, fp32 (and
  ours in bf16 when --bf16). The masks of the two are compared (F1 at IoU 0.5 of ours against
  Cellpose's) to show the quality is equal.

Prints a markdown table with ratios (Cellpose time / our time: > 1 means we are faster).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import REPO, cpu_description


def _timed(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def training_step_times(items, nbase, batch=8, patch=128, steps=5, precision="fp32"):
    """(ours, cellpose) median seconds per training step, data preparation included.

    ``precision`` applies to ours (``bf16`` adds channels_last, as the bundle's training does when
    asked); Cellpose trains in fp32.
    """
    from cellpose import resnet_torch
    from cellpose import train as cp_train
    from cellpose import transforms as cp_transforms
    from monai.data import list_data_collate
    from monai.transforms import Compose

    from mmcs_monai.losses import CellposeLoss
    from mmcs_monai.networks import CPnet
    from mmcs_monai.precision import PrecisionInferer
    from mmcs_monai.transforms import (
        CellDiameterd,
        LabelsToFlowsd,
        LoadMicroscopyd,
        NormalizePercentiled,
        RandCellAffined,
        StackNucleusChanneld,
    )

    items = items[:batch]
    prepare = Compose([LoadMicroscopyd(), StackNucleusChanneld(), NormalizePercentiled(), CellDiameterd(), LabelsToFlowsd()])
    cached = [prepare(it) for it in items]  # what CacheDataset holds for a training run
    augment = RandCellAffined(keys=["image", "flows"], spatial_size=patch)
    net = CPnet(nbase=nbase)
    loss_fn = CellposeLoss()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    run_network = PrecisionInferer(precision=precision, channels_last=precision == "bf16")

    def ours():
        warped = [augment(d) for d in cached]
        batch_items = list_data_collate([{"image": w["image"], "flows": w["flows"]} for w in warped])
        out = run_network(batch_items["image"], net)
        loss = loss_fn(out, batch_items["flows"])
        opt.zero_grad()
        loss.backward()
        opt.step()

    # Cellpose: its own augmentation on the same normalised images and flows; its flow files hold
    # (labels, cell probability, dY, dX) and its loss takes channels 1: of the augmented labels.
    imgs = [np.asarray(d["image"]) for d in cached]
    flows = [np.concatenate([d["label"].astype(np.float32), d["flows"][2:3], d["flows"][:2]]) for d in cached]
    cp_net = resnet_torch.CPnet(nbase=list(nbase), nout=3, sz=3)
    cp_opt = torch.optim.SGD(cp_net.parameters(), lr=0.01, momentum=0.9)

    def theirs():
        x, lbl, _ = cp_transforms.random_rotate_and_resize(
            imgs, Y=flows, scale_range=0.5, xy=(patch, patch), rescale=np.ones(len(imgs), np.float32)
        )
        x = torch.from_numpy(x).float()
        out = cp_net(x)[0]
        loss = cp_train._loss_fn_seg(lbl[:, 1:], out, torch.device("cpu"))  # as train_seg: (cellprob, dY, dX)
        cp_opt.zero_grad()
        loss.backward()
        cp_opt.step()

    ours(), theirs()  # warm-up
    t_ours = float(np.median([_timed(ours) for _ in range(steps)]))
    t_theirs = float(np.median([_timed(theirs) for _ in range(steps)]))
    return t_ours, t_theirs


def inference_times(items, model_path, bf16: bool):
    """Seconds per megapixel for ours (fp32 [, bf16]) and Cellpose, plus agreement of the masks."""
    from cellpose import models

    from mmcs_monai.flows import flows_to_masks
    from mmcs_monai.inference import CellInferer
    from mmcs_monai.io import read_image
    from mmcs_monai.metrics import f1_score
    from mmcs_monai.networks import load_cellpose_checkpoint
    from mmcs_monai.transforms import NormalizePercentile, StackNucleusChannel

    net = load_cellpose_checkpoint(model_path).eval()
    diameter = float(net.diam_labels.item())
    cp = models.CellposeModel(gpu=False, pretrained_model=str(model_path), nchan=2)
    images = [read_image(it["image"]) for it in items]
    megapixels = sum(img.shape[-2] * img.shape[-1] for img in images) / 1e6

    def ours(precision):
        inferer = CellInferer(precision=precision, channels_last=precision == "bf16")
        masks = []
        for img in images:
            x = torch.from_numpy(NormalizePercentile()(StackNucleusChannel()(img)))[None]
            out = inferer(x, net)[0]
            masks.append(flows_to_masks(out[:2].numpy(), out[2].numpy()))
        return masks

    def theirs():
        masks = []
        for img in images:
            grey = img.mean(0) if img.shape[0] > 1 else img[0]
            m, _, _ = cp.eval(grey, channels=[0, 0], diameter=diameter, flow_threshold=0.4, cellprob_threshold=0.0)
            masks.append(m)
        return masks

    results = {}
    ours("fp32"), theirs()  # warm-up on the same images (loads libraries, fills caches)
    for name, fn in [("ours fp32", lambda: ours("fp32")), ("cellpose", theirs)] + ([("ours bf16", lambda: ours("bf16"))] if bf16 else []):
        start = time.perf_counter()
        masks = fn()
        results[name] = ((time.perf_counter() - start) / megapixels, masks)
    reference = results["cellpose"][1]
    agreement = {name: float(np.mean([f1_score(r, m)["f1"] for r, m in zip(reference, masks)])) for name, (_, masks) in results.items()}
    return {name: t for name, (t, _) in results.items()}, agreement, megapixels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "dev"))
    parser.add_argument("--model", default=str(REPO / "bundle" / "models" / "model.pt"))
    parser.add_argument("--limit", type=int, default=None, help="use the first N dev-val images")
    parser.add_argument("--bf16", action="store_true", help="also time our inference in bf16 + channels_last")
    parser.add_argument("--nbase", default="2,32,64,128,256")
    args = parser.parse_args()
    print(f"CPU: {cpu_description()}", flush=True)

    from mmcs_monai.data import load_datalist

    torch.manual_seed(0)
    train = load_datalist(Path(args.data) / "manifest.csv", split="train")
    val = load_datalist(Path(args.data) / "manifest.csv", split="val", exclude_partial=True, limit=args.limit)
    nbase = tuple(int(v) for v in args.nbase.split(","))
    print(f"torch threads: {torch.get_num_threads()}; CPnet nbase {nbase}")
    step_ours, step_theirs = training_step_times(train, nbase)
    times, agreement, mpix = inference_times(val, args.model, args.bf16)

    print("\n| measurement | ours | Cellpose 3.1.1.3 | ratio (Cellpose / ours) |\n|---|---|---|---|")
    print(
        f"| training step (batch 8, 128 px, data prep included), s | {step_ours:.3f} | {step_theirs:.3f} | {step_theirs / step_ours:.2f} |"
    )
    for name in [n for n in times if n != "cellpose"]:
        print(
            f"| inference end to end {name}, s/MPix ({mpix:.2f} MPix, masks F1 vs Cellpose {agreement[name]:.3f}) "
            f"| {times[name]:.2f} | {times['cellpose']:.2f} | {times['cellpose'] / times[name]:.2f} |"
        )


if __name__ == "__main__":
    main()
