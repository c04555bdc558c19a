"""Image -> cell masks: the one home of the step every user depends on.

:class:`CellSegmenter` joins the tiled, diameter-aware prediction (:class:`~mmcs_monai.inference.CellInferer`)
and flows -> masks with one :class:`~mmcs_monai.flows.MaskSettings`. The command line, the bundle's
evaluation and sweep, whole slides, the label server and the Deploy app segment through it, so the same
image at the same settings gives the same masks everywhere.

It also answers which diameter an image is segmented at (:meth:`CellSegmenter.diameter_for`: a number, the
stored mean, a subset's stored diameter, or ``auto``/``refine`` estimated on the image with the segmenter's
own thresholds) and the zoom that diameter means (:meth:`CellSegmenter.zoom_for`), for callers that cut an
image themselves (whole slides, the label server's regions).

It keeps no per-call state: a server may use one segmenter for concurrent requests, each getting its
own :class:`Segmentation` (masks, flows and the diameter used).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mmcs_monai.flows import MaskSettings
from mmcs_monai.inference import ESTIMATED_DIAMETERS, CellInferer, diameter_zoom, resolve_diameter


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
        self.mask_settings = mask_settings or MaskSettings()  # the masks' thresholds, and those auto measures with
        self.inferer = inferer or CellInferer()
        self.diameter = diameter

    @property
    def device(self) -> torch.device:
        return next(iter(self.network.parameters()), torch.empty(0)).device

    @property
    def compiles(self) -> bool:
        """Whether the network is asked to run compiled (it falls back to eager where it cannot)."""
        return self.inferer.compile is True

    def for_workload(self, megapixels: float | None = None, images: Any = None) -> CellSegmenter:
        """This segmenter, or one whose ``compile="auto"`` is decided for a job of ``megapixels`` image megapixels
        (else counted from ``images``, a data list) on its device (:meth:`CellInferer.for_workload`)."""
        inferer = self.inferer.for_workload(megapixels=megapixels, images=images, device=self.device, network=self.network)
        return self if inferer is self.inferer else CellSegmenter(self.network, inferer, self.mask_settings, self.diameter)

    def requested_diameter(self, diameter: float | str | None = None) -> float | str | None:
        """The diameter option a call means: ``diameter``, else the segmenter's default, else the inferer's."""
        return next((d for d in (diameter, self.diameter, self.inferer.diameter) if d is not None), None)

    def diameter_for(self, image: torch.Tensor | np.ndarray | None = None, diameter: float | str | None = None) -> float:
        """The cell diameter (pixels) ``image`` is segmented at for ``diameter`` (default: the segmenter's, else
        the inferer's): a number as given; None or ``"stored"``: the model's stored mean; a subset name: the
        diameter the model stored for it; ``"auto"``/``"refine"``: estimated on ``image`` ([2, H, W] or
        [1, 2, H, W] float32, only read for these two), measuring masks made with this segmenter's thresholds.

        Raises:
            ValueError: a subset the model stored no diameter for, a diameter that is not positive, or an
                estimate without an image.
        """
        diameter = self.requested_diameter(diameter)
        if diameter not in ESTIMATED_DIAMETERS:
            return float(resolve_diameter(self.network, diameter))
        if image is None:
            raise ValueError(f"diameter {diameter!r} is estimated on the image: give one")
        x = _as_images(image)
        if len(x) != 1:
            raise ValueError(f"diameter_for estimates on one image, got {len(x)}")
        estimate = self.inferer.estimate_diameter(x[0].to(self.device), self.network, method=diameter, mask_settings=self.mask_settings)
        return float(estimate)

    def zoom_for(self, diameter: float) -> float:
        """Factor by which an image with cells of ``diameter`` pixels is resized before the network."""
        return diameter_zoom(self.network, diameter)

    def segment_batch(self, images: torch.Tensor | np.ndarray, diameter: float | str | None = None) -> list[Segmentation]:
        """Segment ``images`` [B, 2, H, W] float32; one :class:`Segmentation` per image, each at
        :meth:`diameter_for` of it (an estimate per image; a batch at one diameter otherwise)."""
        x = _as_images(images).to(self.device)
        diameter = self.requested_diameter(diameter)
        if diameter in ESTIMATED_DIAMETERS:
            # one estimate per image; the search's own segmentation of a whole image is reused (no second run)
            estimated = [self.inferer.predict_estimated(image, self.network, diameter, self.mask_settings) for image in x]
            flows, used = torch.cat([f for f, _ in estimated]), [d for _, d in estimated]
        else:
            flows, used = self.inferer.predict(x, self.network, diameter=self.diameter_for(None, diameter))
        # masks on the flows' device (mmcs_monai.masks: the exported pipeline's code): on a GPU nothing goes back
        # to the host before the masks are made
        flows = flows.float()
        return [
            Segmentation(self.mask_settings.masks(f).cpu().numpy().astype(np.int32, copy=False), f.cpu(), d) for f, d in zip(flows, used)
        ]

    def __call__(self, image: torch.Tensor | np.ndarray, diameter: float | str | None = None) -> Segmentation:
        return self.segment_batch(_as_images(image), diameter)[0]


def _as_images(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``images`` [2, H, W] or [B, 2, H, W], numpy or torch, as a float32 tensor [B, 2, H, W]."""
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images, dtype=torch.float32)
    x = x[None] if x.ndim == 3 else x
    if x.ndim != 4 or x.shape[1] != 2:
        raise ValueError(f"images must be [B, 2, H, W] (cytoplasm, nucleus), got {tuple(x.shape)}")
    return x


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
    return CellSegmenter(network, CellInferer(**inferer_args), masks, diameter)


__all__ = ["CellSegmenter", "Segmentation", "segmenter_from_options"]
