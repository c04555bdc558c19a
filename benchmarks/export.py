"""Exported (TorchScript) vs eager model: speed, F1 and mask identity on dev val; Deploy app vs mmcs infer.

    python -m benchmarks.export [--model runs/.../model_final.pt] [--data ../shared/data/dev/manifest.csv]
        [--limit 20] [--deploy_python ~/.venvs/mmcs-deploy/bin/python]

For each of eager/TorchScript x fp32/bf16: seconds per megapixel (image in memory -> masks, the
model's stored diameter), mean F1 at IoU 0.5 against the labels (CellSeg border 2), and how many
images have masks identical (up to renumbering) to eager fp32's. With ``--deploy_python``, also the
wall time of the Deploy app (``-i/-o/-m``) and of ``mmcs infer --precision fp32`` on the same images,
process start included, and whether their masks agree. One run each; run it alone on the machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import REPO, cpu_description


def same_cells(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label images hold the same cells, whatever their ids."""
    if a.shape != b.shape or not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return pairs.shape[1] == len(np.unique(a[a > 0])) == len(np.unique(b[b > 0]))


def segment_all(network, images, precision):
    """(masks per image, seconds) for images already normalised ([2, H, W] float32)."""
    from mmcs_monai.flows import flows_to_masks
    from mmcs_monai.inference import CellInferer

    inferer = CellInferer(precision=precision)
    inferer(torch.as_tensor(images[0])[None], network)  # warm-up (TorchScript specialises on first calls)
    masks, start = [], time.perf_counter()
    for image in images:
        flows = inferer(torch.as_tensor(image)[None], network)[0].numpy()
        masks.append(flows_to_masks(flows[:2], flows[2]))
    return masks, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "bundle" / "models" / "model.pt"))
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "dev" / "manifest.csv"))
    parser.add_argument("--split", default="val")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--deploy_python", default=None)
    args = parser.parse_args()
    print(f"CPU: {cpu_description()}", flush=True)

    from mmcs_monai.data import load_datalist
    from mmcs_monai.io import read_labels
    from mmcs_monai.metrics import f1_score
    from mmcs_monai.networks import export_torchscript, load_model
    from mmcs_monai.transforms import inference_preprocessing

    items = [i for i in load_datalist(args.data, split=args.split, exclude_partial=True) if i.get("label")][: args.limit]
    load = inference_preprocessing()
    images = [np.asarray(load(i)["image"]) for i in items]
    labels = [read_labels(i["label"]) for i in items]
    megapixels = sum(img.shape[-2] * img.shape[-1] for img in images) / 1e6

    eager = load_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="bench_export_"))
    start = time.perf_counter()
    export_torchscript(eager, work / "model.ts")
    export_seconds = time.perf_counter() - start
    scripted = load_model(work / "model.ts")
    with torch.no_grad():
        difference = max(float((eager(torch.as_tensor(x)[None]) - scripted(torch.as_tensor(x)[None])).abs().max()) for x in images[:5])

    rows, reference = [], None
    for name, network in (("eager", eager), ("TorchScript", scripted)):
        for precision in ("fp32", "bf16"):
            masks, seconds = segment_all(network, images, precision)
            reference = masks if reference is None else reference
            f1 = np.mean([f1_score(gt, m, border=2)["f1"] for gt, m in zip(labels, masks)])
            identical = sum(same_cells(a, b) for a, b in zip(masks, reference))
            rows.append((name, precision, seconds / megapixels, f1, identical))

    print(
        f"\n{len(items)} {args.split} images ({megapixels:.2f} MPix), model {args.model}; export {export_seconds:.1f} s, "
        f"max |eager - TorchScript| on 5 images {difference:.1e}\n"
    )
    print("| model | precision | s/MPix | F1@0.5 | masks identical to eager fp32 |")
    print("|---|---|---|---|---|")
    for name, precision, spm, f1, identical in rows:
        print(f"| {name} | {precision} | {spm:.2f} | {f1:.4f} | {identical}/{len(items)} |")

    if args.deploy_python:
        folder = work / "images"
        folder.mkdir()
        for item in items:
            shutil.copy(item["image"], folder / Path(item["image"]).name)
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        app = [
            args.deploy_python,
            str(REPO / "mmcs_monai" / "deploy" / "app.py"),
            "-i",
            str(folder),
            "-o",
            str(work / "app"),
            "-m",
            str(work / "model.ts"),
        ]
        infer = [
            sys.executable,
            "-m",
            "mmcs_monai.cli",
            "infer",
            str(folder),
            str(work / "infer"),
            "--model",
            args.model,
            "--precision",
            "fp32",
            "--overlay",
            "False",
        ]
        times = {}
        for name, command in (("Deploy app (TorchScript, fp32)", app), ("mmcs infer (eager, fp32)", infer)):
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True, env=env)
            times[name] = time.perf_counter() - start
        agree = 0
        for path in sorted((work / "infer").glob("*_masks.tif")):
            agree += same_cells(read_labels(path), read_labels(work / "app" / path.name))
        print("\n| run (process start included) | seconds | s/MPix |")
        print("|---|---|---|")
        for name, seconds in times.items():
            print(f"| {name} | {seconds:.1f} | {seconds / megapixels:.2f} |")
        print(f"\nDeploy app masks identical to mmcs infer's on {agree}/{len(items)} images")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
