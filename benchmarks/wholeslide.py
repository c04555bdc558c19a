"""Whole-slide inference: a 10,000 x 10,000 mosaic of real dev images, ours vs Cellpose 3.1.1.3.

    python -m benchmarks.wholeslide --model runs/same_budget/ours/models/model_final.pt \
        [--size 10000] [--crop 2000] [--cellpose] [--cellpose-timeout 3600] [--work runs/wholeslide]

1. Builds the slide once: dev fluorescence images (grey, train and val, CC0 DSB) packed row by row
   into a ``size`` x ``size`` canvas, each scaled to uint8 by its own 1-99 percentiles, saved as a
   tiled zlib TIFF, with the matching label mosaic (ids offset per image).
2. Ours: ``SlideSegmenter`` (``mmcs infer-slide``) on the slide in a child process: wall time,
   megapixels per second, peak RSS of the process, cells, cells crossing block borders, F1 against
   the label mosaic.
3. Seams: on a ``crop`` x ``crop`` crop, untiled inference (one ``CellInferer`` call + masks on the
   whole crop) vs the block path with small blocks (many borders): F1 between the two and the
   number of untiled cells on a block border that the block path split into pieces.
4. Cellpose 3.1.1.3 (``--cellpose``): ``CellposeModel.eval`` with the same weights and diameter on
   the crop and on the whole slide (child processes, the slide one with a timeout): time, peak RSS.

Prints a markdown table; ratios are Cellpose / ours (> 1: ours is faster or smaller).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, cpu_description

DEV = REPO.parent / "shared" / "data" / "dev"


# ------------------------------------------------------------------ the slide
def build_mosaic(size: int, image_path: Path, labels_path: Path) -> dict:
    """Pack dev fluorescence images into a size x size slide; returns what went in."""
    import tifffile

    from mmcs_monai.data import load_datalist
    from mmcs_monai.io import read_image, read_labels
    from mmcs_monai.transforms.array import percentile_bounds, scale_to_bounds

    items = [i for split in ("train", "val") for i in load_datalist(DEV / "manifest.csv", split=split)]
    items = [i for i in items if i["subset"].startswith("fluorescence") and i.get("label")]
    image = np.zeros((size, size), np.uint8)
    labels = np.zeros((size, size), np.uint32)
    y = x = row_height = used = 0
    next_id = 1
    while y < size:
        item = items[used % len(items)]
        tile = read_image(item["image"]).mean(0, keepdims=True)
        tile8 = (np.clip(scale_to_bounds(tile, *percentile_bounds(tile)), 0, 1)[0] * 255).astype(np.uint8)
        lab = read_labels(item["label"])
        h, w = lab.shape
        if x + w > size:  # next shelf
            y, x, row_height = y + row_height, 0, 0
            if y >= size:
                break
        h_fit, w_fit = min(h, size - y), min(w, size - x)
        image[y : y + h_fit, x : x + w_fit] = tile8[:h_fit, :w_fit]
        part = lab[:h_fit, :w_fit].astype(np.uint32)
        labels[y : y + h_fit, x : x + w_fit] = np.where(part > 0, part + next_id - 1, 0)
        next_id += int(lab.max())
        x += w
        row_height = max(row_height, h_fit)
        used += 1
    tifffile.imwrite(image_path, image, tile=(512, 512), compression="zlib")
    tifffile.imwrite(labels_path, labels, tile=(512, 512), compression="zlib")
    return {"images_packed": used, "distinct_images": len(items)}


# ------------------------------------------------------------------ child processes
def _peak_rss_gib() -> float:
    """This process's peak RSS, GiB: ``VmHWM`` (reset when the process execs, so a child started from a large
    parent reports its own peak; ``ru_maxrss`` keeps the parent's RSS at the fork), else ``ru_maxrss``."""
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB -> GiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux


def _peak_child_rss_gib() -> float:
    """Largest peak RSS of a finished child of this process (inductor's compile workers), GiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


class StepTimes:
    """Wall time spent in named library functions during a slide run (wrapped in place, this process only)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed(*a, **k):
            start = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start

        setattr(owner, name, timed)


def profile_steps(compiled: bool) -> StepTimes:
    """Time the steps of ``SlideSegmenter``: the network's forward calls, the sliding window around them
    (tiles, blending: ``CellInferer._run`` includes the forward), flows -> masks, stitching, reading, and the
    last pass (ids, table, TIFF)."""
    from mmcs_monai import inference, wholeslide
    from mmcs_monai.flows import MaskSettings
    from mmcs_monai.networks import CPnet
    from mmcs_monai.networks.compiled import CompiledNetwork

    steps = StepTimes()
    steps.wrap(inference.CellInferer, "_run", "sliding window, forward included (CellInferer._run)")
    # the compiled forward runs no Python CPnet.forward (and a timer inside it would break the graph)
    steps.wrap(CompiledNetwork, "__call__", "network forward (compiled)") if compiled else steps.wrap(CPnet, "forward", "network forward")
    steps.wrap(MaskSettings, "masks", "flows -> masks (MaskSettings.masks)")
    steps.wrap(wholeslide, "owned_cells", "stitching: owned cells")
    steps.wrap(wholeslide, "paste_block", "stitching: paste into the label file")
    steps.wrap(wholeslide.SlideSegmenter, "read_window", "reading and scaling windows")
    steps.wrap(wholeslide, "finalize_labels", "last pass: ids and cell table")
    steps.wrap(wholeslide, "write_label_tiff", "last pass: label TIFF")
    steps.wrap(wholeslide, "write_cell_table", "last pass: cell CSV")
    return steps


def child_ours(args) -> dict:
    from mmcs_monai.inference import CellInferer
    from mmcs_monai.networks import load_cellpose_checkpoint
    from mmcs_monai.precision import parse_compile
    from mmcs_monai.wholeslide import SlideSegmenter

    net = load_cellpose_checkpoint(args.model).eval()
    inferer = CellInferer(precision=args.precision, compile=parse_compile(args.compile))
    steps = profile_steps(compiled=inferer.compile is not False) if args.profile else None
    segmenter = SlideSegmenter(net, inferer, block_size=args.block_size, diameter=args.diameter)
    result = segmenter(args.image, args.out, Path(args.out).with_suffix(".csv"))
    report = {
        "seconds": result.seconds,
        "cells": result.cells,
        "blocks": result.blocks,
        "diameter": result.diameter,
        "block_px": result.block_px,
        "compiled": result.compiled,
        "peak_rss_gib": _peak_rss_gib(),
        "peak_child_rss_gib": _peak_child_rss_gib(),
    }
    if steps is not None:
        report["steps"] = steps.seconds
    return report


def child_cellpose(args) -> dict:
    import tifffile
    from cellpose import models

    from mmcs_monai.networks import load_cellpose_checkpoint

    diameter = float(load_cellpose_checkpoint(args.model).diam_labels)
    image = tifffile.imread(args.image)
    model = models.CellposeModel(gpu=False, pretrained_model=str(args.model))
    start = time.perf_counter()
    masks = model.eval(image, channels=[0, 0], diameter=diameter, flow_threshold=0.4, cellprob_threshold=0.0)[0]
    seconds = time.perf_counter() - start
    tifffile.imwrite(args.out, masks.astype(np.uint32), compression="zlib")
    return {"seconds": seconds, "cells": int(masks.max()), "peak_rss_gib": _peak_rss_gib()}


def run_child(kind: str, image: Path, out: Path, args, timeout: float | None = None) -> dict | None:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.wholeslide",
        "--child",
        kind,
        "--image",
        str(image),
        "--out",
        str(out),
        "--model",
        str(args.model),
        "--precision",
        args.precision,
        "--block-size",
        str(args.block_size),
        "--compile",
        str(args.compile),
        "--diameter",
        str(args.diameter),
    ] + (["--profile"] if args.profile else [])
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        print(f"{kind} on {image.name}: did not finish in {timeout:.0f} s", flush=True)
        return None
    if done.returncode != 0:
        print(f"{kind} on {image.name} failed:\n{done.stderr[-3000:]}", flush=True)
        return None
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = time.perf_counter() - start
    print(kind, image.name, result, flush=True)
    return result


# ------------------------------------------------------------------ seams
def border_cells(labels: np.ndarray, block: int) -> np.ndarray:
    """Ids of cells in ``labels`` that cross a block border (rows/columns at multiples of ``block``)."""
    from scipy import ndimage

    ids = []
    for label, found in enumerate(ndimage.find_objects(labels), start=1):
        if found is None:
            continue
        ys, xs = found
        if ys.start // block != (ys.stop - 1) // block or xs.start // block != (xs.stop - 1) // block:
            ids.append(label)
    return np.asarray(ids, int)


def split_cells(reference: np.ndarray, tiled: np.ndarray, candidates: np.ndarray) -> int:
    """Reference cells (among ``candidates``) that two or more tiled cells each cover by >= 20%."""
    splits = 0
    for label in candidates:
        covered = tiled[reference == label]
        ids, counts = np.unique(covered[covered > 0], return_counts=True)
        splits += int((counts >= 0.2 * covered.size).sum() >= 2)
    return splits


def seam_check(args, crop_path: Path) -> dict:
    """Untiled vs block path on the crop: default blocks, small blocks (many borders), and the floor.

    The floor is untiled vs untiled on the crop shifted by (37, 53) px: how much the tile grid and
    resampling phase alone move the masks, with no block borders at all.
    """
    import tifffile
    import torch

    from mmcs_monai.flows import flows_to_masks
    from mmcs_monai.inference import CellInferer
    from mmcs_monai.io import open_regions
    from mmcs_monai.metrics import f1_score
    from mmcs_monai.networks import load_cellpose_checkpoint
    from mmcs_monai.wholeslide import SlideSegmenter

    net = load_cellpose_checkpoint(args.model).eval()
    inferer = CellInferer(precision=args.precision)
    segmenter = SlideSegmenter(net, inferer)
    with open_regions(crop_path) as regions:  # the same input scaling as the block path
        h, w = regions.shape
        x = torch.as_tensor(segmenter.read_window(regions, (0, h, 0, w), segmenter.intensity_bounds(regions)))[None]

    def untiled(image):
        flows = inferer(image, net)[0].numpy()
        return flows_to_masks(flows[:2], flows[2])

    reference = untiled(x)
    shifted = untiled(x[..., 37:, 53:])
    report = {
        "untiled_cells": int(reference.max()),
        "floor_f1_untiled_vs_shifted_grid": f1_score(reference[37:, 53:], shifted, border=2)["f1"],
    }
    for name, block_size in (("default", args.block_size), ("small", 512)):
        segmenter = SlideSegmenter(net, inferer, block_size=block_size)
        out = Path(args.work) / f"crop_blocks_{block_size}_masks.tif"
        result = segmenter(crop_path, out)
        tiled = tifffile.imread(out).astype(np.int64)
        crossing = border_cells(reference, result.block_px)
        report[name] = {
            "blocks": result.blocks,
            "block_px": result.block_px,
            "cells": result.cells,
            "f1_vs_untiled": f1_score(reference, tiled, border=2)["f1"],
            "untiled_cells_on_block_borders": int(crossing.size),
            "split_cells": split_cells(reference, tiled, crossing),
            "border_copies_dropped": result.border_copies,
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "bundle" / "models" / "model.pt")
    parser.add_argument("--size", type=int, default=10000)
    parser.add_argument("--crop", type=int, default=2000)
    parser.add_argument("--block-size", type=int, default=2048)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--compile", default="auto", help="ours: True, False or auto (the default: on for a large slide on a CPU)")
    parser.add_argument("--diameter", default="stored", help="ours: the slide's diameter (stored: the model's mean, as Cellpose gets)")
    parser.add_argument("--profile", action="store_true", help="ours: time each step of the slide path")
    parser.add_argument("--cellpose", action="store_true")
    parser.add_argument("--cellpose-timeout", type=float, default=3600)
    parser.add_argument("--skip-slide", action="store_true", help="only the crop measurements")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "wholeslide")
    parser.add_argument("--child", choices=["ours", "cellpose"])
    parser.add_argument("--image")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        print(json.dumps((child_ours if args.child == "ours" else child_cellpose)(args)))
        return
    print(f"CPU: {cpu_description()}", flush=True)

    import tifffile

    from mmcs_monai.metrics import f1_score

    args.work.mkdir(parents=True, exist_ok=True)
    slide, slide_labels = args.work / f"slide_{args.size}.tif", args.work / f"slide_{args.size}_labels.tif"
    if not slide.is_file():
        print("building the slide:", build_mosaic(args.size, slide, slide_labels), flush=True)
    crop = args.work / f"crop_{args.crop}.tif"
    full = tifffile.imread(slide)
    y0 = x0 = (args.size - args.crop) // 2
    tifffile.imwrite(crop, full[y0 : y0 + args.crop, x0 : x0 + args.crop])
    del full

    rows = []
    seams = seam_check(args, crop)
    print("seams:", seams, flush=True)
    crop_ours = run_child("ours", crop, args.work / "crop_ours_masks.tif", args)
    crop_cp = run_child("cellpose", crop, args.work / "crop_cellpose_masks.tif", args) if args.cellpose else None
    rows.append(("crop", args.crop, crop_ours, crop_cp))
    if not args.skip_slide:
        slide_ours = run_child("ours", slide, args.work / "slide_ours_masks.tif", args)
        slide_cp = (
            run_child("cellpose", slide, args.work / "slide_cellpose_masks.tif", args, timeout=args.cellpose_timeout)
            if args.cellpose
            else None
        )
        truth = tifffile.imread(slide_labels)
        for result, masks_file in ((slide_ours, "slide_ours_masks.tif"), (slide_cp, "slide_cellpose_masks.tif")):
            if result:
                masks = tifffile.imread(args.work / masks_file)
                result["f1_vs_labels"] = f1_score(truth, masks, border=0)["f1"]
                if "block_px" in result:
                    result["cells_on_block_borders"] = int(border_cells(masks, result["block_px"]).size)
        del truth
        rows.append(("slide", args.size, slide_ours, slide_cp))

    print()
    print("| image | measurement | ours | Cellpose 3.1.1.3 | ratio (Cellpose / ours) |")
    print("|---|---|---|---|---|")
    for name, side, ours, cp in rows:
        if not ours:
            continue
        cp = cp or {}
        mpix = side * side / 1e6
        measurements = [
            ("wall time, s", "seconds", "{:.0f}", True),
            ("peak RSS, GiB", "peak_rss_gib", "{:.2f}", True),
            ("cells", "cells", "{}", False),
            ("F1 against the label mosaic", "f1_vs_labels", "{:.3f}", False),
            ("cells crossing a block border (kept whole)", "cells_on_block_borders", "{}", False),
        ]
        for label, key, fmt, ratio in measurements:
            if key not in ours:
                continue
            theirs = fmt.format(cp[key]) if key in cp else "n/a"
            quotient = f"{cp[key] / ours[key]:.2f}" if ratio and key in cp else ""
            print(f"| {name} {side} x {side} | {label} | {fmt.format(ours[key])} | {theirs} | {quotient} |")
        rates = [f"{mpix / r['seconds']:.3f}" if r.get("seconds") else "n/a" for r in (ours, cp)]
        print(f"| {name} {side} x {side} | megapixels per second | {rates[0]} | {rates[1]} | |")
    print()
    print(f"Seams on the {args.crop} x {args.crop} crop (F1 at IoU 0.5, 2 px border; untiled: {seams['untiled_cells']} cells):")
    print()
    print("| comparison | blocks | F1 | untiled cells on block borders | split | border copies dropped |")
    print("|---|---|---|---|---|---|")
    for name in ("default", "small"):
        r = seams[name]
        print(
            f"| block path ({name}: {r['block_px']} px blocks) vs untiled | {r['blocks']} | {r['f1_vs_untiled']:.4f} | "
            f"{r['untiled_cells_on_block_borders']} | {r['split_cells']} | {r['border_copies_dropped']} |"
        )
    print(f"| floor: untiled vs untiled on a (37, 53) px shifted crop | 1 | {seams['floor_f1_untiled_vs_shifted_grid']:.4f} | | | |")
    for name, side, ours, _ in rows:
        if ours and ours.get("steps"):
            print()
            print(profile_table(f"{name} {side} x {side}", ours))


def profile_table(name: str, ours: dict) -> str:
    """Markdown table of where the slide's wall time went (``--profile``)."""
    total = ours["seconds"]
    lines = [f"Where the time went, {name} (ours, compiled: {ours.get('compiled')}; {total:.0f} s wall):", ""]
    lines += ["| step | seconds | share of wall time |", "|---|---|---|"]
    for step, seconds in sorted(ours["steps"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {step} | {seconds:.1f} | {100 * seconds / total:.1f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
