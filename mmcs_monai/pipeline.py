"""The whole segmentation as one torch module: image -> instance labels, compiled with TorchScript.

:class:`SegmentationPipeline` is what ``mmcs export --format pipeline`` scripts into one file (and the
BioImage.IO package carries). It imports torch and :mod:`mmcs_monai.masks` only, and repeats in torch what
``mmcs infer`` does with MONAI and numpy:

1. channels: ``[H, W]`` is a grey image; ``[C, H, W]`` becomes ``[cytoplasm, nucleus]`` as
   :class:`~mmcs_monai.transforms.array.StackNucleusChannel` does (cytoplasm: the mean of the channels other
   than the nucleus channel; nucleus: that channel, else zeros);
2. each channel scaled so its 1st and 99th percentiles map to 0 and 1 (linear interpolation, as
   ``numpy.percentile``; channels without contrast become zeros);
3. resized (bilinear) so cells of ``diameter`` pixels reach the network's training diameter;
4. the network tile by tile as MONAI's sliding window in :class:`~mmcs_monai.inference.CellInferer`: tiles of
   up to 224 px shrunk to the fewest windows (``fitted_tile``), 10% overlap, Gaussian blending (sigma 1/8 of
   the tile), tiles zero-padded up to the tile size on small images;
5. flows resized back to the image and made into masks by :func:`mmcs_monai.masks.flows_to_masks`.

What stays outside: the ``auto`` diameter search (a diameter of 0 means the model's stored training-set
mean; pass the diameter otherwise), bf16/fp16 autocast (fp32 only) and image file reading.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmcs_monai.masks import flows_to_masks

__all__ = ["SegmentationPipeline", "fitted_tile", "windows_along"]


def windows_along(size: int, roi: int, overlap: float) -> int:
    """Windows MONAI's sliding window puts along an axis of ``size`` px with tiles of ``roi`` px."""
    if roi >= size:
        return 1
    interval = max(int(roi * (1 - overlap)), 1)
    d = 0
    while d * interval + roi < size:
        d += 1
    return d + 1


def fitted_tile(size: int, roi: int, overlap: float) -> int:
    """The smallest tile (a multiple of 16, at most ``roi``) that covers ``size`` pixels with as few sliding
    windows as tiles of ``roi`` would (MONAI's window placement): fewer pixels computed twice."""
    roi = min(roi, -(-size // 16) * 16)
    wanted = windows_along(size, roi, overlap)
    if wanted == 1:
        return roi
    tile = max(16, int(size / (wanted - (wanted - 1) * overlap)) // 16 * 16)
    while tile < roi and windows_along(size, tile, overlap) > wanted:
        tile += 16
    return tile


def _window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Start of each window along an axis (``size >= roi``), as MONAI's ``dense_patch_slices``."""
    interval = roi if roi == size else max(int(roi * (1 - overlap)), 1)
    num = int(math.ceil(float(size) / interval))
    count = 1
    for d in range(num):
        if d * interval + roi >= size:
            count = d + 1
            break
    starts: list[int] = []
    for i in range(count):
        start = i * interval
        starts.append(start - max(start + roi - size, 0))
    return starts


def _gaussian_weights(h: int, w: int, device: torch.device) -> torch.Tensor:
    """MONAI's Gaussian importance map of a ``h`` x ``w`` tile (sigma 0.125 of the tile, floor 1e-3)."""
    ys = torch.arange(-(h - 1) / 2.0, (h - 1) / 2.0 + 1, dtype=torch.float32, device=device)
    xs = torch.arange(-(w - 1) / 2.0, (w - 1) / 2.0 + 1, dtype=torch.float32, device=device)
    gy = torch.exp(ys**2 / (-2 * (0.125 * h) ** 2))
    gx = torch.exp(xs**2 / (-2 * (0.125 * w) ** 2))
    weights = gy[:, None] * gx[None, :]
    return weights.clamp(min=max(float(weights.min()), 1e-3))


def _round_half_even(x: float) -> int:
    """Python's ``round``: halves to the even neighbour (TorchScript's rounds them away from 0)."""
    r = math.floor(x)
    d = x - r
    if d > 0.5 or (d == 0.5 and r % 2 == 1):
        r += 1
    return int(r)


def _percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``numpy.percentile(values, q)`` (linear interpolation) of a flat float tensor, in float64."""
    n = values.numel()
    pos = q / 100.0 * (n - 1)
    k = int(math.floor(pos))
    frac = pos - k
    a = torch.kthvalue(values, k + 1)[0].double()
    if frac == 0.0 or k + 1 >= n:
        return a
    b = torch.kthvalue(values, k + 2)[0].double()
    # numpy's _lerp: a + (b - a) t, from the upper end for t >= 0.5
    return b - (b - a) * (1.0 - frac) if frac >= 0.5 else a + (b - a) * frac


class SegmentationPipeline(nn.Module):
    """Image -> int32 instance labels with a CPnet, everything inside (see the module docstring).

    Args:
        network: the CPnet (or its :class:`~mmcs_monai.networks.torchscript.TorchScriptCPnet`):
            ``[B, 2, H, W] -> [B, 3, H, W]`` (dY, dX, cell probability logit).
        diam_mean: the network's training diameter (pixels).
        diameter: the cell diameter used when a call gives none (0): the stored training-set mean.
        nucleus_channel: index of the nucleus channel of ``[C, H, W]`` images when a call gives none; -1: none.
        cyto_channel: index of the cytoplasm channel; -1: the mean of the channels other than the nucleus one.
        roi_size, overlap, sw_batch_size, fit_tiles: tiling, as :class:`~mmcs_monai.inference.CellInferer`.
        flow_threshold, cellprob_threshold, min_size, niter, max_size_fraction: as
            :class:`~mmcs_monai.flows.MaskSettings` (``flow_threshold <= 0``: no flow QC).
        lower, upper: the percentiles mapped to 0 and 1.

    ``forward(image, diameter=0.0, nucleus_channel=-2)``: ``image`` ``[H, W]``, ``[C, H, W]`` or ``[B, C, H, W]``,
    any float or integer dtype, on the module's device -> int32 ``[H, W]`` (``[B, 1, H, W]`` for a batch);
    ``diameter`` 0: the stored one; ``nucleus_channel`` -2: the stored one, -1: none.
    """

    def __init__(
        self,
        network: nn.Module,
        diam_mean: float,
        diameter: float,
        nucleus_channel: int = -1,
        cyto_channel: int = -1,
        roi_size: int = 224,
        overlap: float = 0.1,
        sw_batch_size: int = 8,
        fit_tiles: bool = True,
        flow_threshold: float = 0.4,
        cellprob_threshold: float = 0.0,
        min_size: int = 15,
        niter: int = 200,
        max_size_fraction: float = 0.4,
        lower: float = 1.0,
        upper: float = 99.0,
    ):
        super().__init__()
        self.network = network
        self.diam_mean = float(diam_mean)
        self.diameter = float(diameter)
        self.nucleus_channel = int(nucleus_channel)
        self.cyto_channel = int(cyto_channel)
        self.roi_size = int(roi_size)
        self.overlap = float(overlap)
        self.sw_batch_size = int(sw_batch_size)
        self.fit_tiles = bool(fit_tiles)
        self.flow_threshold = float(flow_threshold) if flow_threshold is not None else 0.0
        self.cellprob_threshold = float(cellprob_threshold)
        self.min_size = int(min_size)
        self.niter = int(niter)
        self.max_size_fraction = float(max_size_fraction)
        self.lower = float(lower)
        self.upper = float(upper)

    def forward(self, image: torch.Tensor, diameter: float = 0.0, nucleus_channel: int = -2) -> torch.Tensor:
        if image.dim() == 4:
            out = [self.segment(im, diameter, nucleus_channel)[None] for im in image.unbind(0)]
            return torch.stack(out) if len(out) > 0 else torch.zeros(0, 1, image.shape[2], image.shape[3], dtype=torch.int32)
        return self.segment(image, diameter, nucleus_channel)

    @torch.jit.export
    def segment(self, image: torch.Tensor, diameter: float = 0.0, nucleus_channel: int = -2) -> torch.Tensor:
        """Labels int32 [H, W] of one image [H, W] or [C, H, W] (see the class docstring)."""
        x = self.preprocess(image, nucleus_channel)
        used = diameter if diameter > 0 else self.diameter
        return self.masks(self.flows(x, used))

    @torch.jit.export
    def masks(self, flows: torch.Tensor) -> torch.Tensor:
        """Labels int32 [H, W] from a network output [3, H, W] (dY, dX, cell probability logit), with the
        file's thresholds: the mask step alone."""
        return flows_to_masks(
            flows[:2], flows[2], self.niter, self.cellprob_threshold, self.flow_threshold, self.min_size, self.max_size_fraction
        )

    @torch.jit.export
    def preprocess(self, image: torch.Tensor, nucleus_channel: int = -2) -> torch.Tensor:
        """``[H, W]`` or ``[C, H, W]`` image -> float32 ``[2, H, W]`` (cytoplasm, nucleus), each channel scaled
        to its percentiles."""
        if image.dim() != 2 and image.dim() != 3:
            raise ValueError(
                "mmcs pipeline: the image must be [H, W] (grey) or [C, H, W] (channels first), or a batch "
                "[B, C, H, W]; got " + str(image.dim()) + " dimensions, shape " + str(image.shape)
            )
        if image.dtype == torch.bool or image.is_complex():
            kind = "bool" if image.dtype == torch.bool else "complex numbers"
            raise ValueError("mmcs pipeline: the image must hold real numbers (a float or integer dtype), got " + kind)
        x = image[None] if image.dim() == 2 else image
        if x.shape[1] < 1 or x.shape[2] < 1 or x.shape[0] < 1:
            raise ValueError("mmcs pipeline: empty image, shape " + str(image.shape))
        x = x.to(torch.float32)
        n = x.shape[0]
        nucleus = self.nucleus_channel if nucleus_channel == -2 else nucleus_channel
        cyto = self.cyto_channel
        if nucleus < -1 or nucleus >= n:
            raise ValueError("mmcs pipeline: nucleus_channel=" + str(nucleus) + " but the image has " + str(n) + " channel(s)")
        if cyto >= n:
            raise ValueError("mmcs pipeline: cyto_channel=" + str(cyto) + " but the image has " + str(n) + " channel(s)")
        if cyto >= 0:
            cyto_plane = x[cyto]
        else:
            others: list[int] = []
            for c in range(n):
                if c != nucleus:
                    others.append(c)
            if len(others) == 0:
                others = [0]
            cyto_plane = x[others].mean(0) if len(others) > 1 else x[others[0]]
        nucleus_plane = x[nucleus] if nucleus >= 0 else torch.zeros_like(cyto_plane)
        two = torch.stack((cyto_plane, nucleus_plane))
        out = torch.zeros_like(two)
        for c in range(2):
            flat = two[c].reshape(-1)
            lo = _percentile(flat, self.lower).to(torch.float32)
            hi = _percentile(flat, self.upper).to(torch.float32)
            span = hi - lo
            if float(span) > 1e-6:
                out[c] = (two[c] - lo) / span
        return out

    @torch.jit.export
    def flows(self, x: torch.Tensor, diameter: float) -> torch.Tensor:
        """Network output [3, H, W] (dY, dX, cell probability logit) for a preprocessed image [2, H, W] whose
        cells are ``diameter`` pixels across."""
        height, width = x.shape[1], x.shape[2]
        zoom = self.diam_mean / diameter if diameter > 0 else 1.0
        xb = x[None]
        if abs(zoom - 1.0) > 1e-3:
            size = [max(_round_half_even(height * zoom), 1), max(_round_half_even(width * zoom), 1)]
            xb = F.interpolate(xb, size=size, mode="bilinear", align_corners=False)
        out = self.tiled(xb)
        if out.shape[2] != height or out.shape[3] != width:
            out = F.interpolate(out, size=[height, width], mode="bilinear", align_corners=False)
        return out[0]

    def tile_shape(self, height: int, width: int) -> list[int]:
        if self.fit_tiles:
            return [fitted_tile(height, self.roi_size, self.overlap), fitted_tile(width, self.roi_size, self.overlap)]
        return [min(self.roi_size, -(-height // 16) * 16), min(self.roi_size, -(-width // 16) * 16)]

    @torch.jit.export
    def tiled(self, x: torch.Tensor) -> torch.Tensor:
        """The network over ``x`` [1, 2, h, w] in overlapping tiles blended with Gaussian weights -> [1, 3, h, w]."""
        h, w = x.shape[2], x.shape[3]
        tile = self.tile_shape(h, w)
        th, tw = tile[0], tile[1]
        # small images are zero-padded (centred) up to the tile
        ph, pw = max(th - h, 0), max(tw - w, 0)
        top, left = ph // 2, pw // 2
        if ph > 0 or pw > 0:
            x = F.pad(x, [left, pw - left, top, ph - top], mode="constant", value=0.0)
        H, W = x.shape[2], x.shape[3]
        ys = _window_starts(H, th, self.overlap)
        xs = _window_starts(W, tw, self.overlap)
        corners: list[list[int]] = []
        for y0 in ys:
            for x0 in xs:
                corners.append([y0, x0])
        weights = _gaussian_weights(th, tw, x.device)
        out = torch.zeros(1, 3, H, W, dtype=torch.float32, device=x.device)
        count = torch.zeros(1, 1, H, W, dtype=torch.float32, device=x.device)
        for c in corners:
            count[:, :, c[0] : c[0] + th, c[1] : c[1] + tw] += weights
        for b in range(0, len(corners), self.sw_batch_size):
            batch = corners[b : b + self.sw_batch_size]
            tiles = torch.cat([x[:, :, c[0] : c[0] + th, c[1] : c[1] + tw] for c in batch])
            pred = self.network(tiles).float() * weights
            for i, c in enumerate(batch):
                out[:, :, c[0] : c[0] + th, c[1] : c[1] + tw] += pred[i : i + 1]
        out = out / count
        return out[:, :, top : top + h, left : left + w]
