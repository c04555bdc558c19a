"""Array transforms for cell segmentation. Each has a dictionary twin in ``dictionary.py``.

Conventions: images are float32 [C, H, W]; instance labels are int32 [1, H, W]; flow targets are
float32 [3, H, W] holding (dY, dX, cell probability), the layout of the network's output.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Randomizable, Transform

from mmcs_monai import io, ome
from mmcs_monai.diameters import DEFAULT_TARGET_DIAMETER, median_diameter, scale_to_target
from mmcs_monai.flows import MaskSettings, labels_to_flows

__all__ = [
    "LoadMicroscopyImage",
    "StackNucleusChannel",
    "NormalizePercentile",
    "LabelsToFlows",
    "CellDiameter",
    "RandCellAffine",
    "FlowsToMasks",
]


class LoadMicroscopyImage(Transform):
    """Read an image file (or OME-Zarr) to float32 [C, H, W], or a label file to int32 [1, H, W].

    Args:
        is_label: read instance labels instead of an image.
        with_info: return ``(image, info)``: the image and its :class:`~mmcs_monai.ome.ImageInfo` (pixel size in
            micrometres and channel names from OME metadata).

    Raises:
        mmcs_monai.io.InputError: naming the file and the problem.
    """

    def __init__(self, is_label: bool = False, with_info: bool = False):
        self.is_label = is_label
        self.with_info = with_info

    def __call__(self, path: str):
        if self.is_label:
            return io.read_labels(path)[None]
        image, info = ome.read_image(path)
        return (image, info) if self.with_info else image


class StackNucleusChannel(Transform):
    """Build the network's two input channels ``[cytoplasm, nucleus]`` from any image.

    The cytoplasm channel is ``cyto_channel`` when given, else the mean of the image's channels
    other than the nucleus channel (the grey version of an RGB image, the image itself when grey).
    The nucleus channel is ``nucleus_channel`` when given, else zeros: the network was trained to
    treat a zero second channel as "no nucleus stain".

    Args:
        cyto_channel: index of the cytoplasm channel, or None for the mean of the others.
        nucleus_channel: index of the nucleus channel, or None when there is none.

    Input: float [C, H, W]. Output: float32 [2, H, W].
    """

    def __init__(self, cyto_channel: int | None = None, nucleus_channel: int | None = None):
        self.cyto_channel = cyto_channel
        self.nucleus_channel = nucleus_channel

    def __call__(self, image, cyto_channel: int | None = None, nucleus_channel: int | None = None) -> np.ndarray:
        image = np.asarray(image, np.float32)
        cyto = self.cyto_channel if cyto_channel is None else cyto_channel
        nucleus = self.nucleus_channel if nucleus_channel is None else nucleus_channel
        n = image.shape[0]
        for name, idx in (("cyto_channel", cyto), ("nucleus_channel", nucleus)):
            if idx is not None and not 0 <= idx < n:
                raise ValueError(f"{name}={idx} but the image has {n} channel(s)")
        if cyto is not None:
            cyto_plane = image[cyto]
        else:
            others = [c for c in range(n) if c != nucleus] or list(range(n))
            cyto_plane = image[others].mean(axis=0)
        nucleus_plane = image[nucleus] if nucleus is not None else np.zeros_like(cyto_plane)
        return np.stack([cyto_plane, nucleus_plane]).astype(np.float32)


class NormalizePercentile(Transform):
    """Scale each channel so its ``lower`` percentile maps to 0 and its ``upper`` percentile to 1.

    Channels without contrast (constant, or all zeros such as a missing nucleus channel) become
    zeros instead of NaN.

    Input/output: float32 [C, H, W].
    """

    def __init__(self, lower: float = 1.0, upper: float = 99.0):
        if not 0 <= lower < upper <= 100:
            raise ValueError(f"need 0 <= lower < upper <= 100, got {lower}, {upper}")
        self.lower, self.upper = lower, upper

    def __call__(self, image) -> np.ndarray:
        image = np.asarray(image, np.float32)
        return scale_to_bounds(image, *percentile_bounds(image, self.lower, self.upper))


def percentile_bounds(image, lower: float = 1.0, upper: float = 99.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``lower`` and ``upper`` percentiles of ``image`` [C, ...] (float64 [C] each)."""
    flat = np.asarray(image, np.float32).reshape(len(image), -1)
    lo, hi = np.percentile(flat, (lower, upper), axis=1)
    return lo, hi


def scale_to_bounds(image, lo, hi) -> np.ndarray:
    """Map ``lo`` -> 0 and ``hi`` -> 1 per channel of ``image`` [C, H, W] (float32); channels with
    ``hi - lo <= 1e-6`` become zeros. Whole-slide inference uses bounds measured once per slide,
    so every block is scaled alike."""
    image = np.asarray(image, np.float32)
    lo, hi = np.asarray(lo, np.float32), np.asarray(hi, np.float32)
    span = hi - lo
    out = np.zeros_like(image)
    has_contrast = span > 1e-6
    out[has_contrast] = (image[has_contrast] - lo[has_contrast, None, None]) / span[has_contrast, None, None]
    return out


class LabelsToFlows(Transform):
    """Flow targets from instance labels: int [1, H, W] -> float32 [3, H, W] (dY, dX, cell probability)."""

    def __call__(self, labels) -> np.ndarray:
        labels = np.asarray(labels)[0]
        flows = np.asarray(labels_to_flows(labels), np.float32)
        return np.concatenate([flows, (labels > 0)[None].astype(np.float32)])


class CellDiameter(Transform):
    """Median equivalent cell diameter (pixels) of an instance label image [1, H, W]; 0.0 without cells."""

    def __call__(self, labels) -> float:
        return median_diameter(np.asarray(labels))


def _rotation_flip_matrix(angle: float, flip: bool) -> torch.Tensor:
    """2x2 matrix acting on (x, y) column vectors: rotate by ``angle``, then mirror x if ``flip``."""
    c, s = math.cos(angle), math.sin(angle)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float32)
    mirror = torch.diag(torch.tensor([-1.0 if flip else 1.0, 1.0]))
    return mirror @ rot


class RandCellAffine(Randomizable, Transform):
    """Resize to the target cell diameter, randomly zoom, rotate, flip and crop, keeping flows consistent.

    One interpolation does all of it: the output patch's pixel ``p_out`` samples the input at
    ``c_in + A^-1 (p_out - c_out) / zoom``, where ``A`` rotates and mirrors and
    ``zoom = target_diameter / diameter * random_scale``. Flow vectors are rotated and mirrored
    with ``A`` as well, so flows computed once (and cached) stay the gradient field of the warped
    labels; isotropic zoom does not change their direction.

    Args:
        spatial_size: output patch size (pixels), int or (H, W).
        target_diameter: cell diameter (pixels) the network expects.
        scale_range: random zoom factor drawn from ``[1 - scale_range/2, 1 + scale_range/2]``.
        rotate: draw a random rotation angle in [0, 2 pi).
        flip: mirror left-right with probability 0.5.

    Call with ``(arrays, kinds, diameter)``: ``arrays`` is a list of [C, H, W] arrays of the same H, W;
    ``kinds`` says for each ``"image"`` (bilinear), ``"label"`` (nearest) or ``"flows"`` (bilinear, the
    first two channels (dY, dX) rotated). Returns float32 tensors [C, *spatial_size] (labels int32).
    """

    def __init__(
        self,
        spatial_size: int | tuple[int, int] = 224,
        target_diameter: float = DEFAULT_TARGET_DIAMETER,
        scale_range: float = 0.5,
        rotate: bool = True,
        flip: bool = True,
    ):
        self.spatial_size = (spatial_size, spatial_size) if isinstance(spatial_size, int) else tuple(spatial_size)
        self.target_diameter = target_diameter
        self.scale_range = scale_range
        self.rotate = rotate
        self.flip = flip
        self._scale = 1.0
        self._angle = 0.0
        self._flip = False
        self._center_frac = (0.5, 0.5)

    def randomize(self, data=None) -> None:
        self._scale = 1.0 + self.scale_range * (self.R.rand() - 0.5)
        self._angle = float(self.R.uniform(0, 2 * math.pi)) if self.rotate else 0.0
        self._flip = bool(self.R.rand() < 0.5) if self.flip else False
        self._center_frac = (float(self.R.rand()), float(self.R.rand()))

    def _sampling_grid(self, in_hw: tuple[int, int], zoom: float) -> tuple[torch.Tensor, torch.Tensor]:
        """grid [1, Ho, Wo, 2] in grid_sample's normalised (x, y) and the matrix A (2x2, on (x, y))."""
        (h, w), (ho, wo) = in_hw, self.spatial_size
        a = _rotation_flip_matrix(self._angle, self._flip)
        # Patch centre in zoomed pixels: anywhere that keeps the patch inside the zoomed image,
        # or the image centre when the zoomed image is smaller than the patch (then zero padded).
        centre = []
        for size, out_size, frac in ((w, wo, self._center_frac[1]), (h, ho, self._center_frac[0])):
            spare = size * zoom - out_size
            centre.append((out_size / 2 + frac * spare if spare > 0 else size * zoom / 2) / zoom)
        centre_in = torch.tensor(centre)  # (x, y) in input pixels, edge-based
        ys, xs = torch.meshgrid(
            torch.arange(ho, dtype=torch.float32) + 0.5 - ho / 2,
            torch.arange(wo, dtype=torch.float32) + 0.5 - wo / 2,
            indexing="ij",
        )
        offsets = torch.stack([xs, ys], dim=-1).reshape(-1, 2) / zoom  # (x, y) from patch centre
        points = offsets @ torch.linalg.inv(a).T + centre_in  # input pixel coords (edge-based)
        grid = torch.stack([points[:, 0] / w * 2 - 1, points[:, 1] / h * 2 - 1], dim=-1)
        return grid.reshape(1, ho, wo, 2), a

    def __call__(self, arrays, kinds, diameter: float = 0.0, randomize: bool = True):
        if randomize:
            self.randomize()
        h, w = np.asarray(arrays[0]).shape[-2:]
        zoom = scale_to_target(diameter, self.target_diameter) * self._scale
        grid, a = self._sampling_grid((h, w), zoom)
        return [self._warp(arr, kind, grid, a) for arr, kind in zip(arrays, kinds)]

    @staticmethod
    def _warp(array, kind: str, grid: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(array), dtype=torch.float32)[None]
        mode = "nearest" if kind == "label" else "bilinear"
        out = F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)[0]
        if kind == "label":
            return out.round().to(torch.int32)
        if kind == "flows":
            dy, dx = out[0], out[1]
            # Rotate (dx, dy) with the same matrix that moved the pixels.
            new_dx = a[0, 0] * dx + a[0, 1] * dy
            new_dy = a[1, 0] * dx + a[1, 1] * dy
            out = torch.cat([torch.stack([new_dy, new_dx]), out[2:]])
        return out.contiguous()


class FlowsToMasks(Transform):
    """Instance masks from a network output [3, H, W] (dY, dX, cell probability logit) -> int32 [1, H, W].

    Args:
        mask_settings: the thresholds; default :class:`~mmcs_monai.flows.MaskSettings`().
        options: or single settings (``flow_threshold``, ``cellprob_threshold``, ``min_size``, ``niter``...),
            None meaning the default, as a bundle config passes them.
    """

    def __init__(self, mask_settings: MaskSettings | None = None, **options):
        if mask_settings is not None and options:
            raise ValueError("give mask_settings or single settings, not both")
        self.mask_settings = mask_settings or MaskSettings.from_options(**options)

    def __call__(self, output) -> torch.Tensor:
        output = torch.as_tensor(output).detach().float().cpu()
        return torch.as_tensor(self.mask_settings.masks(output), dtype=torch.int32)[None]
