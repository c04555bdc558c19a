"""Every default, end to end: ``mmcs infer`` against Cellpose 3.1.1.3's command line on dev val, one run.

    python -m benchmarks.defaults [--limit 20] [--isa avx2] [--model bundle/models/model.pt] [--cellpose_model M]

Both are timed as a user runs them: a fresh process per tool (Python start-up, imports and model loading
included) on a folder of the same dev-val images (``gt_complete`` yes/mostly, the first ``--limit`` in
manifest order), writing label TIFFs.

- ours: ``python -m mmcs_monai.cli infer IN OUT --model M`` with every other option at its default
  (``auto`` diameter, ``precision auto``, ``compile auto``; also writes the overlay PNGs and the summary CSV);
- Cellpose: ``python -m cellpose --dir IN --savedir OUT --pretrained_model M --diameter D --chan 0 --chan2 0
  --save_tif --no_npy``: the same weights (Cellpose's own ``cyto3`` would be a download), at the model's stored
  mean diameter ``D`` (what Cellpose uses for a custom model), grey input, its defaults otherwise.
  ``--cellpose_model`` gives Cellpose other weights (default: ``--model``'s): for a model Cellpose cannot load, such
  as a narrower CPnet, Cellpose runs the shipped model.

``--isa avx2`` restricts both processes to AVX2 kernels on an AVX-512 CPU (``ONEDNN_MAX_CPU_ISA=AVX2``,
``ATEN_CPU_CAPABILITY=avx2``): oneDNN then reports no native bf16, so ``precision auto`` is fp32, as on an
AVX2 CPU. Each tool runs once on one image first (file cache, library load), then once on the set; the
order alternates over ``--repeats`` and the fastest run counts. F1 at IoU 0.5 against the labels (2 px border,
mean over images). Prints a markdown table with the ratio Cellpose time / our time (> 1: we are faster).
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

from benchmarks.common import DEV_MANIFEST, ISA_ENV, REPO, cpu_description


def _run(args: list[str], env: dict, out: Path) -> float:
    out.mkdir(parents=True, exist_ok=True)  # Cellpose wants its --savedir to exist
    start = time.perf_counter()
    result = subprocess.run(args, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return seconds


def _commands(tool: str, images: Path, out: Path, model: str, diameter: float) -> list[str]:
    if tool == "ours":
        return [sys.executable, "-m", "mmcs_monai.cli", "infer", str(images), str(out), "--model", model]
    return [
        sys.executable, "-m", "cellpose", "--dir", str(images), "--savedir", str(out), "--pretrained_model", model,
        "--diameter", f"{diameter:.3f}", "--chan", "0", "--chan2", "0", "--save_tif", "--no_npy",
    ]  # fmt: skip


def _masks_file(tool: str, out: Path, stem: str) -> Path:
    return out / (f"{stem}_masks.tif" if tool == "ours" else f"{stem}_cp_masks.tif")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "bundle" / "models" / "model.pt"))
    parser.add_argument("--cellpose_model", default=None, help="Cellpose's weights (default: --model's)")
    parser.add_argument("--data", default=str(DEV_MANIFEST))
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--isa", choices=sorted(ISA_ENV), default="native")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)

    from mmcs_monai.data import load_datalist
    from mmcs_monai.io import read_labels
    from mmcs_monai.metrics import f1_score
    from mmcs_monai.networks import load_model, size_network_file

    items = load_datalist(args.data, split="val", exclude_partial=True, limit=args.limit)
    models = {"ours": args.model, "cellpose": args.cellpose_model or args.model}
    diameter = float(load_model(models["cellpose"]).diam_labels)
    env = {**os.environ, **ISA_ENV[args.isa], "PYTHONPATH": str(REPO)}
    work = Path(tempfile.mkdtemp(prefix="mmcs_defaults_"))
    try:
        images, warm = work / "images", work / "warm"
        images.mkdir()
        warm.mkdir()
        megapixels = 0.0
        for item in items:
            source = Path(item["image"])
            shutil.copy(source, images / f"{item['id']}{source.suffix}")
            megapixels += read_labels(item["label"]).size / 1e6
        shutil.copy(next(images.iterdir()), warm)
        print(f"CPU: {cpu_description()}; isa {args.isa} {ISA_ENV[args.isa]}")
        sizer = size_network_file(models["ours"])
        searches = f"auto searching with {sizer}" if sizer.is_file() else "auto searching with itself"
        print(
            f"{len(items)} dev-val images, {megapixels:.2f} MPix; ours {models['ours']} ({searches}), "
            f"Cellpose {models['cellpose']} (stored diameter {diameter:.1f} px)"
        )
        seconds = {"ours": float("inf"), "cellpose": float("inf")}
        for tool in seconds:
            _run(_commands(tool, warm, work / f"warm_{tool}", models[tool], diameter), env, work / f"warm_{tool}")
        for repeat in range(args.repeats):
            for tool in ("ours", "cellpose") if repeat % 2 == 0 else ("cellpose", "ours"):
                out = work / f"{tool}_{repeat}"
                seconds[tool] = min(seconds[tool], _run(_commands(tool, images, out, models[tool], diameter), env, out))
        f1 = {}
        for tool in seconds:
            out = work / f"{tool}_0"
            scores = []
            for item in items:
                predicted = read_labels(str(_masks_file(tool, out, item["id"])))
                scores.append(f1_score(read_labels(item["label"]), predicted, border=2)["f1"])
            f1[tool] = float(np.mean(scores))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| tool (every default) | s | s/MPix | ratio (Cellpose / ours) | F1 vs labels |\n|---|---|---|---|---|")
    for tool, name in (("cellpose", "Cellpose 3.1.1.3 CLI, stored diameter"), ("ours", "mmcs infer (auto diameter)")):
        print(
            f"| {name} | {seconds[tool]:.1f} | {seconds[tool] / megapixels:.2f} | {seconds['cellpose'] / seconds[tool]:.2f} | {f1[tool]:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
