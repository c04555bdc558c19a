"""Diameter estimates at any cell size: F1 and time of each way of choosing the inference diameter.

Dev val and ``extra`` val images (``gt_complete`` yes/mostly) and their labels are resampled by 0.25x,
0.5x, 1x, 2x, 3x and 4x (images bilinear, labels nearest). Per scale, each image is segmented at

- ``stored``: the model's stored mean diameter (``diam_labels``);
- ``refine``: the old ``auto`` (segment at the stored mean, measure, segment again);
- ``auto``: the multi-scale search (:mod:`mmcs_monai.size_estimate`), the default;
- ``true``: the image's own median label diameter (the best a diameter estimate can do);
- ``previous`` (only when asked, ``--methods``): ``auto`` as 0.4.3 shipped it: the search run by the model's own
  network, not by the size network the model file carries (:meth:`CPnet.attach_size_network`; the same when it
  carries none). Until 0.4.3 this arm was 0.4.2's search (``DiameterSearch(min_coverage=0)``), before that 0.4.0's
  (``whole_below=2``).

The table gives the mean F1 per scale and method (IoU 0.5), the median ``|log2(estimate / true)|`` of
the estimates, and their time (image in memory -> masks, estimate included) relative to the ``true`` run of
the same images (the fixed diameter a user who knows the size would give). To keep 4x affordable on a CPU each image is first centre-cropped
to at most ``--crop`` pixels a side (1024 px at 4x for the default 256), and ``--per_subset`` images of
each modality are used (all with 0).

    python -m benchmarks.diameter --model bundle/models/model.pt
    python -m benchmarks.diameter --subsets "H&E" --crop 512 --scales 0.5,1,2 --per_subset 0   # dense tissue

A last table gives F1 per modality and scale, with ``auto`` against ``stored`` and ``true``.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections import defaultdict
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import REPO, cpu_description
from mmcs_monai.allocator import keep_freed_memory
from mmcs_monai.data import load_datalist
from mmcs_monai.diameters import median_diameter
from mmcs_monai.inference import CellInferer
from mmcs_monai.io import read_labels
from mmcs_monai.metrics import f1_score
from mmcs_monai.networks import load_model
from mmcs_monai.segmentation import CellSegmenter
from mmcs_monai.size_estimate import DiameterSearch
from mmcs_monai.transforms import inference_preprocessing

SCALES = (0.25, 0.5, 1.0, 2.0, 3.0, 4.0)
METHODS = ("stored", "refine", "auto", "true")
NAMES = {"refine": "refine (old auto)", "auto": "auto", "previous": "auto of 0.4.3"}


def _images(manifests, per_subset: int, crop: int, subsets: str = ""):
    items = [i for i in load_datalist([str(m) for m in manifests], split="val", exclude_partial=True) if i.get("label")]
    items = [i for i in items if not subsets or any(s in i["subset"] for s in subsets.split(","))]
    chosen, counts = [], defaultdict(int)
    for item in items:
        if per_subset and counts[item["subset"]] >= per_subset:
            continue
        counts[item["subset"]] += 1
        chosen.append(item)
    load = inference_preprocessing("image")
    out = []
    for item in chosen:
        image = torch.as_tensor(np.asarray(load(dict(item))["image"]), dtype=torch.float32)
        labels = torch.as_tensor(read_labels(item["label"]).astype(np.int64))
        h, w = labels.shape
        y, x = max(0, (h - crop) // 2), max(0, (w - crop) // 2)
        out.append((item, image[:, y : y + crop, x : x + crop], labels[y : y + crop, x : x + crop]))
    return out


def _resample(image: torch.Tensor, labels: torch.Tensor, scale: float):
    if scale == 1.0:
        return image, labels
    size = tuple(max(8, int(round(s * scale))) for s in labels.shape)
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    labels = F.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return image, labels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "bundle" / "models" / "model.pt"))
    parser.add_argument("--data", nargs="+", default=[str(REPO.parent / "shared" / "data" / n / "manifest.csv") for n in ("dev", "extra")])
    parser.add_argument("--scales", default=",".join(str(s) for s in SCALES))
    parser.add_argument("--per_subset", type=int, default=3, help="images per modality (0: all)")
    parser.add_argument("--crop", type=int, default=256, help="centre crop (pixels) before resampling")
    parser.add_argument("--subsets", default="", help="only modalities whose name contains one of these (comma-separated)")
    parser.add_argument("--refinements", type=int, default=None, help="the search's refinement limit (default: the library's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="of stored, refine, auto, previous, true (stored, auto, true always run)"
    )
    args = parser.parse_args(argv)
    print(f"CPU: {cpu_description()}", flush=True)
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as in mmcs infer (the bundle's inference workflow)
    network = load_model(args.model).eval()
    search = DiameterSearch() if args.refinements is None else replace(DiameterSearch(), refinements=args.refinements)
    segmenter = CellSegmenter(network, CellInferer(precision="auto", search=search))
    own = copy.copy(network)  # the same weights, searching with themselves
    if hasattr(own, "attach_size_network"):
        own.attach_size_network(None)
    previous = CellSegmenter(own, CellInferer(precision="auto", search=search))
    methods = [m for m in ("stored", "refine", "previous", "auto", "true") if m in {"stored", "auto", "true", *args.methods.split(",")}]
    estimates = [m for m in methods if m in NAMES]
    data = _images(args.data, args.per_subset, args.crop, args.subsets)
    scales = [float(s) for s in args.scales.split(",")]
    sizer = getattr(network, "size_network", None)
    print(
        f"model {args.model}: diam_mean {float(network.diam_mean):.1f}, stored diameter {float(network.diam_labels):.1f} px, "
        f"size network {'nbase ' + '-'.join(map(str, sizer.nbase)) if sizer is not None else 'none (the model searches)'}"
    )
    print(f"{len(data)} images ({', '.join(sorted({i['subset'] for i, _, _ in data}))}), crop {args.crop} px, {search}")
    rows = []
    groups = defaultdict(lambda: defaultdict(list))  # (modality, scale) -> method -> F1 per image
    for scale in scales:
        f1 = defaultdict(list)
        seconds = defaultdict(float)
        errors = defaultdict(list)
        for item, image, labels in data:
            image_s, labels_s = _resample(image, labels, scale)
            true = median_diameter(labels_s)
            if true <= 0:
                continue
            for method in methods:
                diameter = {"stored": None, "true": true, "previous": "auto"}.get(method, method)
                start = time.perf_counter()
                result = (previous if method == "previous" else segmenter)(image_s, diameter=diameter)
                seconds[method] += time.perf_counter() - start
                f1[method].append(f1_score(labels_s.numpy(), result.masks)["f1"])
                groups[(item["subset"], scale)][method].append(f1[method][-1])
                if method in estimates:
                    errors[method].append(abs(math.log2(result.diameter / true)))
        row = {"scale": scale, "images": len(f1["stored"])}
        for method in methods:
            row[f"f1_{method}"] = float(np.mean(f1[method]))
        for method in estimates:
            row[f"log2_err_{method}"] = float(np.median(errors[method]))
            row[f"time_{method}_vs_true"] = seconds[method] / seconds["true"]
        rows.append(row)
        print(_format([row], estimates, header=len(rows) == 1), flush=True)
    gap = [(r["f1_true"] - r["f1_stored"], r["f1_auto"] - r["f1_stored"]) for r in rows]
    closed = sum(g[1] for g in gap) / max(sum(g[0] for g in gap), 1e-9)
    print()
    print(_format(rows, estimates, header=True))
    means = ", ".join(f"{m} {np.mean([r[f'f1_{m}'] for r in rows]):.3f}" for m in methods)
    print(
        f"\nmean over scales: {means}; auto closes {100 * closed:.0f}% of the stored -> true gap; "
        f"worst auto - true {min(r['f1_auto'] - r['f1_true'] for r in rows):+.3f}"
    )
    print(
        "\n| modality | scale | images | F1 stored | F1 auto | F1 true | auto - stored | auto - true |\n|---|---|---|---|---|---|---|---|"
    )
    for (subset, scale), by in sorted(groups.items()):
        stored, auto, true = (float(np.mean(by[m])) for m in ("stored", "auto", "true"))
        print(
            f"| {subset} | {scale:g}x | {len(by['auto'])} | {stored:.3f} | {auto:.3f} | {true:.3f} | {auto - stored:+.3f} | {auto - true:+.3f} |"
        )
    return 0


def _format(rows, estimates, header: bool) -> str:
    lines = []
    if header:
        cols = ["scale", "images", "F1 stored", *(f"F1 {NAMES[m]}" for m in estimates), "F1 true", "auto - true"]
        cols += [f"|log2 err| {m}" for m in estimates] + [f"time {m} / true" for m in estimates]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{r['scale']:g}x", str(r["images"]), f"{r['f1_stored']:.3f}", *(f"{r[f'f1_{m}']:.3f}" for m in estimates)]
        cells += [f"{r['f1_true']:.3f}", f"{r['f1_auto'] - r['f1_true']:+.3f}"]
        cells += [f"{r[f'log2_err_{m}']:.2f}" for m in estimates] + [f"{r[f'time_{m}_vs_true']:.2f}x" for m in estimates]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
