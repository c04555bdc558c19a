"""Tiled CPnet inference at the model's cell diameter.

:class:`CellInferer` is a MONAI ``Inferer``: trainers' validation, the bundle's inference config, the
CLI and the apps all call it, so there is one prediction path. It resizes the image so cells reach
the network's training diameter, runs MONAI's sliding-window inferer (overlapping tiles blended with
Gaussian weights), and resizes the flows back to the input's size. Precision and compile policy live in
:mod:`mmcs_monai.precision`.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import Inferer, SlidingWindowInferer

from mmcs_monai import size_estimate
from mmcs_monai.diameters import DEFAULT_TARGET_DIAMETER, median_diameter, scale_to_target
from mmcs_monai.flows import MaskSettings
from mmcs_monai.networks.compiled import compiled_forward
from mmcs_monai.networks.quantized import int8_unavailable, quantized_forward
from mmcs_monai.options import parse_micrometres
from mmcs_monai.pipeline import fitted_tile
from mmcs_monai.precision import (
    autocast_context,
    parse_compile,
    resolve_channels_last,
    resolve_compile,
    resolve_precision,
    to_channels_last,
)
from mmcs_monai.size_estimate import DiameterSearch

# Tiling defaults (network pixels), written once: configs, the apps and the command line refer to these.
ROI_SIZE = 224
OVERLAP = 0.1
SW_BATCH_SIZE = 8
# each image's tiles shrunk to the smallest that keep the number of windows (CellInferer's fit_tiles): on dev
# val 28% fewer network pixels (1.25 vs 1.73 per image pixel) at the same F1 (0.7221 vs 0.7223) and 1.3x
# faster; larger tiles or less overlap did not win beyond noise (benchmarks/README.md, "Tiling sweep")
FIT_TILES = True

# Where CellInferer's output carries the diameter each image was segmented at (MetaTensor meta).
CELL_DIAMETER_KEY = "cell_diameter"

# Diameters estimated per image from the image itself (see CellInferer.estimate_diameter).
ESTIMATED_DIAMETERS = ("auto", "refine")


def model_diameters(network: torch.nn.Module) -> tuple[float, float]:
    """(diam_mean, diam_labels) of a CPnet: the training target diameter (30 px when the model has none) and the
    training set's mean (``diam_mean`` when the model has none)."""
    diam_mean = float(getattr(network, "diam_mean", torch.tensor(DEFAULT_TARGET_DIAMETER)))
    diam_mean = diam_mean if diam_mean > 0 else DEFAULT_TARGET_DIAMETER
    diam_labels = float(getattr(network, "diam_labels", torch.tensor(diam_mean)))
    return diam_mean, diam_labels if diam_labels > 0 else diam_mean


def _zoomed_size(height: int, width: int, zoom: float) -> tuple[int, int]:
    """The network-scale size of a ``height x width`` image resized by ``zoom`` (at least 1 px a side)."""
    return max(int(round(height * zoom)), 1), max(int(round(width * zoom)), 1)


def diameter_zoom(network: torch.nn.Module, diameter: float) -> float:
    """Factor by which an image with cells of ``diameter`` pixels is resized before ``network``, so its cells
    reach the network's training diameter: the one zoom rule of inference, whole slides and the label tools."""
    return scale_to_target(diameter, model_diameters(network)[0])


def size_network(network: torch.nn.Module, device: torch.device | str | None = None) -> torch.nn.Module | None:
    """The cheaper network the ``auto`` search of ``network`` runs (:meth:`CPnet.attach_size_network`; a model file's
    size network), moved to ``device`` and to eval mode like ``network``; None when ``network`` has none."""
    sizer = getattr(network, "size_network", None)
    if sizer is None:
        return None
    weight = next(iter(sizer.parameters()), None)
    if device is not None and weight is not None and weight.device != torch.device(device):
        sizer.to(device)
    return sizer.train(network.training)


def resolve_diameter(network: torch.nn.Module, diameter: float | str | None) -> float:
    """Cell diameter (pixels) meant by ``diameter``: a number, None/``"stored"`` (the stored mean; also the
    starting point of ``"auto"``/``"refine"``) or a subset name.

    Raises:
        ValueError: a name the model has no stored diameter for (the message lists the stored ones).
    """
    if diameter is None or diameter == "stored" or diameter in ESTIMATED_DIAMETERS:
        return model_diameters(network)[1]
    if isinstance(diameter, str):
        try:
            return float(diameter)
        except ValueError:
            pass
        if parse_micrometres(diameter) is not None:
            raise ValueError(
                f"diameter {diameter!r} is in micrometres: it needs each image's pixel size (mmcs infer and infer-slide convert it)"
            )
        # the table, not ``diameter_for``: TorchScript models carry it too, and raise no KeyError
        stored = dict(getattr(network, "subset_diameters", None) or {})
        if diameter not in stored:
            known = ", ".join(sorted(stored)) or "none (train with subsets to store them)"
            raise ValueError(f"diameter {diameter!r}: not a number, and no stored diameter for that subset; stored subsets: {known}")
        return float(stored[diameter])
    if not float(diameter) > 0:
        raise ValueError(f"diameter must be positive, got {diameter}")
    return float(diameter)


class CellInferer(Inferer):
    """Predict flows for whole images with a CPnet, at the right scale, tile by tile.

    Stateless between calls (a server may share one across requests): the diameter used for each
    image comes back from :meth:`predict`, not through an attribute.

    Args:
        roi_size: tile size (pixels, at network scale).
        overlap: fraction of a tile that overlaps its neighbour.
        sw_batch_size: tiles per network call.
        diameter: cell diameter in the input images: a number (pixels); None for the model's stored
            training-set mean (``diam_labels``); the name of a training subset whose diameter the
            model stored (``network.subset_diameters``); ``"auto"``: estimated per image by a
            multi-scale search (:mod:`mmcs_monai.size_estimate`, cells 0.25x-4x the stored mean; run by the
            network's size network where it has one, :func:`size_network`), then segmented at that size;
            ``"refine"``: segment once at the stored mean, measure the cells found and segment again at their
            median diameter (only for cells near the training size).
        precision: ``auto`` (bf16 where the device has native bf16, else fp32), ``fp32``, ``bf16``
            (CPU/GPU autocast) or ``fp16`` (GPU).
        channels_last: run the network in channels-last memory layout; None: on in bf16 and on a CPU
            (:func:`~mmcs_monai.precision.resolve_channels_last`: faster there in fp32 too).
        mask_settings: thresholds of the masks that ``auto``/``refine`` measure when the inferer is called on its
            own (an engine's evaluator; default :class:`MaskSettings`()). A
            :class:`~mmcs_monai.segmentation.CellSegmenter` passes its own to :meth:`estimate_diameter` instead.
        search: settings of the ``auto`` search (default :class:`~mmcs_monai.size_estimate.DiameterSearch`()).
        compile: run the network compiled (:mod:`mmcs_monai.networks.compiled`: inductor, once per process
            and network; falls back to eager with one log line where it cannot): True, False, or ``"auto"``,
            which compiles only once :meth:`for_workload` (slides, folder inference) finds the job large
            enough to repay the compile; a bare ``"auto"`` inferer runs eagerly.
        fit_tiles: shrink the tiles of each image to the smallest that keep the number of windows of
            ``roi_size`` tiles (:func:`fitted_tile`), so fewer pixels are computed twice.

    Call: ``inferer(images [B, 2, H, W] float32, network, diameter=None) -> flows [B, 3, H, W] float32``
    (dY, dX as the network scales them, cell probability logit), at the input's H, W; ``diameter``
    overrides the constructor's for this call.
    """

    def __init__(
        self,
        roi_size: int = ROI_SIZE,
        overlap: float = OVERLAP,
        sw_batch_size: int = SW_BATCH_SIZE,
        diameter: float | str | None = None,
        precision: str = "auto",
        channels_last: bool | None = None,
        mask_settings: MaskSettings | None = None,
        search: DiameterSearch | None = None,
        compile: bool | str = "auto",
        fit_tiles: bool = FIT_TILES,
    ):
        super().__init__()
        self.search = search or DiameterSearch()
        resolve_precision(precision, "cpu")  # validates the name early
        self.compile = parse_compile(compile)
        self.fit_tiles = bool(fit_tiles)
        self.diameter = diameter
        self.precision = precision
        self.channels_last = channels_last
        self.mask_settings = mask_settings
        self.roi_size = roi_size
        self.overlap = overlap
        self.sw_batch_size = sw_batch_size

    def for_workload(
        self,
        megapixels: float | None = None,
        images: Any = None,
        device: torch.device | str = "cpu",
        network: torch.nn.Module | None = None,
    ) -> CellInferer:
        """This inferer, or a copy whose ``compile="auto"`` is decided (:func:`resolve_compile`) for a job of
        ``megapixels`` image megapixels (else counted from ``images``, a data list) on ``device``, for ``network``
        (an int8 network is never compiled)."""
        if self.compile != "auto":
            return self
        inferer = copy.copy(self)
        precision = resolve_precision(self.precision, device, network)
        inferer.compile = resolve_compile("auto", device, images=images, megapixels=megapixels, precision=precision)
        return inferer

    def warm_up(self, network: torch.nn.Module) -> float:
        """Run ``network`` once on a blank image of two tiles, on its device, as :meth:`predict` would: with
        ``compile`` on this compiles the one graph every batch of 2+ tiles and tile size uses (a single tile
        runs eagerly) before any real image waits for it. Returns the seconds it took."""
        device = next(iter(network.parameters()), torch.empty(0)).device
        start = time.perf_counter()
        self._run(torch.zeros(1, 2, self.roi_size, 2 * self.roi_size, device=device), network)
        return time.perf_counter() - start

    def tile_shape(self, height: int, width: int) -> tuple[int, int]:
        """The tile (network pixels) an image of ``height`` x ``width`` network pixels is cut into."""
        if self.fit_tiles:
            return tuple(fitted_tile(size, self.roi_size, self.overlap) for size in (height, width))
        return tuple(min(self.roi_size, -(-size // 16) * 16) for size in (height, width))

    def _window(self, height: int, width: int) -> SlidingWindowInferer:
        """Sliding-window inferer whose tiles are no larger than the image (rounded up to 16 px)."""
        roi = self.tile_shape(height, width)
        return SlidingWindowInferer(
            roi_size=roi, sw_batch_size=self.sw_batch_size, overlap=self.overlap, mode="gaussian", padding_mode="constant"
        )

    def zoom_for(self, network: torch.nn.Module, diameter: float | str | None = None) -> float:
        """Factor by which input images are resized before the network (``auto`` counts as the stored mean)."""
        return diameter_zoom(network, resolve_diameter(network, diameter if diameter is not None else self.diameter))

    def __call__(
        self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, diameter: float | str | None = None, **kwargs
    ) -> MetaTensor:
        """Flows as :meth:`predict` gives them, as a batch ``MetaTensor`` whose ``meta["cell_diameter"]`` holds the
        diameter (pixels) each image was segmented at, so engines' decollated outputs carry it per image."""
        flows, used = self.predict(inputs, network, *args, diameter=diameter, **kwargs)
        out = MetaTensor(flows, meta={CELL_DIAMETER_KEY: torch.tensor(used, dtype=torch.float32)})
        out.is_batch = True
        return out

    def predict(
        self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, diameter: float | str | None = None, **kwargs
    ) -> tuple[torch.Tensor, list[float]]:
        """Flows ``[B, 3, H, W]`` float32 and the cell diameter (pixels) each image was segmented at.

        With ``auto`` or ``refine``, an image where the estimate finds no cell keeps the stored diameter. ``diameter``
        may also be a list with one diameter (pixels) per image.
        """
        diameter = diameter if diameter is not None else self.diameter
        if isinstance(diameter, (list, tuple)):
            if len(diameter) != len(inputs):
                raise ValueError(f"{len(diameter)} diameters for {len(inputs)} images")
            outputs = [
                self._predict(image, network, resolve_diameter(network, d), *args, **kwargs) for image, d in zip(inputs.split(1), diameter)
            ]
            return torch.cat(outputs), [resolve_diameter(network, d) for d in diameter]
        if diameter not in ESTIMATED_DIAMETERS:
            used = resolve_diameter(network, diameter)
            return self._predict(inputs, network, used, *args, **kwargs), [used] * len(inputs)
        outputs, used = [], []
        for image in inputs.split(1):
            flows, estimate = self.predict_estimated(image[0], network, method=diameter)
            used.append(estimate)
            outputs.append(flows)
        return torch.cat(outputs), used

    def predict_estimated(
        self, image: torch.Tensor, network: torch.nn.Module, method: str = "auto", mask_settings: MaskSettings | None = None
    ) -> tuple[torch.Tensor, float]:
        """Flows ``[1, 3, H, W]`` float32 of one image ``[2, H, W]`` at the diameter :meth:`estimate_diameter` finds,
        and that diameter (pixels). When the ``auto`` search settled on a segmentation of the whole image
        (:attr:`~mmcs_monai.size_estimate.SizeEstimate.flows`), that segmentation is the answer: the image is not
        run through the network again."""
        found = self._estimate(image, network, method, mask_settings)
        height, width = image.shape[-2:]
        zoom = diameter_zoom(network, found.diameter)
        if found.flows is not None and tuple(found.flows.shape[-2:]) == _zoomed_size(height, width, zoom):
            flows = found.flows[None].to(image.device)
            if flows.shape[-2:] != (height, width):
                flows = F.interpolate(flows, size=(height, width), mode="bilinear", align_corners=False)
            return flows.contiguous(), found.diameter
        return self._predict(image[None], network, found.diameter), found.diameter

    def estimate_diameter(
        self, image: torch.Tensor, network: torch.nn.Module, method: str = "auto", mask_settings: MaskSettings | None = None
    ) -> float:
        """Cell diameter (pixels) of one image ``[2, H, W]`` float32, estimated with ``network``.

        ``auto``: the multi-scale search of :func:`~mmcs_monai.size_estimate.estimate_diameter` (works from
        any starting size, 0.25x-4x the stored mean). ``refine``: segment the whole image at the stored
        mean, measure the cells found (the stored mean when none), which works only for cells near the
        training size. Both measure masks made with ``mask_settings`` (default: the inferer's, else
        :class:`MaskSettings`()).
        """
        return self._estimate(image, network, method, mask_settings).diameter

    def _estimate(
        self, image: torch.Tensor, network: torch.nn.Module, method: str, mask_settings: MaskSettings | None
    ) -> size_estimate.SizeEstimate:
        settings = mask_settings or self.mask_settings or MaskSettings()
        stored = resolve_diameter(network, None)
        if method == "refine":
            first = self._predict(image[None], network, stored)
            measured = median_diameter(settings.masks(first[0].cpu().numpy()))
            return size_estimate.SizeEstimate(measured if measured > 0 else stored, [])
        if method != "auto":
            raise ValueError(f"unknown diameter estimate {method!r}; use one of {', '.join(ESTIMATED_DIAMETERS)}")
        # the model file's size network, where it has one, runs the search (eager: a compile of its own would cost more
        # than the search it speeds up); only ``network`` segments, so a segmentation the search settled on is not kept
        sizer = size_network(network, image.device)
        searcher = network if sizer is None else sizer
        # ``int8`` asked for by name: a size network without a calibration of its own (none ships: at the search's
        # small tiles int8 gains nothing) searches in fp32 rather than failing the segmentation
        precision = None
        if sizer is not None and self.precision == "int8":
            precision = "int8" if int8_unavailable(sizer, image.device) is None else "fp32"
        found = size_estimate.search_diameter(
            image,
            lambda x: self._run(x, searcher, compiled=sizer is None, precision=precision),
            settings.masks,
            stored,
            model_diameters(searcher)[0],
            self.search,
            settings.cellprob_threshold,
        )
        return found if sizer is None else size_estimate.SizeEstimate(found.diameter, found.candidates)

    def _predict(self, inputs: torch.Tensor, network: torch.nn.Module, diameter: float, *args: Any, **kwargs) -> torch.Tensor:
        """Flows at the inputs' size for cells of ``diameter`` pixels: resize, run tile by tile, resize back."""
        height, width = inputs.shape[-2:]
        zoom = diameter_zoom(network, diameter)
        x = torch.as_tensor(inputs, dtype=torch.float32)
        if abs(zoom - 1.0) > 1e-3:
            x = F.interpolate(x, size=_zoomed_size(height, width, zoom), mode="bilinear", align_corners=False)
        flows = self._run(x, network, *args, **kwargs)
        if flows.shape[-2:] != (height, width):
            flows = F.interpolate(flows, size=(height, width), mode="bilinear", align_corners=False)
        return flows.contiguous()

    def _run(
        self, x: torch.Tensor, network: torch.nn.Module, *args: Any, compiled: bool = True, precision: str | None = None, **kwargs
    ) -> torch.Tensor:
        """The network on ``x`` [B, 2, h, w] at network scale, tile by tile, in the inferer's precision (or ``precision``)
        -> float32 flows (``compiled=False``: eager whatever the inferer's ``compile``). In ``int8``
        (:mod:`mmcs_monai.networks.quantized`) the quantized network runs, never compiled; where it cannot, ``auto``
        runs fp32 (logged once) and an explicit ``int8`` raises."""
        asked = precision or self.precision
        precision = resolve_precision(asked, x.device, network)
        if precision == "int8":
            forward = None if args or kwargs else quantized_forward(network, x.device, strict=asked == "int8")
            if forward is not None:
                with torch.no_grad():
                    flows = self._window(*x.shape[-2:])(x, forward)
                return torch.as_tensor(flows).float()
            precision = "fp32"
        channels_last = resolve_channels_last(self.channels_last, x.device, precision)
        if channels_last:
            to_channels_last(network)
            x = x.contiguous(memory_format=torch.channels_last)
        forward = network
        if compiled and self.compile is True and not args and not kwargs:
            forward = compiled_forward(network, x.device, precision, channels_last) or network
        with torch.no_grad(), autocast_context(x.device, precision):
            flows = self._window(*x.shape[-2:])(x, forward, *args, **kwargs)
        return torch.as_tensor(flows).float()
