"""The memory allocator setting of ``mmcs infer`` (:func:`mmcs_monai.allocator.keep_freed_memory`): time, kernel time
and peak memory with and without it, on the same images, one run.

    python -m benchmarks.allocator [--limit 20] [--isa avx2] [--diameter auto]

Each arm is a fresh process (the setting belongs to a process) that loads the shipped model and the first
``--limit`` dev-val images with complete labels, segments one image to warm up, then all of them with
:class:`~mmcs_monai.segmentation.CellSegmenter` at ``--diameter`` (``auto``, the default, or ``stored``), as ``mmcs
infer`` does without its file writing: ``glibc`` arm with the C library's defaults, ``kept`` arm after
``keep_freed_memory()``. ``--isa avx2`` restricts both to AVX2 kernels (fp32), as ``benchmarks.defaults``. The arms
alternate over ``--repeats``; the fastest run of each counts. Prints a markdown table: seconds, CPU seconds in the
kernel (``ru_stime``, mostly page faults), peak resident memory, and the time ratio glibc / kept (> 1: the setting
is faster).
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


def _child(arm: str, limit: int, diameter: str) -> dict:
    import numpy as np
    import torch

    from mmcs_monai.allocator import keep_freed_memory
    from mmcs_monai.data import load_datalist
    from mmcs_monai.networks import load_model
    from mmcs_monai.segmentation import CellSegmenter
    from mmcs_monai.transforms import inference_preprocessing

    torch.set_num_threads(2)
    if arm == "kept" and not keep_freed_memory():
        raise SystemExit("keep_freed_memory: not glibc, nothing to compare")
    load = inference_preprocessing("image")
    items = load_datalist(str(DEV_MANIFEST), split="val", exclude_partial=True, limit=limit)
    images = [torch.as_tensor(np.asarray(load(dict(item))["image"]), dtype=torch.float32) for item in items]
    segmenter = CellSegmenter(load_model(REPO / "bundle" / "models" / "model.pt").eval())
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
    parser.add_argument("--child", choices=("glibc", "kept"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.limit, args.diameter)))
        return 0
    env = {**os.environ, **ISA_ENV[args.isa], "PYTHONPATH": str(REPO)}
    print(f"CPU: {cpu_description()}; isa {args.isa}; {args.limit} dev-val images, diameter {args.diameter}")
    best: dict[str, dict] = {}
    for repeat in range(args.repeats):
        for arm in ("glibc", "kept") if repeat % 2 == 0 else ("kept", "glibc"):
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
    if best["glibc"]["cells"] != best["kept"]["cells"]:
        print(f"warning: the arms found {best['glibc']['cells']} and {best['kept']['cells']} cells")
    print("\n| allocator | s | kernel CPU s | peak RSS GiB | ratio (glibc / this) |\n|---|---|---|---|---|")
    for arm, name in (("glibc", "glibc defaults"), ("kept", "keep_freed_memory()")):
        r = best[arm]
        print(f"| {name} | {r['seconds']:.1f} | {r['kernel']:.1f} | {r['rss_gib']:.2f} | {best['glibc']['seconds'] / r['seconds']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
