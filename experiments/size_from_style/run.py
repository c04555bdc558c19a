"""Can one cheap network pass guess the cell size well enough for ``auto`` only to confirm it? (Issue 37, item 3.)

    python -m experiments.size_from_style.run [--model bundle/models/model.pt] [--draws 3]   # about 6 minutes

Cellpose 3's size model regresses log(diameter) on the network's style vector. Here the probe is the pass ``auto``
already makes first at a coarse zoom: the busiest window of the image at the 2x candidate's zoom (cells seen at
half their stored-relative size, at most 256 x 256 network px). For every labelled train image of dev and
``extra`` (centre crop of at most 384 px), ``--draws`` random scales log-uniform in 0.25x-4x; the target is the
label median diameter at that zoom (log, network px). Ridge regression (closed form) on

- ``style``: the 256 style values (unit norm), as Cellpose's size model;
- ``style+measured``: plus what the probe's masks measure (log median diameter, found or not, log count).

Scored on the val images (6 draws each) as ``|log2(predicted / true)|``: median, 90th percentile, the share
within 0.25 (a guess that close could be confirmed by one run at it), per modality. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import REPO
from benchmarks.diameter import _resample
from mmcs_monai.data import load_datalist
from mmcs_monai.diameters import median_diameter
from mmcs_monai.flows import MaskSettings
from mmcs_monai.io import read_labels
from mmcs_monai.networks import load_model
from mmcs_monai.precision import autocast_context, resolve_precision
from mmcs_monai.size_estimate import _median_diameter_and_count, busiest_window
from mmcs_monai.transforms import inference_preprocessing

MANIFESTS = [REPO.parent / "shared" / "data" / name / "manifest.csv" for name in ("dev", "extra")]


def probes(network, split: str, draws: int, seed: int, crop: int = 384, side: int = 256) -> dict[str, np.ndarray]:
    """Style, probe measurement and target of ``draws`` random rescalings of each labelled ``split`` image."""
    stored = float(network.diam_labels)
    zoom = float(network.diam_mean) / (2 * stored)  # the search's 2x candidate
    items = [i for i in load_datalist([str(m) for m in MANIFESTS], split=split, exclude_partial=True) if i.get("label")]
    load, masks, rng = inference_preprocessing("image"), MaskSettings(), np.random.default_rng(seed)
    precision = resolve_precision("auto", "cpu")
    rows = {"style": [], "target": [], "measured": [], "count": [], "subset": []}
    for item in items:
        image = torch.as_tensor(np.asarray(load(dict(item))["image"]), dtype=torch.float32)
        labels = torch.as_tensor(read_labels(item["label"]).astype(np.int64))
        h, w = labels.shape
        y0, x0 = max(0, (h - crop) // 2), max(0, (w - crop) // 2)
        image, labels = image[:, y0 : y0 + crop, x0 : x0 + crop], labels[y0 : y0 + crop, x0 : x0 + crop]
        for _ in range(draws):
            scaled, scaled_labels = _resample(image, labels, float(2 ** rng.uniform(-2, 2)))
            true = median_diameter(scaled_labels)
            if true <= 0:
                continue
            height, width = scaled.shape[-2:]
            ch, cw = min(int(side / zoom), height), min(int(side / zoom), width)
            y, x = busiest_window(scaled, ch, cw)
            window = F.interpolate(
                scaled[None, :, y : y + ch, x : x + cw], size=(max(round(ch * zoom), 16), max(round(cw * zoom), 16)), mode="bilinear"
            )
            with torch.no_grad(), autocast_context("cpu", precision):
                flows, style = network.forward_with_style(window)
            measured, count = _median_diameter_and_count(masks.masks(flows[0].float().numpy()))
            rows["style"].append(style[0].float().numpy())
            rows["target"].append(math.log(true * zoom))
            rows["measured"].append(measured)
            rows["count"].append(count)
            rows["subset"].append(item["subset"])
    return {k: np.asarray(v) for k, v in rows.items()}


def features(rows: dict[str, np.ndarray], kind: str) -> np.ndarray:
    if kind == "style":
        return rows["style"]
    found = rows["measured"] > 0
    log_measured = np.where(found, np.log(np.maximum(rows["measured"], 1e-3)), 0.0)
    return np.concatenate([rows["style"], log_measured[:, None], found[:, None].astype(float), np.log1p(rows["count"])[:, None]], 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "bundle" / "models" / "model.pt"))
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--ridge", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    network = load_model(args.model).eval()
    train, val = probes(network, "train", args.draws, seed=0), probes(network, "val", 2 * args.draws, seed=1)
    print(f"model {args.model}: {len(train['target'])} train probes, {len(val['target'])} val probes")
    print("\n| features | ridge | median | p90 | share within 0.25 | per modality (median) |\n|---|---|---|---|---|---|")
    for kind in ("style", "style+measured"):
        x, xv = features(train, kind), features(val, kind)
        mean, target_mean = x.mean(0), train["target"].mean()
        for ridge in args.ridge:
            coef = np.linalg.solve((x - mean).T @ (x - mean) + ridge * np.eye(x.shape[1]), (x - mean).T @ (train["target"] - target_mean))
            error = np.abs((xv - mean) @ coef + target_mean - val["target"]) / math.log(2)
            groups = ", ".join(f"{s.split(' (')[0]} {np.median(error[val['subset'] == s]):.2f}" for s in sorted(set(val["subset"])))
            print(
                f"| {kind} | {ridge} | {np.median(error):.3f} | {np.percentile(error, 90):.3f} | {np.mean(error < 0.25):.2f} | {groups} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
