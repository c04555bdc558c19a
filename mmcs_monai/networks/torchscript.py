"""TorchScript export of CPnet: one file that carries the weights, the diameters and the bundle metadata.

``torch.jit.script(cpnet)`` (what ``python -m monai.bundle ckpt_export`` and ``mmcs export`` call) compiles
:class:`TorchScriptCPnet`, which :meth:`CPnet.__prepare_scriptable__` returns:

- the convolutional core is *traced* once at a size that needs no padding (its loops over levels and its
  multi-input blocks are plain Python, which tracing unrolls); traced convolutions, pooling and
  nearest-neighbour upsampling take any batch size and any multiple of ``pad_divisor`` for H and W;
- the *scripted* ``forward`` zero-pads H and W to ``pad_divisor`` with the same ``pad_to_multiple`` as
  ``CPnet.forward`` and crops back, so the exported model takes any H and W and gives the eager model's output;
- ``diam_mean`` and ``diam_labels`` (buffers) and ``subset_diameters`` (a ``Dict[str, float]`` attribute)
  travel inside the model, so :class:`mmcs_monai.inference.CellInferer` resolves the inference diameter
  from a TorchScript model exactly as from the eager one.

:func:`load_model` opens either kind of file (TorchScript, or a Cellpose 3 / mmcs checkpoint) with an
:class:`~mmcs_monai.io.InputError` that names the file and the problem.
"""

# no ``from __future__ import annotations``: TorchScript must read the class annotation below as a type
import json
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict  # noqa: UP035 (TorchScript wants typing.Dict)

import torch
import torch.nn as nn

from mmcs_monai.io import InputError, atomic_path
from mmcs_monai.networks.cpnet import load_cellpose_checkpoint, pad_to_multiple

__all__ = ["TorchScriptCPnet", "export_torchscript", "max_output_difference", "is_torchscript_file", "load_torchscript", "load_model"]

# extra files stored beside the weights (the names MONAI's ``ckpt_export`` uses for the metadata)
METADATA_FILE = "metadata.json"


class _CPnetCore(nn.Module):
    """CPnet without padding or checks: ``[B, C, H, W] -> [B, nout, H, W]`` for H, W multiples of the divisor."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.downsample = network.downsample
        self.make_style = network.make_style
        self.upsample = network.upsample
        self.output = network.output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.downsample(x)
        return self.output(self.upsample(self.make_style(features[-1]), features))


class TorchScriptCPnet(nn.Module):
    """Scriptable stand-in for a :class:`~mmcs_monai.networks.CPnet` (same weights, same outputs).

    Args:
        network: the CPnet to export (its current weights are copied into the trace; it is not changed).

    ``forward``: ``[B, nchan, H, W]`` float32, any H and W -> ``[B, nout, H, W]`` float32.
    """

    subset_diameters: Dict[str, float]  # noqa: UP006 (TorchScript wants typing's Dict)

    def __init__(self, network: nn.Module):
        super().__init__()
        self.nchan = int(network.nchan)
        self.nout = int(network.nout)
        self.pad_divisor = int(network.pad_divisor)
        param = next(network.parameters())
        side = self.pad_divisor * max(1, -(-64 // self.pad_divisor))  # a small size that needs no padding
        example = torch.zeros(1, self.nchan, side, side, dtype=param.dtype, device=param.device)
        was_training = network.training
        core = _CPnetCore(network).eval()
        with torch.no_grad():
            self.core = torch.jit.trace(core, example)
        network.train(was_training)
        self.register_buffer("diam_mean", network.diam_mean.detach().clone())
        self.register_buffer("diam_labels", network.diam_labels.detach().clone())
        self.subset_diameters = {str(k): float(v) for k, v in network.subset_diameters.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.size(1) != self.nchan:
            raise ValueError(f"CPnet expects input [B, {self.nchan}, H, W], got {x.dim()} dims, {x.size(1)} channels")
        h, w = x.size(2), x.size(3)
        x, top, left = pad_to_multiple(x, self.pad_divisor)
        return self.core(x)[:, :, top : top + h, left : left + w]

    @torch.jit.export
    def diameter_for(self, name: str) -> float:
        """The stored training diameter (pixels) of subset ``name``."""
        if name not in self.subset_diameters:
            raise KeyError(f"no stored diameter for subset {name}")
        return self.subset_diameters[name]


def _metadata_dict(metadata: Mapping[str, Any] | str | os.PathLike | None) -> dict:
    if metadata is None:
        return {}
    if isinstance(metadata, Mapping):
        return dict(metadata)
    return json.loads(Path(metadata).read_text())


def export_torchscript(
    network: nn.Module,
    path: str | os.PathLike,
    metadata: Mapping[str, Any] | str | os.PathLike | None = None,
    configs: Mapping[str, Any] | None = None,
) -> Path:
    """Script ``network`` (a CPnet) and save it atomically with the metadata and configs as extra JSON files.

    Args:
        network: the CPnet (eval mode is used for the trace; the network itself is left as it was).
        path: destination ``.ts`` file; written to a temporary file first, then renamed.
        metadata: bundle metadata (a dict or the path of ``metadata.json``), stored as ``metadata.json``
            as ``python -m monai.bundle ckpt_export`` does.
        configs: ``{name: dict}`` configs stored as ``<name>.json`` (e.g. the inference config).

    Returns:
        the written path.
    """
    scripted = torch.jit.script(network)
    extra = {METADATA_FILE: json.dumps(_metadata_dict(metadata)).encode()}
    for name, config in (configs or {}).items():
        extra[f"{name}.json"] = json.dumps(config).encode()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.jit.save(scripted, str(tmp), _extra_files=extra)
    return path


def max_output_difference(network: nn.Module, exported: nn.Module, images: list[torch.Tensor]) -> float:
    """Largest absolute difference between the two models' outputs over ``images`` (each ``[B, C, H, W]``)."""
    difference = 0.0
    with torch.no_grad():
        for x in images:
            difference = max(difference, float((network(x) - exported(x)).abs().max()))
    return difference


def is_torchscript_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip with compiled ``code/``), not a ``torch.save`` file."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name or name.startswith("code/") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_torchscript(path: str | os.PathLike, map_location: torch.device | str | None = "cpu") -> tuple[torch.jit.ScriptModule, dict]:
    """Load an exported model; returns ``(module in eval mode, metadata dict)``.

    Raises:
        InputError: the file is missing, empty, not a TorchScript archive (a checkpoint is named as such,
            with the command that exports it), or a TorchScript model that is not an exported CPnet.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "model file not found")
    if path.stat().st_size == 0:
        raise InputError(path, "model file is empty")
    if not is_torchscript_file(path):
        problem = "not a TorchScript model"
        if zipfile.is_zipfile(path):
            problem += " (it looks like a checkpoint: export it with `mmcs export CHECKPOINT MODEL.ts`)"
        raise InputError(path, problem)
    extra = {METADATA_FILE: ""}
    try:
        module = torch.jit.load(str(path), map_location=map_location, _extra_files=extra)
    except Exception as err:  # torch raises RuntimeError/ValueError/... for damaged archives
        raise InputError(path, f"cannot load the TorchScript model ({type(err).__name__}: {err})") from None
    for attribute in ("diam_mean", "diam_labels", "subset_diameters"):
        if not hasattr(module, attribute):
            raise InputError(path, f"TorchScript model has no {attribute!r}: not exported from an mmcs CPnet")
    try:
        metadata = json.loads(extra[METADATA_FILE] or "{}")
    except json.JSONDecodeError:
        metadata = {}
    return module.eval(), metadata


def load_model(path: str | os.PathLike, map_location: torch.device | str | None = "cpu") -> nn.Module:
    """The network in ``path``, in eval mode: an exported TorchScript model, or a Cellpose 3 / mmcs checkpoint."""
    path = Path(path)
    if is_torchscript_file(path):
        return load_torchscript(path, map_location)[0]
    if not path.is_file():
        raise InputError(path, "model file not found")
    return load_cellpose_checkpoint(path).to(map_location).eval()
