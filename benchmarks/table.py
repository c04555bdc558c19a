"""One table, same inputs, one run: ours vs Cellpose 3.1.1.3 on this machine's CPU.

    python -m benchmarks.table [--data ../shared/data/dev] [--model bundle/models/model.pt] [--limit N]
        [--no-training] [--no-inference] [--no-flows] [--slide] [--slide-size 10000] [--cellpose-slide-timeout 5400]

Rows:

- training step (full CPnet, batch 8, 128 px, augmentation included; ours in fp32 and in bf16 +
  channels_last, Cellpose in fp32);
- end-to-end inference on dev val (gt_complete yes/mostly; image in memory -> label mask; same weights,
  the model's stored diameter): Cellpose fp32; ours fp32 eager; ours at ``precision auto`` (bf16 +
  channels_last where the CPU has native bf16, else fp32: the row names say which) eager with the tiling
  of before (224 px tiles, not fitted); ours auto eager and ours auto compiled with the current tiling
  defaults.
  The images are interleaved (each image goes through every variant, in rotating order), so load from
  other work on the machine falls on all of them alike. The one-time compile is timed apart (warm-up)
  and also shown spread over dev val. F1 at IoU 0.5 against the labels (2 px border) for every variant;
- labels -> flows and flows -> masks s/MPix on dev-val labels;
- ``--slide``: the 100-megapixel slide of ``benchmarks.wholeslide`` (10,000 x 10,000 mosaic of dev
  fluorescence images): ours compiled (the slide default, ``compile auto``; ``--slide-eager`` adds ours eager), Cellpose
  ``CellposeModel.eval`` on the whole image; each in its own process: wall time, peak RSS, F1 against
  the label mosaic; ours compiled with a profile of its steps.

Ratio = Cellpose time / our time (> 1: we are faster).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from benchmarks import flows as bench_flows
from benchmarks import speed as bench_speed
from benchmarks import tiling as bench_tiling
from benchmarks import wholeslide as bench_wholeslide
from benchmarks.common import DEV_MANIFEST, REPO, cpu_description

EAGER = "ours {auto}, eager"
COMPILED = "ours {auto}, compiled"


def inference_rows(items, model_path: str):
    """Interleaved end-to-end inference on ``items``: s/MPix, F1 against the labels and mask agreement.

    Returns ``(times s/MPix, f1 vs labels, agreement, megapixels, compile seconds, graphs compiled)``.
    """
    from cellpose import models

    from mmcs_monai.io import read_image, read_labels
    from mmcs_monai.metrics import f1_score
    from mmcs_monai.networks import load_cellpose_checkpoint
    from mmcs_monai.precision import resolve_precision
    from mmcs_monai.segmentation import segmenter_from_options
    from mmcs_monai.transforms import NormalizePercentile, StackNucleusChannel

    net = load_cellpose_checkpoint(model_path).eval()
    diameter = float(net.diam_labels.item())
    cp = models.CellposeModel(gpu=False, pretrained_model=str(model_path), nchan=2)
    images = [read_image(it["image"]) for it in items]
    labels = [read_labels(it["label"]) for it in items]
    megapixels = sum(img.shape[-2] * img.shape[-1] for img in images) / 1e6

    def ours(**options):
        segmenter = segmenter_from_options(net, diameter=diameter, **options)

        def run(img):
            return segmenter(NormalizePercentile()(StackNucleusChannel()(img))).masks

        return run

    def cellpose(img):
        grey = img.mean(0) if img.shape[0] > 1 else img[0]
        return cp.eval(grey, channels=[0, 0], diameter=diameter, flow_threshold=0.4, cellprob_threshold=0.0)[0]

    auto = f"auto = {resolve_precision('auto', 'cpu')} here"
    variants = {
        "cellpose": cellpose,
        # where auto is fp32 (no native bf16), this row is the old-tiling row below and is left out
        **({"ours fp32 eager": ours(precision="fp32", compile=False)} if resolve_precision("auto", "cpu") != "fp32" else {}),
        f"ours {auto}, eager, 224 px tiles not fitted (old tiling)": ours(precision="auto", compile=False, roi_size=224, fit_tiles=False),
        EAGER.format(auto=auto): ours(precision="auto", compile=False),
        COMPILED.format(auto=auto): ours(precision="auto", compile=True),
    }
    eager_name, compiled_name = EAGER.format(auto=auto), COMPILED.format(auto=auto)
    # warm-up: libraries and caches (eager variants), then the compile, timed: the compiled network's one
    # graph (every batch of 2+ tiles and tile size shares it), then the compiled variant
    from torch._dynamo.utils import counters

    for name, run in variants.items():
        if name != compiled_name:
            run(images[0])
    compile_seconds = bench_tiling.precompile(net, "auto")
    variants[compiled_name](images[0])
    graphs_after_warmup = int(counters["stats"]["unique_graphs"])

    names = list(variants)
    seconds = dict.fromkeys(names, 0.0)
    masks = {name: [] for name in names}
    for i, img in enumerate(images):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            t = time.perf_counter()
            masks[name].append(variants[name](img))
            seconds[name] += time.perf_counter() - t
    times = {name: seconds[name] / megapixels for name in names}
    f1 = {name: float(np.mean([f1_score(lab, m, border=2)["f1"] for lab, m in zip(labels, masks[name])])) for name in names}
    agreement = {name: float(np.mean([f1_score(r, m)["f1"] for r, m in zip(masks[eager_name], masks[name])])) for name in names}
    graphs = int(counters["stats"]["unique_graphs"]) - graphs_after_warmup
    return times, f1, agreement, megapixels, compile_seconds, graphs, compiled_name


def slide_rows(args) -> list[tuple]:
    """The 100-megapixel slide: ours eager, ours compiled (auto), Cellpose; rows for the table."""
    import tifffile

    from mmcs_monai.metrics import f1_score

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    slide, truth_path = work / f"slide_{args.slide_size}.tif", work / f"slide_{args.slide_size}_labels.tif"
    if not slide.is_file():
        print("building the slide:", bench_wholeslide.build_mosaic(args.slide_size, slide, truth_path), flush=True)
    options = SimpleNamespace(model=args.model, precision="auto", block_size=2048, diameter="stored", profile=False)
    runs = {}
    ours_runs = (("ours eager", "False", False),) if args.slide_eager else ()
    for name, compile_, profile in ours_runs + (("ours compiled", "auto", True),):
        runs[name] = bench_wholeslide.run_child(
            "ours",
            slide,
            work / f"slide_{name.replace(' ', '_')}_masks.tif",
            SimpleNamespace(**{**vars(options), "compile": compile_, "profile": profile}),
        )
    runs["cellpose"] = bench_wholeslide.run_child(
        "cellpose",
        slide,
        work / "slide_cellpose_masks.tif",
        SimpleNamespace(**{**vars(options), "compile": "False"}),
        timeout=args.cellpose_slide_timeout,
    )
    truth = tifffile.imread(truth_path)
    for name, result in runs.items():
        if result:
            masks = tifffile.imread(work / f"slide_{name.replace(' ', '_')}_masks.tif")
            result["f1_vs_labels"] = f1_score(truth, masks, border=0)["f1"]
            del masks
    del truth
    cp = runs["cellpose"] or {}
    side = f"{args.slide_size:,} x {args.slide_size:,}"
    rows = []
    for name in ("ours eager", "ours compiled"):
        ours = runs.get(name)
        if not ours:
            continue
        label = f"slide {side} ({name}; compiled: {ours.get('compiled')})"
        rows.append((f"{label}: wall time (s)", ours["seconds"], cp.get("seconds")))
        rows.append(
            (f"{label}: peak RSS (GiB; compile workers {ours['peak_child_rss_gib']:.2f})", ours["peak_rss_gib"], cp.get("peak_rss_gib"))
        )
        rows.append((f"{label}: F1 against the label mosaic (higher is better; not a time)", ours["f1_vs_labels"], cp.get("f1_vs_labels")))
    if runs["ours compiled"] and runs["ours compiled"].get("steps"):
        print(bench_wholeslide.profile_table(side, runs["ours compiled"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEV_MANIFEST.parent))
    parser.add_argument("--model", default=str(REPO / "bundle" / "models" / "model.pt"))
    parser.add_argument("--limit", type=int, default=None, help="first N dev-val images for inference and flows")
    parser.add_argument("--no-training", action="store_true", help="leave out the training-step rows")
    parser.add_argument("--no-inference", action="store_true", help="leave out the dev-val inference rows")
    parser.add_argument("--no-flows", action="store_true", help="leave out the labels -> flows and flows -> masks rows")
    parser.add_argument("--slide", action="store_true", help="add the 100-megapixel slide rows (about an hour with Cellpose)")
    parser.add_argument("--slide-eager", action="store_true", help="with --slide: also our slide path without compiling")
    parser.add_argument("--slide-size", type=int, default=10000)
    parser.add_argument("--cellpose-slide-timeout", type=float, default=5400)
    parser.add_argument("--work", default=str(REPO / "runs" / "wholeslide"))
    args = parser.parse_args()
    print(f"CPU: {cpu_description()}", flush=True)
    warnings.filterwarnings("ignore")

    from cellpose import dynamics

    from mmcs_monai.data import load_datalist
    from mmcs_monai.flows import flows_to_masks, labels_to_flows

    load_before = os.getloadavg()
    torch.manual_seed(0)
    root = Path(args.data)
    train = load_datalist(root / "manifest.csv", split="train")
    val = load_datalist(root / "manifest.csv", split="val", exclude_partial=True, limit=args.limit)
    nbase = (2, 32, 64, 128, 256)
    rows = []
    if not args.no_training:
        step_fp32, step_cp = bench_speed.training_step_times(train, nbase, precision="fp32")
        step_bf16, _ = bench_speed.training_step_times(train, nbase, precision="bf16")
        rows.append(("training step, fp32 (s)", step_fp32, step_cp))
        rows.append(("training step, ours bf16 + channels_last (s)", step_bf16, step_cp))

    times, f1, agreement, graphs = {}, {}, {}, "n/a"
    if not args.no_inference:
        times, f1, agreement, mpix, compile_seconds, graphs, compiled_name = inference_rows(val, args.model)
        for name in [n for n in times if n != "cellpose"]:
            rows.append((f"inference end to end, {name} (s/MPix, {mpix:.2f} MPix)", times[name], times["cellpose"]))
        with_compile = times[compiled_name] + compile_seconds / mpix
        rows.append(
            (
                f"inference end to end, {compiled_name[5:]}, one-time compile ({compile_seconds:.0f} s) spread over dev val (s/MPix)",
                with_compile,
                times["cellpose"],
            )
        )

    if not args.no_flows:
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
    if args.slide:
        rows += slide_rows(args)

    load_after = os.getloadavg()
    print(
        f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads; model {args.model}; "
        f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}; "
        f"graphs compiled during the timed inference (0: no recompiles): {graphs}\n"
    )
    if times:
        print("| variant (dev val, stored diameter) | F1 vs labels | masks F1 vs ours eager (auto precision) |\n|---|---|---|")
        for name in times:
            print(f"| {name} | {f1[name]:.4f} | {agreement[name]:.4f} |")
        print()
    print("| measurement | ours | Cellpose 3.1.1.3 | ratio (Cellpose / ours) |\n|---|---|---|---|")
    for name, ours, theirs in rows:
        ratio = f"{theirs / ours:.2f}" if theirs and "F1" not in name else ""
        theirs_text = f"{theirs:.3f}" if theirs is not None else "n/a"
        print(f"| {name} | {ours:.3f} | {theirs_text} | {ratio} |")


if __name__ == "__main__":
    main()
