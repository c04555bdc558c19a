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
from typing import Dict  # noqa: UP035 (TorchScript wants typing.Dict)

import torch
import torch.nn as nn

from mmcs_monai.networks.padding import pad_to_multiple

__all__ = ["TorchScriptCPnet"]


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
