"""int8 inference on a CPU: CPnet quantized after training, from a calibration stored beside the model file.

PyTorch's ``fbgemm`` engine runs CPnet's int8 convolutions with AVX-512 VNNI kernels (``vpdpbusd``) where the CPU has
them: 2.6x faster than fp32 on AVX2 kernels per tile batch of 8 x 224 px (an AVX-512 CPU). On an AVX2-only CPU its
kernels (``vpmaddubsw``) are no faster than fp32 (Zen 2: 1.80 against 1.85 s), so ``precision auto`` takes int8 only
with VNNI and no native bf16 (:func:`~mmcs_monai.precision.fast_int8`). Quantizing needs
the range of every activation, measured once on training images (:func:`calibrate`) and stored as a small JSON
file beside the model (:func:`calibration_file`: ``<stem>.int8.json``), which
:func:`~mmcs_monai.networks.load_model` attaches (:func:`attach_calibration`). At inference
:func:`quantized_forward` builds the int8 network once per process and network (about 1 s; weights per channel,
symmetric int8; activations per tensor, unsigned 7-bit, as PyTorch's default for fbgemm) and
:class:`~mmcs_monai.inference.CellInferer` runs it where the precision is ``int8``: ``--precision int8``, or ``auto``
as above for a model with a calibration (:func:`~mmcs_monai.precision.resolve_precision`).

A calibration holds a digest of the weights it was measured with (:func:`weights_digest`): once the weights change
(training, fine-tuning, another file under the same name) it no longer applies, and ``auto`` falls back to fp32
(logged once). What it costs in F1 and what it gains in time: ``benchmarks/README.md`` ("0.4.6").

PyTorch marks its quantized tensors deprecated (to be replaced by ``torchao``); they run in the pinned torch 2.13.
Where the quantized operators are missing or fail, :func:`quantized_forward` returns None and the network runs in
fp32 (one log line).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mmcs_monai.networks.compiled import _weights_key
from mmcs_monai.networks.padding import pad_to_multiple
from mmcs_monai.reporting import OnceLog

__all__ = [
    "CALIBRATION_FORMAT",
    "attach_calibration",
    "calibrate",
    "calibration_file",
    "calibration_of",
    "int8_unavailable",
    "quantize",
    "quantized_forward",
    "read_calibration",
    "weights_digest",
    "write_calibration",
]

logger = logging.getLogger(__name__)

CALIBRATION_FORMAT = "mmcs-int8-calibration/1"
# the quantized engine: fbgemm's x86 kernels (AVX2 and later; VNNI where the CPU has it); 1.29x faster than PyTorch's
# "x86" engine, which picks oneDNN for most of CPnet's convolutions (batch of 8 x 224 px, 2-core AVX-512 CPU)
ENGINE = "fbgemm"
# where the calibration rides on a network (a plain attribute: not in state dicts, parameters or ``.to()``)
_CALIBRATION = "_mmcs_int8_calibration"
# where the quantized form is cached on a network (dropped by copies, like the compiled forms)
_QUANTIZED = "_mmcs_int8"

# why int8 is off, logged once per process and reason
_note = OnceLog(logger, "int8: %s; running the network in fp32")


def calibration_file(path: str | os.PathLike) -> Path:
    """The calibration of model file ``path``: ``<stem>.int8.json`` in its folder (``model.pt`` -> ``model.int8.json``)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.int8.json")


class _Core(nn.Module):
    """CPnet's layers without its input check and padding (inputs H, W multiples of 16), so ``torch.fx`` can trace it:
    ``[B, 2, H, W] -> [B, 3, H, W]``."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.network.downsample(x)
        style = self.network.make_style(features[-1])
        return self.network.output(self.network.upsample(style, features))


def _prepare(network: nn.Module, observer: Any) -> torch.fx.GraphModule:
    """``network``'s layers traced with an activation observer of class ``observer`` after every quantized op (a copy:
    ``network`` is untouched). The same network always gets the same observers, in the same order."""
    from torch.ao.quantization import QConfig, get_default_qconfig_mapping, quantize_fx

    mapping = get_default_qconfig_mapping(ENGINE)
    default = mapping.global_qconfig
    mapping = mapping.set_global(QConfig(activation=observer, weight=default.weight))
    example = (torch.zeros(1, network.nchan, 16, 16),)
    core = _Core(copy.deepcopy(network).float().eval())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reduce_range's and quantized tensors' deprecation notices
        return quantize_fx.prepare_fx(core, mapping, example)


def _observers(prepared: nn.Module) -> dict[str, nn.Module]:
    """The activation observers of ``prepared``, each once, in graph order, by their first name (ops that keep their
    input's range, such as max pooling, share their input's observer under a second name)."""
    return {name: module for name, module in prepared.named_children() if name.startswith("activation_post_process")}


def _names_of(prepared: nn.Module, observer: nn.Module) -> list[str]:
    """Every name under which ``prepared`` holds ``observer``."""
    return [name for name, module in prepared._modules.items() if module is observer]


def weights_digest(network: nn.Module) -> str:
    """sha256 of ``network``'s state (every parameter and buffer, in float32, in state-dict order): a calibration
    applies only to the weights it was measured with."""
    digest = hashlib.sha256()
    for name, tensor in network.state_dict().items():
        if torch.is_tensor(tensor) and tensor.is_floating_point():
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def calibrate(network: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, Any]:
    """Measure the range of every activation of ``network`` on ``batches`` (``[B, 2, h, w]`` float32 tiles at network
    scale: what the network sees at inference; zero-padded as CPnet pads) -> the calibration, a JSON-able dict.

    Each activation gets PyTorch's default for fbgemm: a histogram observer whose range minimises the quantization
    error (unsigned 7 bits). The dict holds one scale and zero point per activation, in graph order, and
    :func:`weights_digest` of ``network``.

    Raises:
        ValueError: no batch, or a batch that is not ``[B, nchan, h, w]``.
    """
    from torch.ao.quantization.observer import HistogramObserver

    prepared = _prepare(network, HistogramObserver.with_args(reduce_range=True))
    seen = 0
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for batch in batches:
            batch = torch.as_tensor(batch, dtype=torch.float32)
            if batch.ndim != 4 or batch.shape[1] != network.nchan:
                raise ValueError(f"calibration batches must be [B, {network.nchan}, h, w], got {tuple(batch.shape)}")
            prepared(pad_to_multiple(batch, getattr(network, "pad_divisor", 16))[0].contiguous())
            seen += batch.shape[0]
    if not seen:
        raise ValueError("calibrating needs at least one batch of tiles")
    activations = []
    for name, observer in _observers(prepared).items():
        scale, zero_point = observer.calculate_qparams()
        activations.append(
            {
                "name": name,
                "scale": float(scale),
                "zero_point": int(zero_point),
                "quant_min": int(observer.quant_min),
                "quant_max": int(observer.quant_max),
            }
        )
    return {
        "format": CALIBRATION_FORMAT,
        "engine": ENGINE,
        "tiles": seen,
        "weights_sha256": weights_digest(network),
        "activations": activations,
    }


def write_calibration(path: str | os.PathLike, calibration: Mapping[str, Any]) -> Path:
    """Write ``calibration`` to ``path`` as JSON (temporary file, then rename)."""
    from mmcs_monai.io import atomic_path

    text = json.dumps(calibration, indent=4) + "\n"  # model-zoo's JSON layout (pretty-format-json --indent=4)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def read_calibration(path: str | os.PathLike) -> dict[str, Any]:
    """The calibration in ``path``.

    Raises:
        InputError: naming the file: unreadable, not JSON, or not a calibration of this format.
    """
    from mmcs_monai.io import InputError

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(path, f"cannot read the int8 calibration ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT:
        raise InputError(path, f"not an int8 calibration of format {CALIBRATION_FORMAT!r}")
    activations = data.get("activations")
    if not isinstance(activations, list) or not all(
        isinstance(a, dict) and {"scale", "zero_point", "quant_min", "quant_max"} <= set(a) for a in activations
    ):
        raise InputError(path, "an int8 calibration needs 'activations': a list of scale, zero_point, quant_min, quant_max")
    return data


def attach_calibration(network: nn.Module, calibration: Mapping[str, Any] | None) -> None:
    """Give ``network`` its int8 calibration (None: remove it). Kept outside the module tree, like a size network."""
    object.__setattr__(network, _CALIBRATION, None if calibration is None else dict(calibration))
    network.__dict__.pop(_QUANTIZED, None)


def calibration_of(network: nn.Module) -> dict[str, Any] | None:
    """The calibration attached to ``network``, or None."""
    return network.__dict__.get(_CALIBRATION)


def int8_unavailable(network: nn.Module | None, device: torch.device | str = "cpu") -> str | None:
    """Why ``network`` cannot run in int8 on ``device``, or None when it can: int8 needs a CPU, a CPnet (not a
    TorchScript model), an attached calibration, and PyTorch's ``fbgemm`` quantized engine."""
    if torch.device(device).type != "cpu":
        return f"int8 runs on a CPU, not on {torch.device(device).type}"
    if network is None or isinstance(network, torch.jit.ScriptModule) or not hasattr(network, "downsample"):
        return "int8 needs a CPnet (a TorchScript model runs as exported)"
    if calibration_of(network) is None:
        return "the model has no int8 calibration (mmcs calibrate MODEL IMAGES writes one)"
    if ENGINE not in torch.backends.quantized.supported_engines:
        return f"this PyTorch has no {ENGINE!r} quantized engine"
    return None


def quantize(network: nn.Module, calibration: Mapping[str, Any]) -> nn.Module:
    """``network``'s layers in int8 with the activation ranges of ``calibration`` (a copy; ``[B, 2, H, W]`` float32 ->
    ``[B, 3, H, W]`` float32, H, W multiples of 16).

    Raises:
        ValueError: ``calibration`` was measured on other weights, or on a network of another shape.
    """
    from torch.ao.quantization import quantize_fx
    from torch.ao.quantization.observer import FixedQParamsObserver, PlaceholderObserver

    if calibration.get("weights_sha256") != weights_digest(network):
        raise ValueError("the int8 calibration was measured on other weights (calibrate the model again)")
    prepared = _prepare(network, PlaceholderObserver.with_args(dtype=torch.quint8))
    observers = _observers(prepared)
    activations = calibration["activations"]
    if len(activations) != len(observers):
        raise ValueError(f"the int8 calibration has {len(activations)} activations, the network {len(observers)}")
    for observer, values in zip(observers.values(), activations):
        fixed = FixedQParamsObserver(
            scale=values["scale"], zero_point=values["zero_point"], quant_min=values["quant_min"], quant_max=values["quant_max"]
        )
        for name in _names_of(prepared, observer):
            setattr(prepared, name, fixed)
    torch.backends.quantized.engine = ENGINE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_fx.convert_fx(prepared).eval()


class QuantizedNetwork:
    """``network`` in int8 (:func:`quantize`), called like it: ``[B, 2, H, W]`` float32 (any H, W: zero-padded to a
    multiple of 16, as CPnet pads) -> ``[B, 3, H, W]`` float32. Quantized again when the network's weights change."""

    def __init__(self, network: nn.Module):
        self.network = network
        self._module = None
        self._weights = None

    def __deepcopy__(self, memo):
        return None  # a copied network quantizes anew, from its own weights (its calibration is copied with it)

    def _quantized(self) -> nn.Module:
        weights = _weights_key(self.network)
        if self._module is None or weights != self._weights:
            self._module = quantize(self.network, calibration_of(self.network))
            self._weights = weights
        return self._module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        padded, top, left = pad_to_multiple(x.float(), getattr(self.network, "pad_divisor", 16))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self._quantized()(padded)
        return out[:, :, top : top + height, left : left + width]


def quantized_forward(
    network: nn.Module, device: torch.device | str = "cpu", strict: bool = False
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The int8 forward of ``network`` (built once per process and network, on first use), or None where it cannot
    run (:func:`int8_unavailable`, a stale calibration, a failure to quantize), logged once: the caller runs fp32.

    Raises:
        ValueError: with ``strict`` (int8 asked for by name), instead of returning None.
    """
    reason = int8_unavailable(network, device)
    entry = None
    if reason is None:
        entry = network.__dict__.get(_QUANTIZED) or QuantizedNetwork(network)
        try:
            entry._quantized()  # quantizes on first use and whenever the weights changed since (checking the calibration)
        except Exception as err:  # noqa: BLE001 (a stale calibration or a missing operator: fp32 is always right)
            reason, entry = f"cannot quantize ({type(err).__name__}: {str(err).strip()[:200]})", None
            network.__dict__.pop(_QUANTIZED, None)
        else:
            object.__setattr__(network, _QUANTIZED, entry)
    if reason is not None:
        if strict:
            raise ValueError(f"precision int8: {reason}")
        _note(reason)
    return entry


def reset_notes() -> None:
    """Forget which fallbacks were logged (tests)."""
    _note.reset()
