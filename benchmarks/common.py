"""The one helper the benchmarks (and the experiments) share: where the checkout and the dev data are, the bundle
training command they time (:func:`mmcs_monai.workflows.bundle_command`), the engines' own clocks, the CPU's name and
the environment that restricts a process to AVX2 kernels."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from mmcs_monai.workflows import bundle_command

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
DEV_MANIFEST = REPO.parent / "shared" / "data" / "dev" / "manifest.csv"

# environment of a child process: ``avx2`` restricts oneDNN and ATen to AVX2 kernels on an AVX-512 CPU (oneDNN then
# reports no native bf16 and ATen's capability is AVX2, so ``precision auto`` is fp32, as on an AVX2 CPU). It does not
# emulate int8: fbgemm picks its kernels by the CPU alone and would still run AVX-512 VNNI kernels (why 0.4.6's int8
# figures "on AVX2 kernels" did not hold on a real AVX2 CPU: benchmarks/README.md, "0.4.7"). Name a real AVX2 CPU's
# figures as such.
ISA_ENV = {"avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}, "native": {}}


# the vector flags that decide precision (bf16 needs avx512_bf16 or AMX, int8 avx512_vnni) and which kernels run
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_description() -> str:
    """``"<model name> (family F model M), <n> cores, flags avx2 avx512f ..."``: what every benchmark prints beside its
    timings.

    From ``/proc/cpuinfo`` (what ``lscpu`` reads): the model name, its family and model numbers (a virtual machine's
    model name is often only the vendor's line, "AMD EPYC": family 23 model 49 is Zen 2, family 25 model 17 Zen 4)
    and which of :data:`CPU_FLAGS` the CPU has (``none of ...`` when it has none; ``?`` where there is no
    ``/proc/cpuinfo``). Cores are those this process may use.
    """
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    fields = {}
    for line in info.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    model = fields.get("model name", "?")
    if "cpu family" in fields and "model" in fields:
        model += f" (family {fields['cpu family']} model {fields['model']})"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    flags = set(fields.get("flags", "").split())
    names = " ".join(f for f in CPU_FLAGS if f in flags) or "none of " + " ".join(CPU_FLAGS)
    return f"{model}, {cores} cores, flags {names}"


def training_command(
    data: str | Path,
    out: Path,
    train_images: int,
    epochs: int,
    precision: str = "fp32",
    num_workers: int = 0,
    configs: list[str] | None = None,
) -> list[str]:
    """``monai.bundle run training`` arguments (after ``python -m``) for a timed run: full CPnet, batch 8,
    128 px, ``train_images`` dev-train images, no validation (one image cached), models and logs in ``out``;
    bf16 comes with channels_last."""
    overrides = {
        "data_source": data,
        "train_limit": train_images,
        "val_limit": 1,
        "val_interval": 100000,
        "epochs": epochs,
        "batch_size": 8,
        "patch_size": 128,
        "precision": precision,
        "channels_last": precision == "bf16",
        "num_workers": num_workers,
        "ckpt_dir": out / "models",
        "output_dir": out / "eval",
    }
    return bundle_command("training", configs, BUNDLE, overrides)


def engine_seconds(log: str, engine: str = "SupervisedTrainer") -> float:
    """Longest 'Engine run finished. Time taken: HH:MM:SS' of ``engine`` in a run's log (the slowest rank)."""
    found = re.findall(rf"{engine} - INFO - Engine run finished\. Time taken: (\d+):(\d+):([\d.]+)", log)
    if not found:
        raise RuntimeError(f"no finished {engine} in the log:\n{log[-3000:]}")
    return max(int(h) * 3600 + int(m) * 60 + float(s) for h, m, s in found)


def python_module(args: list[str]) -> list[str]:
    return [sys.executable, "-m", *args]
