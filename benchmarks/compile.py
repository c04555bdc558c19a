"""The network alone: eager vs compiled, with and without weight freezing, one process.

    python -m benchmarks.compile [--model bundle/models/model.pt] [--batch 8] [--tile 224] [--rounds 6]
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python -m benchmarks.compile     # a cold compile cache

Full CPnet on a batch of random tiles, under ``torch.no_grad()``, for bf16 autocast and fp32, each in the layout
inference runs it in (channels-last for both on a CPU since 0.4.2; fp32 was contiguous before): eager,
``CompiledNetwork(freezing=False)`` and ``CompiledNetwork(freezing=True)`` (the library default). Each compiled network has its own graph cache,
so all live in one process and are timed interleaved (round-robin), and load from other work falls on all
alike. Reports the first call (the compile), the median seconds per batch, the speed-up over eager and
the largest output difference from eager; then a second tile shape through the same compiled networks,
which must not compile again.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch

from benchmarks.common import REPO, cpu_description


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "bundle" / "models" / "model.pt"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tile", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--precisions", default="bf16,fp32")
    args = parser.parse_args()
    print(f"CPU: {cpu_description()}", flush=True)
    warnings.filterwarnings("ignore")

    from torch._dynamo.utils import counters

    from mmcs_monai.networks import load_model
    from mmcs_monai.networks.compiled import CompiledNetwork
    from mmcs_monai.precision import autocast_context, resolve_channels_last

    load_before = os.getloadavg()
    rows = []
    for precision in args.precisions.split(","):
        channels_last = resolve_channels_last(None, "cpu", precision)  # the layout CellInferer runs in
        net = load_model(args.model).eval()
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = torch.rand(args.batch, 2, args.tile, args.tile).contiguous(memory_format=fmt)
        variants = {
            "eager": net,
            "compiled, no freezing": CompiledNetwork(net, channels_last=channels_last, freezing=False),
            "compiled, freezing (default)": CompiledNetwork(net, channels_last=channels_last, freezing=True),
        }
        first, times, diff = {}, {name: [] for name in variants}, {}
        with torch.no_grad(), autocast_context("cpu", precision):
            reference = net(x).float()
            for name, run in variants.items():
                start = time.perf_counter()
                out = run(x)
                first[name] = time.perf_counter() - start
                diff[name] = float((out.float() - reference).abs().max())
            for _ in range(args.rounds):
                for name, run in variants.items():
                    start = time.perf_counter()
                    run(x)
                    times[name].append(time.perf_counter() - start)
            graphs = int(counters["stats"]["unique_graphs"])
            other = torch.rand(max(2, args.batch // 2), 2, args.tile - 64, args.tile).contiguous(memory_format=fmt)
            for run in variants.values():
                run(other)
            recompiled = int(counters["stats"]["unique_graphs"]) - graphs
        eager = sorted(times["eager"])[len(times["eager"]) // 2]
        for name in variants:
            median = sorted(times[name])[len(times[name]) // 2]
            rows.append((precision, name, first[name], median, eager / median, diff[name], recompiled))
    print(
        f"\nfull CPnet ({args.model}), batch {args.batch} x {args.tile} x {args.tile}, {args.rounds} interleaved rounds; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; inductor cache {os.environ.get('TORCHINDUCTOR_CACHE_DIR', 'default')}; "
        f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}\n"
    )
    print(
        "| precision | network | first call, s (compile) | s / batch (median) | speed-up vs eager | max abs diff vs eager | graphs compiled for a 2nd tile shape |"
    )
    print("|---|---|---|---|---|---|---|")
    for precision, name, first_call, median, speedup, difference, recompiled in rows:
        print(f"| {precision} | {name} | {first_call:.1f} | {median:.3f} | {speedup:.2f} | {difference:.3g} | {recompiled} |")


if __name__ == "__main__":
    main()
