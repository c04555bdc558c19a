"""Flows -> masks: the library (``mmcs_monai.flows.flows_to_masks``) vs the exported pipeline file's mask step.

    python -m benchmarks.masks [--data ../shared/data/dev] [--split val] [--limit N] [--repeats R]

Both run :mod:`mmcs_monai.masks` (follow the flows, masks from the convergence, flow QC, small masks out, holes
filled); they differ in the flow QC's reference flows: the library diffuses the predicted masks on a packed
canvas, the file on the image grid (same numbers, bit for bit, but more work). Inputs: the shipped model's
flows (fp32, stored diameter) of each image, computed once. Timed: the library on numpy input as
``mmcs infer`` ran it before (host), the library on tensors, and the pipeline file (``torch.jit.load``,
``model.masks(flows)``), each on the CPU and, where one is available, on the GPU (flows already there). One
warm-up pass, then the best of ``--repeats`` passes over all images, as seconds per megapixel; ratio = the
library's time / this row's (> 1: faster than the library). Masks are compared with the library's (identical
images, F1 at IoU 0.5). Prints the CPU (lscpu model name and flags) and a markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import BUNDLE, DEV_MANIFEST, cpu_description
from mmcs_monai.data import load_datalist
from mmcs_monai.export import export_pipeline
from mmcs_monai.flows import flows_to_masks
from mmcs_monai.inference import CellInferer
from mmcs_monai.io import read_image
from mmcs_monai.metrics import f1_score
from mmcs_monai.networks import load_model
from mmcs_monai.segmentation import CellSegmenter
from mmcs_monai.transforms.array import NormalizePercentile, StackNucleusChannel


def network_flows(items: list[dict], network) -> list[torch.Tensor]:
    segmenter = CellSegmenter(network, CellInferer(precision="fp32", compile=False))
    out = []
    for item in items:
        nucleus = item.get("nucleus_channel")
        nucleus = None if nucleus in (None, "") else int(nucleus)
        x = NormalizePercentile()(StackNucleusChannel(nucleus_channel=nucleus)(read_image(item["image"])))
        out.append(segmenter(x).flows)
    return out


def timed(run, flows: list[torch.Tensor], repeats: int, device: torch.device) -> tuple[float, list[np.ndarray]]:
    def one_pass():
        result = [run(f) for f in flows]
        if device.type == "cuda":
            torch.cuda.synchronize()
        return result

    one_pass()  # warm-up (TorchScript's profiling runs, CUDA kernels)
    best, masks = float("inf"), []
    for _ in range(repeats):
        start = time.perf_counter()
        masks = one_pass()
        best = min(best, time.perf_counter() - start)
    return best, [np.asarray(m.cpu() if torch.is_tensor(m) else m) for m in masks]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEV_MANIFEST.parent), help="dev data folder (manifest.csv); missing: the bundle's samples")
    parser.add_argument("--split", default="val")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    manifest = Path(args.data) / "manifest.csv"
    if manifest.is_file():
        items, source = load_datalist(manifest, split=args.split, limit=args.limit), f"{manifest} ({args.split})"
    else:
        items = load_datalist(BUNDLE / "sample_data" / "datalist.json", limit=args.limit)
        source = "bundle sample data"
    network = load_model(BUNDLE / "models" / "model.pt")
    flows = network_flows(items, network)
    megapixels = sum(f.shape[-1] * f.shape[-2] for f in flows) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = torch.jit.load(str(export_pipeline(network, Path(tmp) / "pipeline.pt")))

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    reference_masks = None
    for device in devices:
        on_device = [f.to(device) for f in flows]
        model = pipeline.to(device)
        runs = [("library, tensors (mmcs_monai.flows)", lambda f: flows_to_masks(f[:2], f[2]), on_device)]
        if device.type == "cpu":
            runs.insert(0, ("library, numpy (as before)", lambda f: flows_to_masks(f[:2], f[2]), [f.numpy() for f in flows]))
        runs.append(("pipeline file (model.masks)", model.masks, on_device))
        reference = None
        for name, run, inputs in runs:
            seconds, masks = timed(run, inputs, args.repeats, device)
            if reference_masks is None:
                reference_masks = masks
            if reference is None:
                reference = seconds
            same = sum(np.array_equal(a, b) for a, b in zip(masks, reference_masks))
            f1 = np.mean([f1_score(a, b)["f1"] for a, b in zip(reference_masks, masks)])
            rows.append((device.type, name, seconds / megapixels, reference / seconds, f"{same}/{len(masks)}", f1))

    print(f"CPU: {cpu_description()}; torch threads {torch.get_num_threads()}")
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}")
    print(f"{len(items)} images, {megapixels:.2f} MPix, {source}\n")
    print("| device | flows -> masks | s/MPix | ratio (library / this) | identical masks | F1 vs library |")
    print("|---|---|---|---|---|---|")
    for device, name, per_mp, ratio, same, f1 in rows:
        print(f"| {device} | {name} | {per_mp:.3f} | {ratio:.2f} | {same} | {f1:.4f} |")


if __name__ == "__main__":
    main()
