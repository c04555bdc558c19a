"""Image -> cell masks: the one home of the step every user depends on.

:class:`CellSegmenter` joins the tiled, diameter-aware prediction (:class:`~mmcs_monai.inference.CellInferer`)
and flows -> masks with one :class:`~mmcs_monai.flows.MaskSettings`. The command line, the bundle's
evaluation and sweep, whole slides, the label server and the Deploy app segment through it, so the same
image at the same settings gives the same masks everywhere.

It keeps no per-call state: a server may use one segmenter for concurrent requests, each getting its
own :class:`Segmentation` (masks, flows and the diameter used).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mmcs_monai.flows import MaskSettings
from mmcs_monai.inference import CellInferer


@dataclass(frozen=True)
class Segmentation:
    """The result of segmenting one image.

    Attributes:
        masks: int32 [H, W] instance ids 1..N (0 background), numpy.
        flows: float32 [3, H, W] network output at the image's size (dY, dX scaled by 5, cell
            probability logit), on the CPU.
        diameter: the cell diameter (pixels, in this image) it was segmented at: the number asked for,
            the stored one, or what ``auto`` measured.
    """

    masks: np.ndarray
    flows: torch.Tensor
    diameter: float

    @property
    def cells(self) -> int:
        return int(self.masks.max(initial=0))


class CellSegmenter:
    """Segment images with a CPnet (or its TorchScript export).

    Args:
        network: the model, in eval mode, on the device images are segmented on.
        inferer: tiling, precision and default diameter (default ``CellInferer()``: tiles of up to 224 px,
            auto precision, eager, the model's stored diameter).
        mask_settings: flows -> masks thresholds (default ``MaskSettings()``, Cellpose 3's); also the
            thresholds of the masks that ``auto`` measures.
        diameter: default diameter for calls that give none (pixels, subset name, ``auto``; None: the
            inferer's).

    Call: ``segmenter(image, diameter=None) -> Segmentation`` with ``image`` [2, H, W] or [1, 2, H, W]
    float32 (normalised, :func:`~mmcs_monai.transforms.inference_preprocessing`), numpy or torch.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        inferer: CellInferer | None = None,
        mask_settings: MaskSettings | None = None,
        diameter: float | str | None = None,
    ) -> None:
        self.network = network
        self.mask_settings = mask_settings or MaskSettings()
        inferer = inferer or CellInferer()
        # auto measures the cells with the same thresholds the masks are made with
        self.inferer = inferer if inferer.mask_settings == self.mask_settings else _with_mask_settings(inferer, self.mask_settings)
        self.diameter = diameter

    @property
    def device(self) -> torch.device:
        return next(iter(self.network.parameters()), torch.empty(0)).device

    def segment_batch(self, images: torch.Tensor | np.ndarray, diameter: float | str | None = None) -> list[Segmentation]:
        """Segment ``images`` [B, 2, H, W] float32; one :class:`Segmentation` per image."""
        x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images, dtype=torch.float32)
        if x.ndim != 4 or x.shape[1] != 2:
            raise ValueError(f"images must be [B, 2, H, W] (cytoplasm, nucleus), got {tuple(x.shape)}")
        diameter = diameter if diameter is not None else self.diameter
        flows, used = self.inferer.predict(x.to(self.device), self.network, diameter=diameter)
        flows = flows.float().cpu()
        return [Segmentation(np.asarray(self.mask_settings.masks(f.numpy()), dtype=np.int32), f, float(d)) for f, d in zip(flows, used)]

    def __call__(self, image: torch.Tensor | np.ndarray, diameter: float | str | None = None) -> Segmentation:
        x = torch.as_tensor(np.asarray(image) if not torch.is_tensor(image) else image, dtype=torch.float32)
        return self.segment_batch(x[None] if x.ndim == 3 else x, diameter)[0]


def _with_mask_settings(inferer: CellInferer, settings: MaskSettings) -> CellInferer:
    """A copy of ``inferer`` whose ``auto`` measures masks made with ``settings`` (the caller's is left as it is)."""
    inferer = copy.copy(inferer)
    inferer.mask_settings = settings
    return inferer


def segmenter_from_options(network: torch.nn.Module, diameter: Any = None, **options: Any) -> CellSegmenter:
    """A :class:`CellSegmenter` from flat options, as commands, configs and apps give them.

    ``options``: :class:`MaskSettings` fields (``flow_threshold``, ``cellprob_threshold``, ``min_size``...) and
    :class:`CellInferer` arguments (``roi_size``, ``overlap``, ``sw_batch_size``, ``precision``, ``channels_last``,
    ``compile``, ``fit_tiles``); None means "the default".

    Raises:
        ValueError: an unknown option or a bad value.
    """
    mask_names = {"flow_threshold", "cellprob_threshold", "min_size", "niter", "max_size_fraction"}
    inferer_names = {"roi_size", "overlap", "sw_batch_size", "precision", "channels_last", "compile", "fit_tiles"}
    unknown = sorted(set(options) - mask_names - inferer_names)
    if unknown:
        raise ValueError(f"unknown segmentation option(s) {unknown}")
    masks = MaskSettings.from_options(**{k: v for k, v in options.items() if k in mask_names})
    inferer_args = {k: v for k, v in options.items() if k in inferer_names and v is not None}
    return CellSegmenter(network, CellInferer(mask_settings=masks, **inferer_args), masks, diameter)


__all__ = ["CellSegmenter", "Segmentation", "segmenter_from_options"]
