"""OME-Zarr in, GeoJSON and NGFF labels out, against the TIFF path, on the same slide in the same run.

    python -m benchmarks.ome_zarr [--size 10000] [--model bundle/models/model.pt] [--diameter stored]
        [--block_size 2048] [--work runs/ome_zarr]

1. Builds one ``size`` x ``size`` grey slide from the bundle's sample images (tiled row by row, uint8) twice: a tiled
   zlib TIFF (512 px tiles) and an OME-Zarr (NGFF 0.5 written by ome-zarr, 512 px chunks, two levels, 0.5 µm per
   pixel).
2. Runs ``mmcs infer-slide`` in a child process on each: the TIFF with ``--formats tif`` (what infer-slide wrote
   before OME-Zarr), the OME-Zarr with ``--formats geojson,zarr`` (GeoJSON streamed from the label canvas, NGFF
   labels written back into the input). Same model, diameter, block size and precision.
   A third run, OME-Zarr in and the label TIFF out, separates reading from writing (and shows the noise of a
   shared machine: it repeats the first run's work on the other reader).
3. Prints the CPU, then a table: wall time and peak RSS (the child's ``ru_maxrss``) of each, their ratios
   (OME-Zarr / TIFF), the cells found by each, and whether the two label images are the same.

Results go to benchmarks/README.md ("OME-Zarr and GeoJSON/NGFF outputs").
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, cpu_description


def build_slide(size: int, work: Path) -> tuple[Path, Path]:
    """The same grey uint8 slide as a tiled TIFF and as an OME-Zarr."""
    import tifffile
    import zarr
    from ome_zarr.writer import write_image

    from mmcs_monai.io import read_image
    from mmcs_monai.transforms.array import percentile_bounds, scale_to_bounds

    tiff, ome = work / f"slide_{size}.tif", work / f"slide_{size}.ome.zarr"
    if tiff.is_file() and (ome / "zarr.json").is_file():
        return tiff, ome
    tiles = []
    for path in sorted((REPO / "bundle" / "sample_data" / "images").glob("*.tif")):
        image = read_image(path).mean(0, keepdims=True)
        tiles.append((np.clip(scale_to_bounds(image, *percentile_bounds(image)), 0, 1)[0] * 255).astype(np.uint8))
    slide = np.zeros((size, size), np.uint8)
    y = x = row = used = 0
    while y < size:
        tile = tiles[used % len(tiles)]
        h, w = tile.shape
        if x + w > size:
            y, x, row = y + row, 0, 0
            continue
        part = tile[: size - y]
        slide[y : y + part.shape[0], x : x + w] = part
        x, row, used = x + w, max(row, h), used + 1
    work.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(tiff, slide, tile=(512, 512), compression="zlib", bigtiff=True)
    root = zarr.open_group(str(ome), mode="w")
    write_image(
        slide[None],
        root,
        axes="cyx",
        axes_units={"y": "micrometer", "x": "micrometer"},
        scale={"c": 1.0, "y": 0.5, "x": 0.5},
        scale_factors=(2,),
        storage_options={"chunks": (1, 512, 512)},
    )
    return tiff, ome


def run_slide(image: Path, output: Path, args, formats: str) -> dict:
    """``mmcs infer-slide`` in a child process: its wall time, peak RSS (MiB) and summary line."""
    command = [sys.executable, "-m", "mmcs_monai.cli", "infer-slide", str(image), str(output), "--formats", formats]
    command += ["--diameter", str(args.diameter), "--block_size", str(args.block_size), "--table", "False"]
    if args.model:
        command += ["--model", args.model]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    out, err = process.stdout.read(), process.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{err[-3000:]}")
    return {"seconds": seconds, "peak_mib": usage.ru_maxrss / 1024, "summary": out.strip().splitlines()[-1] if out.strip() else err[-500:]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=10_000)
    parser.add_argument("--model", default=None, help="default: the shipped model")
    parser.add_argument("--diameter", default="stored", help="fixed, so both runs segment at the same size")
    parser.add_argument("--block_size", type=int, default=2048)
    parser.add_argument("--work", default=str(REPO / "runs" / "ome_zarr"))
    args = parser.parse_args(argv)
    work = Path(args.work)
    print(f"CPU: {cpu_description()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    tiff, ome = build_slide(args.size, work)
    import shutil

    shutil.rmtree(ome / "labels", ignore_errors=True)
    tiff_run = run_slide(tiff, work / "tiff_out", args, "tif")
    ome_run = run_slide(ome, work / "ome_out", args, "geojson,zarr")
    ome_tif_run = run_slide(ome, work / "ome_tif_out", args, "tif")  # reading alone: OME-Zarr in, label TIFF out
    import tifffile
    import zarr

    tiff_labels = tifffile.imread(work / "tiff_out" / f"slide_{args.size}_masks.tif")
    ngff = np.asarray(zarr.open_group(str(ome), mode="r")["labels/mmcs/0"])
    same = bool(np.array_equal(tiff_labels, ngff))
    geojson = work / "ome_out" / f"slide_{args.size}_cells.geojson"
    print(f"\nslide {args.size} x {args.size} px, diameter {args.diameter}, block_size {args.block_size}\n")
    print("| input -> outputs | wall s | peak RSS MiB | cells |")
    print("|---|---:|---:|---:|")
    print(f"| tiled TIFF -> label TIFF | {tiff_run['seconds']:.1f} | {tiff_run['peak_mib']:.0f} | {int(tiff_labels.max())} |")
    print(f"| OME-Zarr -> GeoJSON + NGFF labels | {ome_run['seconds']:.1f} | {ome_run['peak_mib']:.0f} | {int(ngff.max())} |")
    print(f"| OME-Zarr -> label TIFF (run last) | {ome_tif_run['seconds']:.1f} | {ome_tif_run['peak_mib']:.0f} | |")
    time_ratio, memory_ratio = ome_run["seconds"] / tiff_run["seconds"], ome_run["peak_mib"] / tiff_run["peak_mib"]
    print(f"| ratio OME-Zarr + GeoJSON + NGFF / TIFF | {time_ratio:.2f} | {memory_ratio:.2f} | |")
    print(f"\nsame label image: {same}; GeoJSON {geojson.stat().st_size / 1e6:.1f} MB")
    for name, run in (("TIFF", tiff_run), ("OME-Zarr", ome_run), ("OME-Zarr, TIFF out", ome_tif_run)):
        print(f"{name} run: {run['summary']}")


if __name__ == "__main__":
    main()
