"""Precision and compile policy: which number format the network runs in, and whether it runs compiled.

:func:`resolve_precision` turns ``auto`` into ``bf16``, ``int8`` or ``fp32`` by the device, :func:`autocast_context`
gives the autocast for a precision, :class:`PrecisionInferer` runs the trainer's network under it, and
:func:`resolve_compile` decides ``compile="auto"`` by the job's size (:data:`AUTO_COMPILE_MEGAPIXELS`).
:class:`~mmcs_monai.inference.CellInferer` and the bundle's configs use them.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from monai.inferers import Inferer

from mmcs_monai.networks.compiled import compile_unavailable
from mmcs_monai.networks.quantized import int8_unavailable
from mmcs_monai.options import parse_bool

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
# int8 is an inference precision (a network quantized after training): training takes the others
TRAINING_PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# ``compile="auto"`` compiles CPU inference of at least this many image megapixels (a folder's images, a
# slide), by the precision the network runs in: below it the one-time compile (50-130 s on 2 cores) costs
# more than it saves. fp32 (AVX2 CPU): it saved 5.7 s/MPix over the contiguous eager network, paying from ~14 MPix;
# over the channels-last eager network of 0.4.2 it is 1.33x on the network (37 s compile; benchmarks.compile, AVX2
# kernels): 1.4 s/MPix at the stored diameter, about 4 at auto's zooms, so it pays from 8-26 MPix; bf16 (AVX-512 BF16
# CPU, where the network already runs near the CPU's bf16 peak): it saves 0.5-0.9 s/MPix and pays from
# 65-110 MPix (benchmarks/README.md, "Compiled inference")
AUTO_COMPILE_MEGAPIXELS = {"fp32": 20.0, "bf16": 100.0}


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 natively (AVX512-BF16/AMX on CPU, Ampere+ on GPU).

    Elsewhere bf16 autocast is emulated and slower than fp32, so ``auto`` precision keeps fp32.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def fast_int8(device: torch.device | str) -> bool:
    """Whether ``device`` runs CPnet faster in int8 than in fp32: a CPU with AVX-512 VNNI (``fbgemm``'s
    ``vpdpbusd`` kernels) whose ATen kernels are AVX-512 (``ATEN_CPU_CAPABILITY`` lowers them, as an AVX2 laptop has).

    On an AVX2 CPU fbgemm's int8 kernels (``vpmaddubsw``) are no faster than fp32 and the quantized additions cost
    more: on a 2-core AMD EPYC (Zen 2, AVX2 only) the network took 1.80 s in int8 against 1.85 s in fp32 (batch of 8 x
    224 px) and ``mmcs infer`` with every default 51.8 s against about 47 s (``benchmarks/README.md``, "0.4.7").
    fbgemm picks its kernels by the CPU alone (it ignores ``ATEN_CPU_CAPABILITY``), so on an AVX-512 CPU whose kernels
    are limited to AVX2 int8 would still run VNNI kernels: that is why the ATen capability counts too.
    """
    if torch.device(device).type != "cpu":
        return False
    try:
        vnni = bool(torch.cpu._is_vnni_supported())
    except (AttributeError, RuntimeError):
        return False
    return vnni and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def resolve_precision(precision: str, device: torch.device | str, network: torch.nn.Module | None = None) -> str:
    """``auto`` -> ``bf16`` where the device has native bf16; else ``int8`` on a CPU with fast int8 kernels
    (:func:`fast_int8`: AVX-512 VNNI) for a ``network`` that can run it (an attached int8 calibration:
    :func:`~mmcs_monai.networks.quantized.int8_unavailable`); else ``fp32``. Other names unchanged.

    bf16 + channels_last inference on dev val: F1 0.7139 vs 0.7145 in fp32, 2.2x faster on a
    2-core AVX512-BF16 CPU; int8 with VNNI kernels: F1 0.843 against fp32's 0.847 on 69 val images with ``auto``, the
    network 2.6x faster than fp32 on AVX2 kernels (``benchmarks/README.md``, "0.4.6"); on an AVX2-only CPU int8 is no
    faster, so ``auto`` keeps fp32 there ("0.4.7"). Without a ``network`` (training, the compile decision of a caller
    that has none) ``auto`` never means ``int8``.

    Raises:
        ValueError: an unknown name; ``int8`` on a GPU.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "int8" and torch.device(device).type != "cpu":
        raise ValueError("int8 runs on a CPU; use fp16 or bf16 on a GPU")
    if precision == "auto":
        if native_bf16(device):
            return "bf16"
        if network is not None and fast_int8(device) and int8_unavailable(network, device) is None:
            return "int8"
        return "fp32"
    return precision


def autocast_context(device: torch.device | str, precision: str = "fp32"):
    """Autocast for ``precision`` on ``device`` (``fp32``, ``int8``: no autocast). fp16 is refused on CPU.

    Flows -> masks never run under it: callers cast the network output to float32 first.
    """
    precision = resolve_precision(precision, device)
    device_type = torch.device(device).type
    if precision in ("fp32", "int8"):
        return contextlib.nullcontext()
    if precision == "fp16" and device_type != "cuda":
        raise ValueError("fp16 autocast needs a GPU; use bf16 on CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device_type, dtype=dtype)


def resolve_channels_last(channels_last: bool | None, device: torch.device | str, precision: str, training: bool = False) -> bool:
    """Whether the network runs in channels-last memory layout: ``channels_last`` when it is given; None: on in bf16
    (oneDNN's and cuDNN's bf16 kernels want it), and for inference on a CPU in fp32 too.

    fp32 on a CPU: oneDNN's NHWC convolutions skip a layout reorder per layer: ``mmcs infer`` with every default on
    20 dev-val images, AVX2 kernels, 1.12x faster at the same masks (benchmarks/README.md, "Memory layout").
    Training keeps the contiguous layout in fp32 (``training=True``; its backward pass was not measured), and so
    does fp32 on a GPU (not measured).
    """
    if channels_last is not None:
        return bool(channels_last)
    precision = resolve_precision(precision, device)
    return precision == "bf16" or (not training and torch.device(device).type == "cpu" and precision == "fp32")


def to_channels_last(network: torch.nn.Module) -> torch.nn.Module:
    """``network`` with its weights in channels-last memory layout, converted in place the first time only: the layout
    is read off its first convolution kernel wider than 1 x 1 (a 1 x 1 kernel is both layouts at once), so a network
    already converted costs no pass over its parameters (3.5 ms per call of the size search's network on 2 cores)."""
    kernel = next((p for p in network.parameters() if p.dim() == 4 and p.shape[-1] * p.shape[-2] > 1), None)
    if kernel is None or not kernel.is_contiguous(memory_format=torch.channels_last) or kernel.is_contiguous():
        network.to(memory_format=torch.channels_last)
    return network


def parse_compile(value: Any) -> bool | str:
    """``compile`` as commands and configs give it -> True, False or ``"auto"``.

    Accepts None and ``auto`` (any case) for ``"auto"``, and whatever :func:`~mmcs_monai.options.parse_bool` reads
    (a command line's lowercase ``false`` arrives as a string).
    """
    if value is None or str(value).strip().lower() == "auto":
        return "auto"
    try:
        return parse_bool(value, "compile")
    except ValueError:
        raise ValueError(f"compile must be True, False or 'auto', got {value!r}") from None


def workload_megapixels(images: Any) -> float:
    """Image megapixels of a data list (items with an ``image`` path, or paths), read from file headers
    where the format allows (TIFF, npy); unreadable files count as nothing (they are screened elsewhere)."""
    from mmcs_monai.io import InputError, open_regions

    total = 0.0
    for item in images or ():
        path = item.get("image") if isinstance(item, dict) else item
        try:
            with open_regions(path) as regions:
                total += regions.shape[0] * regions.shape[1] / 1e6
        except (InputError, OSError, ValueError, TypeError):
            continue
    return total


def resolve_compile(
    compile: Any = "auto",
    device: torch.device | str = "cpu",
    images: Any = None,
    megapixels: float | None = None,
    precision: str = "auto",
) -> bool:
    """Whether to compile the network for a job: ``compile`` True/False as given; ``"auto"``: on a CPU, when
    the job has at least :data:`AUTO_COMPILE_MEGAPIXELS` image megapixels for the precision the network runs
    in (``precision``, resolved for ``device``; ``megapixels``, else counted from ``images``, a data list)
    and compiling is available; on a GPU ``auto`` stays off (not measured there).
    """
    choice = parse_compile(compile)
    if choice != "auto":
        return choice
    if torch.device(device).type != "cpu":
        return False
    threshold = AUTO_COMPILE_MEGAPIXELS.get(resolve_precision(precision, device))
    if threshold is None:
        return False
    if megapixels is None:
        megapixels = workload_megapixels(images)
    # asked last: probing torch.compile imports its compiler (about 0.7 s), which a small job should not pay
    return megapixels >= threshold and compile_unavailable(None, device) is None


class PrecisionInferer(Inferer):
    """Call the network on a batch under the chosen precision and memory layout; outputs float32.

    Used by the trainer (patches already at network scale), so the loss is always computed in float32.
    bf16 needs no loss scaler (same exponent range as fp32); for fp16 (GPU) the bundle turns on MONAI's
    ``amp=True``, whose gradient scaler scales the loss.

    Args:
        precision: ``auto`` (bf16 where the device has native bf16, else fp32), ``fp32``, ``bf16``, ``fp16``.
        channels_last: channels-last memory layout; None: on when the resolved precision is bf16
            (:func:`resolve_channels_last` with ``training=True``).
    """

    def __init__(self, precision: str = "fp32", channels_last: bool | None = False):
        super().__init__()
        if precision not in TRAINING_PRECISIONS:
            raise ValueError(f"training precision must be one of {TRAINING_PRECISIONS}, got {precision!r}")
        self.precision = precision
        self.channels_last = channels_last

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        precision = resolve_precision(self.precision, inputs.device)
        if resolve_channels_last(self.channels_last, inputs.device, precision, training=True):
            to_channels_last(network)
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with autocast_context(inputs.device, precision):
            out = network(inputs, *args, **kwargs)
        return out.float()
