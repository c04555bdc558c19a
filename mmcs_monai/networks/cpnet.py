"""CPnet: the Cellpose 3 residual U-Net with a global style vector.

The module tree (attribute names and ``nn.Sequential`` indices) mirrors ``cellpose.resnet_torch.CPnet`` so
that a Cellpose 3 state dict loads with ``strict=True``::

    downsample.down.res_down_{k}.proj.{0: BN, 1: conv1x1}
    downsample.down.res_down_{k}.conv.conv_{0..3}.{0: BN, 2: conv}
    upsample.up.res_up_{k}.proj.{0: BN, 1: conv1x1}
    upsample.up.res_up_{k}.conv.conv_0.{0: BN, 2: conv}
    upsample.up.res_up_{k}.conv.conv_{1..3}.conv.{0: BN, 2: conv}
    upsample.up.res_up_{k}.conv.conv_{1..3}.full          (Linear: style -> channels)
    output.{0: BN, 2: conv1x1}
    diam_mean, diam_labels                                  (shape [1], requires_grad=False)

Unlike Cellpose's ``forward`` (which returns ``(flows, style, encoder_features)``), ``CPnet.forward`` returns a
single tensor so that MONAI inferers, trainers and losses can use the network directly; the style vector is
available from :meth:`CPnet.forward_with_style`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmcs_monai.networks.padding import pad_to_multiple
from mmcs_monai.networks.torchscript import TorchScriptCPnet

__all__ = ["CPnet", "SUBSET_TABLE_KEY", "encode_subset_table", "decode_subset_table"]

# the state-dict key of CPnet's subset-diameter table (a uint8 tensor of JSON); absent from Cellpose files
SUBSET_TABLE_KEY = "subset_diameters"
# where files written before 0.1 kept it (a dict: not every state-dict reader accepts one)
LEGACY_EXTRA_STATE_KEY = "_extra_state"


SUBSET_TABLE_BYTES = 4096  # fixed size: every model of an architecture has the same state-dict shapes


def encode_subset_table(table: Mapping[str, float]) -> torch.Tensor:
    """``{subset: diameter px}`` -> uint8 [SUBSET_TABLE_BYTES] tensor: its JSON (sorted keys), zero padded.

    The fixed size lets MONAI's ``copy_model_state`` (how model-zoo users load a bundle's weights into its
    ``network_def``) copy the table like any other tensor.

    Raises:
        ValueError: a table whose JSON exceeds :data:`SUBSET_TABLE_BYTES`.
    """
    data = json.dumps({str(k): round(float(v), 4) for k, v in table.items()}, sort_keys=True).encode()
    if len(data) > SUBSET_TABLE_BYTES:
        raise ValueError(f"subset diameter table too large to store ({len(data)} > {SUBSET_TABLE_BYTES} bytes of JSON)")
    out = torch.zeros(SUBSET_TABLE_BYTES, dtype=torch.uint8)
    out[: len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    return out


def decode_subset_table(tensor: torch.Tensor) -> dict[str, float]:
    """Inverse of :func:`encode_subset_table` (also reads unpadded tables)."""
    data = bytes(torch.as_tensor(tensor).to(torch.uint8).tolist()).rstrip(b"\x00")
    return {str(k): float(v) for k, v in json.loads(data.decode() or "{}").items()}


# Cellpose 3 batch-norm settings; the momentum matters when fine-tuning a Cellpose checkpoint.
_BN_EPS = 1e-5
_BN_MOMENTUM = 0.05


def _bn_relu_conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """Pre-activation conv: BN -> ReLU -> conv ("same" padding). Indices 0, 1, 2 as in Cellpose."""
    return nn.Sequential(
        nn.BatchNorm2d(in_channels, eps=_BN_EPS, momentum=_BN_MOMENTUM),
        # in-place is safe: the ReLU only ever sees the fresh BN output, never a tensor reused elsewhere
        nn.ReLU(inplace=True),
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
    )


def _bn_conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """BN -> conv without activation (used for the residual projections). Indices 0, 1 as in Cellpose."""
    return nn.Sequential(
        nn.BatchNorm2d(in_channels, eps=_BN_EPS, momentum=_BN_MOMENTUM),
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
    )


class _ResDown(nn.Module):
    """Encoder block: two residual units of two pre-activation convs; the first unit projects the input.

    ``[B, in_channels, H, W] -> [B, out_channels, H, W]``
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        # registration order (conv before proj) only fixes the state-dict key order, matching Cellpose's
        self.conv = nn.Sequential()
        for t in range(4):
            cin = in_channels if t == 0 else out_channels
            self.conv.add_module(f"conv_{t}", _bn_relu_conv(cin, out_channels, kernel_size))
        self.proj = _bn_conv(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x) + self.conv[1](self.conv[0](x))
        return x + self.conv[3](self.conv[2](x))


class _Encoder(nn.Module):
    """Residual down path; returns the features of every level, finest first.

    ``[B, nbase[0], H, W] -> [[B, nbase[1], H, W], [B, nbase[2], H/2, W/2], ...]``
    """

    def __init__(self, nbase: Sequence[int], kernel_size: int, max_pool: bool = True) -> None:
        super().__init__()
        self.down = nn.Sequential()
        for k in range(len(nbase) - 1):
            self.down.add_module(f"res_down_{k}", _ResDown(nbase[k], nbase[k + 1], kernel_size))
        self.maxpool = nn.MaxPool2d(2, stride=2) if max_pool else nn.AvgPool2d(2, stride=2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for k, block in enumerate(self.down):
            x = block(x if k == 0 else self.maxpool(x))
            features.append(x)
        return features


class _StyleVector(nn.Module):
    """Global average of the deepest features, L2-normalised per sample: ``[B, C, h, w] -> [B, C]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        style = x.mean(dim=(2, 3))
        # F.normalize clamps the norm at 1e-12; identical to Cellpose's plain division except for all-zero features
        return F.normalize(style, p=2.0, dim=1)


class _StyleConv(nn.Module):
    """Adds an optional skip and the projected style to ``x``, then BN -> ReLU -> conv.

    ``style [B, S], x [B, C, H, W], skip [B, C, H, W] | None -> [B, out_channels, H, W]``
    """

    def __init__(self, in_channels: int, out_channels: int, style_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = _bn_relu_conv(in_channels, out_channels, kernel_size)
        self.full = nn.Linear(style_channels, in_channels)

    def forward(self, style: torch.Tensor, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + skip
        return self.conv(x + self.full(style)[:, :, None, None])


class _ResUp(nn.Module):
    """Decoder block: like :class:`_ResDown`, but the skip features and the style are added before convs 1-3.

    ``x [B, in_channels, H, W], skip [B, out_channels, H, W], style [B, S] -> [B, out_channels, H, W]``
    """

    def __init__(self, in_channels: int, out_channels: int, style_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Sequential()
        self.conv.add_module("conv_0", _bn_relu_conv(in_channels, out_channels, kernel_size))
        for t in (1, 2, 3):
            self.conv.add_module(f"conv_{t}", _StyleConv(out_channels, out_channels, style_channels, kernel_size))
        self.proj = _bn_conv(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        x = self.proj(x) + self.conv[1](style, self.conv[0](x), skip)
        return x + self.conv[3](style, self.conv[2](style, x))


class _Decoder(nn.Module):
    """Residual up path with nearest-neighbour upsampling; ``nbaseup = nbase[1:] + [nbase[-1]]``.

    ``style [B, nbase[-1]], features (from :class:`_Encoder`) -> [B, nbase[1], H, W]``
    """

    def __init__(self, nbaseup: Sequence[int], kernel_size: int) -> None:
        super().__init__()
        self.upsampling = nn.Upsample(scale_factor=2, mode="nearest")
        self.up = nn.Sequential()
        for k in range(len(nbaseup) - 1):
            self.up.add_module(f"res_up_{k}", _ResUp(nbaseup[k + 1], nbaseup[k], nbaseup[-1], kernel_size))

    def forward(self, style: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        # the deepest block uses the deepest features both as input and as skip (as in Cellpose)
        x = self.up[-1](features[-1], features[-1], style)
        for k in range(len(self.up) - 2, -1, -1):
            x = self.up[k](self.upsampling(x), features[k], style)
        return x


class CPnet(nn.Module):
    """Cellpose 3 network (``cellpose.resnet_torch.CPnet``, 2D) with a single-tensor ``forward``.

    Args:
        nbase: channels per level; ``nbase[0]`` is the number of input channels (2 here: cytoplasm, nucleus),
            e.g. ``(2, 32, 64, 128, 256)`` for the Cellpose 3 models. ``len(nbase) - 2`` poolings are applied.
        nout: output channels; 3 for (dY, dX, cell-probability logit).
        sz: kernel size of the 'same'-padded convolutions.
        max_pool: max pooling between levels (Cellpose default); average pooling otherwise.
        diam_mean: mean cell diameter in pixels that training rescales images to; stored in the state dict
            as ``diam_mean`` and used as the initial ``diam_labels``.
        pad_divisor: ``forward`` zero-pads H and W (centred) up to a multiple of this, then crops back.
            Defaults to ``max(16, 2 ** (len(nbase) - 2))``; must be a multiple of ``2 ** (len(nbase) - 2)``.

    Zero padding (not reflect) is used because Cellpose pads with zeros at inference, training crops/rotations
    also fill outside the image with zeros, and reflect padding fails for inputs smaller than the pad.
    On inputs whose H and W are already multiples of ``pad_divisor`` nothing is padded, so outputs equal
    Cellpose's ``net(x)[0]`` exactly. Note the padded border does enter the style vector (global average).
    """

    def __init__(
        self,
        nbase: Sequence[int] = (2, 32, 64, 128, 256),
        nout: int = 3,
        sz: int = 3,
        max_pool: bool = True,
        diam_mean: float = 30.0,
        pad_divisor: int | None = None,
    ) -> None:
        super().__init__()
        nbase = [int(n) for n in nbase]
        if len(nbase) < 2 or min(nbase) < 1:
            raise ValueError(f"nbase needs at least 2 positive entries (input channels, features), got {nbase}.")
        min_divisor = 2 ** max(len(nbase) - 2, 0)
        pad_divisor = max(16, min_divisor) if pad_divisor is None else int(pad_divisor)
        if pad_divisor < 1 or pad_divisor % min_divisor:
            raise ValueError(f"pad_divisor must be a positive multiple of {min_divisor} for nbase={nbase}.")
        self.nbase = nbase
        self.nchan = nbase[0]
        self.nout = int(nout)
        self.sz = int(sz)
        self.max_pool = bool(max_pool)
        self.pad_divisor = pad_divisor

        nbaseup = nbase[1:] + [nbase[-1]]
        self.downsample = _Encoder(nbase, self.sz, max_pool=self.max_pool)
        self.upsample = _Decoder(nbaseup, self.sz)
        self.make_style = _StyleVector()
        self.output = _bn_relu_conv(nbaseup[0], self.nout, 1)
        # carried in the state dict like Cellpose does, but never trained
        self.diam_mean = nn.Parameter(torch.full((1,), float(diam_mean)), requires_grad=False)
        self.diam_labels = nn.Parameter(torch.full((1,), float(diam_mean)), requires_grad=False)
        # per-subset training diameters {name: pixels}; saved as the state dict's ``_extra_state``
        self.subset_diameters: dict[str, float] = {}
        self.__dict__["size_network"] = None  # see attach_size_network

    def attach_size_network(self, network: nn.Module | None) -> None:
        """Give this network a cheaper one that the ``auto`` size search runs instead of it (``size_network``: a
        CPnet, or any module with its call, ``[B, 2, h, w] -> [B, 3, h, w]``; None: the search runs this network).

        Kept outside the module tree on purpose: not in :meth:`state_dict`, :meth:`parameters` or ``.to()``, so
        training, checkpoints, ``ckpt_export`` and Cellpose see this network alone. A model file's size network is
        a file of its own beside it (:func:`~mmcs_monai.networks.model_files.size_network_file`, attached by
        :func:`~mmcs_monai.networks.load_model`); inference moves it to the image's device when it runs it.
        """
        if network is not None and not isinstance(network, nn.Module):
            raise TypeError(f"a size network is a torch module, got {type(network).__name__}")
        self.__dict__["size_network"] = network

    # ------------------------------------------------------------------ forward
    def forward_with_style(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the network and also return the style vector.

        Args:
            x: images ``[B, nbase[0], H, W]`` float, any H and W.

        Returns:
            ``(out, style)``: ``out [B, nout, H, W]`` = (dY, dX, cell-probability logit) for ``nout=3``,
            flows scaled like Cellpose (about 5 x unit vectors); ``style [B, nbase[-1]]`` unit L2 norm.
        """
        if x.ndim != 4 or x.shape[1] != self.nchan:
            raise ValueError(f"CPnet expects input [B, {self.nchan}, H, W], got shape {tuple(x.shape)}.")
        h, w = x.shape[-2:]
        x, top, left = pad_to_multiple(x, self.pad_divisor)
        features = self.downsample(x)
        style = self.make_style(features[-1])
        out = self.output(self.upsample(style, features))
        return out[:, :, top : top + h, left : left + w], style

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, nbase[0], H, W] -> [B, nout, H, W]``; see :meth:`forward_with_style`."""
        return self.forward_with_style(x)[0]

    def __prepare_scriptable__(self) -> nn.Module:
        """What ``torch.jit.script(cpnet)`` compiles (``ckpt_export``, ``mmcs export``): a traced core with a
        scripted padding ``forward`` and the diameters; see :mod:`mmcs_monai.networks.torchscript`."""
        return TorchScriptCPnet(self)

    # ------------------------------------------------------------------ diameters
    def set_diam_labels(self, value: float) -> None:
        """Set the mean training-label diameter (pixels, before rescaling to ``diam_mean``)."""
        with torch.no_grad():
            self.diam_labels.fill_(float(value))

    def set_diam_mean(self, value: float) -> None:
        """Set the diameter (pixels) that images are rescaled to for training and inference."""
        with torch.no_grad():
            self.diam_mean.fill_(float(value))

    def set_subset_diameters(self, subsets: Mapping[str, float]) -> None:
        """Store the training diameter (pixels) of each named subset (modality, data set...)."""
        self.subset_diameters = {str(k): float(v) for k, v in subsets.items() if float(v) > 0}

    def diameter_for(self, name: str) -> float:
        """The stored training diameter (pixels) of subset ``name``.

        Raises:
            KeyError: unknown name; the message lists the stored subsets.
        """
        if name not in self.subset_diameters:
            known = ", ".join(sorted(self.subset_diameters)) or "none (train with subsets to store them)"
            raise KeyError(f"no stored diameter for subset {name!r}; stored subsets: {known}")
        return self.subset_diameters[name]

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # the subset table travels as a tensor (UTF-8 JSON bytes): every entry of the state dict is a
        # tensor, so MONAI's copy_model_state (model-zoo's bundle loading) and torch.load(weights_only=True)
        # read it, and Cellpose, which loads with strict=False, ignores it
        destination[prefix + SUBSET_TABLE_KEY] = encode_subset_table(self.subset_diameters)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        ours = (prefix + SUBSET_TABLE_KEY, prefix + LEGACY_EXTRA_STATE_KEY)
        unexpected_keys[:] = [k for k in unexpected_keys if k not in ours]
        if prefix + LEGACY_EXTRA_STATE_KEY in state_dict:  # files written before the table was a tensor
            self.set_subset_diameters(dict((state_dict[prefix + LEGACY_EXTRA_STATE_KEY] or {}).get("subset_diameters", {})))
        elif prefix + SUBSET_TABLE_KEY in state_dict:
            self.set_subset_diameters(decode_subset_table(state_dict[prefix + SUBSET_TABLE_KEY]))
        else:  # Cellpose files carry no subset table: they load with strict=True (an empty table)
            self.subset_diameters = {}
