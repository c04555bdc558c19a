"""The process settings of ``mmcs infer``, one at a time: the memory allocator (:func:`mmcs_monai.allocator.keep_freed_memory`)
and the network's memory layout (channels-last in fp32 on a CPU since 0.4.2); time, kernel time and peak memory on
the same images, one run.

    python -m benchmarks.allocator [--limit 20] [--isa avx2] [--diameter auto] [--arms glibc,kept,contiguous]

Each arm is a fresh process (the setting belongs to a process) that loads the shipped model and the first
``--limit`` dev-val images with complete labels, segments one image to warm up, then all of them with
:class:`~mmcs_monai.segmentation.CellSegmenter` at ``--diameter`` (``auto``, the default, or ``stored``), as ``mmcs
infer`` does without its file writing: ``glibc`` arm with the C library's defaults, ``kept`` arm after
``keep_freed_memory()`` (both in the inferer's default layout), ``contiguous`` arm after ``keep_freed_memory()`` with
the network in the contiguous layout (``CellInferer(channels_last=False)``: 0.4.1's fp32 path). ``--isa avx2``
restricts every arm to AVX2 kernels (fp32), as ``benchmarks.defaults``. The arms alternate over ``--repeats``; the fastest run of each counts. Prints a markdown table: seconds, CPU seconds in the
kernel (``ru_stime``, mostly page faults), peak resident memory, and the time ratio of the first arm to each (> 1:
faster than the first).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from benchmarks.common import DEV_MANIFEST, ISA_ENV, REPO, cpu_description

ARMS = {
    "glibc": "glibc defaults",
    "kept": "keep_freed_memory()",
    "contiguous": "keep_freed_memory(), contiguous fp32 (0.4.1)",
}


def _child(arm: str, limit: int, diameter: str) -> dict:
    import numpy as np
    import torch

    from mmcs_monai.allocator import keep_freed_memory
    from mmcs_monai.data import load_datalist
    from mmcs_monai.inference import CellInferer
    from mmcs_monai.networks import load_model
    from mmcs_monai.segmentation import CellSegmenter
    from mmcs_monai.transforms import inference_preprocessing

    torch.set_num_threads(2)
    if arm in ("kept", "contiguous") and not keep_freed_memory():
        raise SystemExit("keep_freed_memory: not glibc, nothing to compare")
    load = inference_preprocessing("image")
    items = load_datalist(str(DEV_MANIFEST), split="val", exclude_partial=True, limit=limit)
    images = [torch.as_tensor(np.asarray(load(dict(item))["image"]), dtype=torch.float32) for item in items]
    inferer = CellInferer(channels_last=False) if arm == "contiguous" else CellInferer()
    segmenter = CellSegmenter(load_model(REPO / "bundle" / "models" / "model.pt").eval(), inferer)
    option = None if diameter == "stored" else diameter
    segmenter(images[0], diameter=option)
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    cells = sum(segmenter(image, diameter=option).cells for image in images)
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return {"seconds": seconds, "kernel": after.ru_stime - before.ru_stime, "rss_gib": after.ru_maxrss / 2**20, "cells": cells}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--isa", choices=sorted(ISA_ENV), default="native")
    parser.add_argument("--diameter", default="auto")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--arms", default="glibc,kept,contiguous", help="comma-separated: " + ", ".join(ARMS))
    parser.add_argument("--child", choices=ARMS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.limit, args.diameter)))
        return 0
    env = {**os.environ, **ISA_ENV[args.isa], "PYTHONPATH": str(REPO)}
    print(f"CPU: {cpu_description()}; isa {args.isa}; {args.limit} dev-val images, diameter {args.diameter}")
    arms = args.arms.split(",")
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arm(s) {unknown}; known: {', '.join(ARMS)}")
    best: dict[str, dict] = {}
    for repeat in range(args.repeats):
        for arm in arms if repeat % 2 == 0 else arms[::-1]:
            command = [
                sys.executable,
                "-m",
                "benchmarks.allocator",
                "--child",
                arm,
                "--limit",
                str(args.limit),
                "--diameter",
                args.diameter,
            ]
            out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
            if out.returncode != 0:
                raise RuntimeError(f"{arm} arm failed:\n{out.stderr[-3000:]}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            if arm not in best or result["seconds"] < best[arm]["seconds"]:
                best[arm] = result
    if len({best[arm]["cells"] for arm in arms}) > 1:
        print("warning: the arms found " + ", ".join(f"{best[arm]['cells']} ({arm})" for arm in arms) + " cells")
    print(f"\n| arm | s | kernel CPU s | peak RSS GiB | ratio ({arms[0]} / this) |\n|---|---|---|---|---|")
    for arm in arms:
        r = best[arm]
        print(
            f"| {ARMS[arm]} | {r['seconds']:.1f} | {r['kernel']:.1f} | {r['rss_gib']:.2f} | {best[arms[0]]['seconds'] / r['seconds']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
