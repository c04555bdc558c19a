"""Tiling sweep on dev val: tile size, overlap, tile fitting and batch size, s/MPix and F1.

    python -m benchmarks.tiling [--data ../shared/data/dev] [--model bundle/models/model.pt] [--limit N]
        [--every 2] [--tiles 224,320,448] [--overlaps 0.05,0.1,0.2] [--batches 8] [--fit both] [--compile True]

Every configuration segments the same dev-val images (gt_complete yes/mostly) in memory -> label masks with
the same weights at the model's stored diameter (``diam_labels``), ``precision auto``, and the network
compiled (``--compile True``, the path large jobs take; one compile serves every tile shape and batch) or
eager. Columns: network pixels per image pixel (the work the tiling asks for: tiles x tile area over the
image's pixels at network scale; exact, noise-free), s/MPix end to end (network, blending, resizing and
flows -> masks; one run, so it moves with whatever else the machine runs), and F1 at IoU 0.5 against the
labels (mean over images, 2 px border as in ``mmcs evaluate``).
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import DEV_MANIFEST, REPO, cpu_description


def load_images(data: Path, limit: int | None, every: int = 1):
    """(normalised image [2, H, W] float32, labels) of the dev-val images with complete labels (every
    ``every``-th of the manifest's order, which keeps each modality's share)."""
    from mmcs_monai.data import load_datalist
    from mmcs_monai.io import read_image, read_labels
    from mmcs_monai.transforms import NormalizePercentile, StackNucleusChannel

    items = load_datalist(data / "manifest.csv", split="val", exclude_partial=True, limit=limit)[::every]
    out = []
    for item in items:
        image = NormalizePercentile()(StackNucleusChannel()(read_image(item["image"])))
        out.append((np.asarray(image, np.float32), read_labels(item["label"])))
    return out


def precompile(net, precision: str = "auto") -> float:
    """Compile the network's graph (every batch of 2+ tiles and tile size) before anything is timed, through
    the path inference takes (:meth:`CellInferer.warm_up`); seconds (the fallback: an eager run)."""
    from mmcs_monai.inference import CellInferer

    return CellInferer(precision=precision, compile=True).warm_up(net)


def network_pixels(inferer, images, zoom: float) -> float:
    """Network pixels the tiling computes per image pixel (at network scale), over all images."""
    from mmcs_monai.pipeline import windows_along

    work = pixels = 0
    for image, _ in images:
        h, w = (max(int(round(s * zoom)), 1) for s in image.shape[-2:])
        th, tw = inferer.tile_shape(h, w)
        work += windows_along(h, th, inferer.overlap) * windows_along(w, tw, inferer.overlap) * th * tw
        pixels += h * w
    return work / pixels


def run_config(net, images, diameter: float, **options) -> dict:
    """Segment every image with ``options``: seconds per image megapixel and mean F1 against the labels."""
    from mmcs_monai.metrics import f1_score
    from mmcs_monai.segmentation import segmenter_from_options

    segmenter = segmenter_from_options(net, diameter=diameter, **options)
    megapixels = sum(image.shape[-2] * image.shape[-1] for image, _ in images) / 1e6
    start = time.perf_counter()
    masks = [segmenter(image).masks for image, _ in images]
    seconds = time.perf_counter() - start
    f1 = float(np.mean([f1_score(labels, m, border=2)["f1"] for (_, labels), m in zip(images, masks)]))
    zoom = segmenter.inferer.zoom_for(net, diameter)
    return {"s_per_mpix": seconds / megapixels, "f1": f1, "work": network_pixels(segmenter.inferer, images, zoom), "masks": masks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEV_MANIFEST.parent)
    parser.add_argument("--model", default=str(REPO / "bundle" / "models" / "model.pt"))
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--every", type=int, default=1, help="every N-th image (a spread subset)")
    parser.add_argument("--tiles", default="224,320,448")
    parser.add_argument("--overlaps", default="0.05,0.1,0.2")
    parser.add_argument("--batches", default="8")
    parser.add_argument("--fit", choices=["both", "on", "off"], default="both")
    parser.add_argument("--compile", default="True")
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    print(f"CPU: {cpu_description()}", flush=True)
    warnings.filterwarnings("ignore")

    from mmcs_monai.networks import load_model
    from mmcs_monai.precision import parse_compile

    net = load_model(args.model).eval()
    diameter = float(net.diam_labels)
    images = load_images(args.data, args.limit, args.every)
    megapixels = sum(image.shape[-2] * image.shape[-1] for image, _ in images) / 1e6
    compile_ = parse_compile(args.compile)
    fits = {"both": (False, True), "on": (True,), "off": (False,)}[args.fit]
    load_before = os.getloadavg()
    if compile_:
        print(f"compiled in {precompile(net, args.precision):.0f} s", flush=True)
    run_config(net, images[:2], diameter, precision=args.precision, compile=compile_)  # loads libraries, fills caches
    rows = []
    configs = itertools.product(
        (int(t) for t in args.tiles.split(",")),
        (float(o) for o in args.overlaps.split(",")),
        fits,
        (int(b) for b in args.batches.split(",")),
    )
    for tile, overlap, fit, batch in configs:
        result = run_config(
            net,
            images,
            diameter,
            precision=args.precision,
            compile=compile_,
            roi_size=tile,
            overlap=overlap,
            fit_tiles=fit,
            sw_batch_size=batch,
        )
        result.pop("masks")
        rows.append((tile, overlap, fit, batch, result))
        print(tile, overlap, fit, batch, {k: round(v, 4) for k, v in result.items()}, flush=True)

    print(
        f"\n{len(images)} dev-val images, {megapixels:.2f} MPix; model {args.model} at its stored diameter {diameter:.1f} px; "
        f"precision {args.precision}, compile {compile_}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}\n"
    )
    print("| tile | overlap | fit tiles | batch | network px / image px | s/MPix | F1 |\n|---|---|---|---|---|---|---|")
    for tile, overlap, fit, batch, r in rows:
        print(f"| {tile} | {overlap} | {'yes' if fit else 'no'} | {batch} | {r['work']:.2f} | {r['s_per_mpix']:.3f} | {r['f1']:.4f} |")


if __name__ == "__main__":
    main()
