"""Zero padding of network inputs to a multiple of the pooling size, shared by CPnet and its TorchScript shim."""

import torch
import torch.nn.functional as F


def pad_to_multiple(x: torch.Tensor, divisor: int) -> tuple[torch.Tensor, int, int]:
    """Zero-pad H and W of ``x [B, C, H, W]`` (centred, as Cellpose's ``get_pad_yx`` without its extra margin)
    up to multiples of ``divisor``; returns ``(padded, top, left)`` so the caller can crop back.

    Scriptable: the exported model's ``forward`` (:mod:`mmcs_monai.networks.torchscript`) calls it too.
    """
    h, w = x.size(2), x.size(3)
    ph = (divisor - h % divisor) % divisor
    pw = (divisor - w % divisor) % divisor
    if ph == 0 and pw == 0:
        return x, 0, 0
    top, left = ph // 2, pw // 2
    return F.pad(x, [left, pw - left, top, ph - top], mode="constant", value=0.0), top, left
