"""The label server's infer task: one 2D image -> instance label TIFF + cell polygons (GeoJSON).

:meth:`CellInferTask.infer_region` answers MONAI Label's WSI endpoints (``/infer/wsi/...``, ``/infer/wsi_v2/...``),
which QuPath's extension calls: a region of the image -> ASAP XML (or DSA JSON) cell polygons.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from typing import Any

import numpy as np
import torch
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from mmcs_monai.data import root_cause
from mmcs_monai.flows import MaskSettings
from mmcs_monai.inference import ROI_SIZE, CellInferer, resolve_diameter
from mmcs_monai.io import InputError, atomic_path, exception_chain, write_labels
from mmcs_monai.label.asap import cells_to_asap, cells_to_dsa, region_cells
from mmcs_monai.label.datastore import UploadRejected
from mmcs_monai.label.geojson import masks_to_geojson
from mmcs_monai.label.model import ServedModel
from mmcs_monai.segmentation import CellSegmenter, Segmentation
from mmcs_monai.transforms import inference_preprocessing

logger = logging.getLogger(__name__)

# request parameters a client may set per call (``params`` of POST /infer/mmcs), with their defaults
INFER_PARAMETERS: dict[str, Any] = {
    "diameter": "auto",  # pixels, a stored subset name, "auto" (estimated per image) or "stored" (the model's mean)
    # -1 (or null): none chosen; /info/ shows -1 because clients (QuPath's dialogs) cannot show a null
    "cyto_channel": -1,  # channel of a multi-channel image to use as cytoplasm (-1: mean of channels)
    "nucleus_channel": -1,  # channel holding nuclei (-1: no nucleus channel)
    # the library's defaults (MaskSettings); listed so /info/ shows every setting with its value
    "flow_threshold": MaskSettings.flow_threshold,
    "cellprob_threshold": MaskSettings.cellprob_threshold,
    "min_size": MaskSettings.min_size,
    "geojson": True,  # cell polygons in the result JSON
}


def input_problem(error: BaseException) -> str:
    """The first :class:`InputError`'s problem in ``error``'s chain (MONAI wraps transform errors), else the root cause."""
    found = [e for e in exception_chain(error) if isinstance(e, InputError)]
    return found[0].problem if found else str(root_cause(error))


# WSI requests (QuPath): output formats and the largest region segmented in one request, pixels
REGION_OUTPUTS = ("asap", "dsa", "json")
MAX_REGION_PIXELS = 8192 * 8192


def _optional_int(value: Any) -> int | None:
    """A channel index, None for "none chosen" (None, "", "none", or a negative number)."""
    if value in (None, "", "none", "None"):
        return None
    number = int(value)
    return None if number < 0 else number


def _pair(value: Any, name: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in value)
    except (TypeError, ValueError) as err:
        raise UploadRejected(400, f"{name} {value!r}: give two integers [x, y] / [w, h]") from err
    return a, b


def region_box(location: Any, size: Any, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """The requested region ``(x, y, w, h)`` clipped to an image of ``shape`` (H, W); size [0, 0] = whole image.

    Raises:
        UploadRejected: 400 when the values are not integer pairs or the region misses the image.
    """
    x, y = _pair(location, "location")
    w, h = _pair(size, "size")
    height, width = shape
    if w <= 0 and h <= 0:
        return 0, 0, width, height
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + max(w, 0), width), min(y + max(h, 0), height)
    if x1 <= x0 or y1 <= y0:
        raise UploadRejected(400, f"region location {[x, y]} size {[w, h]} lies outside the image ({width} x {height} pixels)")
    return x0, y0, x1 - x0, y1 - y0


class CellInferTask(InferTask):
    """Segment cells in a 2D microscopy image with the served model.

    Request (MONAI Label passes the datastore image's path as ``image``; any key of
    :data:`INFER_PARAMETERS` may be given in ``params``) -> ``(label TIFF path, result JSON)``.
    The TIFF holds uint16 instance ids 1..N at the image's size. The JSON holds ``cells`` (N),
    ``diameter`` (pixels used), ``model`` (file and time it was last replaced), ``shape`` [H, W] and, unless
    ``geojson`` is false, ``geojson``: a FeatureCollection of one polygon per cell (QuPath's pixel frame,
    :mod:`mmcs_monai.label.geojson`).

    Args:
        model: the served model (reloaded when training replaces it).
        defaults: server-wide values for :data:`INFER_PARAMETERS` (``--conf diameter 17`` ...).
        precision: network precision (``auto``: bf16 where the device computes it natively, int8 on AVX-512 VNNI CPUs
            for a calibrated model: :func:`~mmcs_monai.precision.resolve_precision`).
        roi_size: tile size at network scale.
    """

    def __init__(self, model: ServedModel, defaults: dict[str, Any] | None = None, precision: str = "auto", roi_size: int = ROI_SIZE):
        config = {**INFER_PARAMETERS, **(defaults or {})}
        super().__init__(
            type=InferType.SEGMENTATION,
            labels={"cell": 1},
            dimension=2,
            description="Cell instance segmentation (CPnet flows, MMCS); returns a label TIFF and cell polygons",
            config=config,
        )
        self.model = model
        self.inferer = CellInferer(roi_size=roi_size, precision=precision)

    def is_valid(self) -> bool:
        return self.model.path.is_file()

    def info(self) -> dict[str, Any]:
        return {**super().info(), "model": self.model.describe()}

    def settings(self, request: dict[str, Any]) -> dict[str, Any]:
        """The request's values for :data:`INFER_PARAMETERS`, falling back to the server's."""
        values = {k: request.get(k, self._config[k]) for k in INFER_PARAMETERS}
        for key in ("cyto_channel", "nucleus_channel"):
            try:
                values[key] = _optional_int(values[key])
            except (TypeError, ValueError) as err:
                raise UploadRejected(400, f"{key} {values[key]!r}: give a channel index (-1 or none: no channel)") from err
        return values

    def load(self, request: dict[str, Any], values: dict[str, Any]) -> torch.Tensor:
        """The request's image as the network input ``[2, H, W]`` float32 (cytoplasm, nucleus).

        Raises:
            UploadRejected: 400 naming the image and the problem (undecodable, bad channel...).
        """
        try:
            item = inference_preprocessing("image", values["cyto_channel"], values["nucleus_channel"])({"image": request["image"]})
        except Exception as err:
            name = repr(request["image_id"]) if "image_id" in request else "(uploaded file)"
            raise UploadRejected(400, f"image {name} cannot be segmented: {input_problem(err)}") from err
        return torch.as_tensor(item["image"])

    def segmenter(self, values: dict[str, Any]) -> tuple[CellSegmenter, Any]:
        """A segmenter for this request alone, and its checked diameter option.

        Raises:
            UploadRejected: 400 for a bad diameter or threshold.
        """
        network = self.model.network()
        try:
            diameter = values["diameter"]
            resolve_diameter(network, diameter)
            settings = MaskSettings.from_options(
                flow_threshold=values["flow_threshold"], cellprob_threshold=values["cellprob_threshold"], min_size=values["min_size"]
            )
        except (TypeError, ValueError) as err:
            raise UploadRejected(400, str(err)) from err
        # one segmenter per request: nothing of this request is kept on objects the next one uses
        return CellSegmenter(network, self.inferer, settings), diameter

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        path = request["image"]
        values = self.settings(request)
        image = self.load(request, values)
        segmenter, diameter = self.segmenter(values)
        segmentation = segmenter(image, diameter=diameter)
        masks, used = segmentation.masks, segmentation.diameter
        result_file = tempfile.NamedTemporaryFile(suffix=".tif", delete=False).name
        write_labels(result_file, masks)
        result = {
            "cells": int(masks.max()),
            "diameter": round(float(used), 2),
            "shape": list(masks.shape),
            "model": self.model.describe(),
        }
        if str(values["geojson"]).lower() not in ("false", "0", "no"):
            result["geojson"] = masks_to_geojson(np.asarray(masks))
        logger.info("segmented %s: %d cells at diameter %.1f", path, result["cells"], used)
        return result_file, result

    def segment_region(
        self, image: torch.Tensor, region: tuple[int, int, int, int], values: dict[str, Any]
    ) -> tuple[Segmentation, tuple[int, int]]:
        """Segment ``region`` ``(x, y, w, h)`` of ``image`` ``[2, H, W]`` with a margin of one cell diameter around it.

        The diameter (``auto``: estimated on the region itself) sets the margin, so that a cell whose centroid
        lies in the region is segmented whole. Returns the segmentation of the padded crop and the crop's
        ``(x, y)`` origin in the image.
        """
        segmenter, diameter = self.segmenter(values)
        x, y, w, h = region
        height, width = image.shape[-2:]
        used = segmenter.diameter_for(image[:, y : y + h, x : x + w], diameter)  # auto: estimated on the region
        margin = int(math.ceil(used))
        x0, y0 = max(x - margin, 0), max(y - margin, 0)
        x1, y1 = min(x + w + margin, width), min(y + h + margin, height)
        return segmenter(image[:, y0:y1, x0:x1], diameter=used), (x0, y0)

    def infer_region(self, request: dict[str, Any]) -> dict[str, Any]:
        """MONAI Label's WSI inference for QuPath: the cells of one region of a 2D image, as polygons.

        Request keys (MONAI Label's ``WSIInput`` merged with ``params``): ``image`` (path), ``output``
        (``asap``: ASAP XML, QuPath's format; ``dsa``: DSA JSON; ``json``: the summary only), ``level`` (0:
        these images have one resolution), ``location`` [x, y] and ``size`` [w, h] of the region in image
        pixels ([0, 0] or absent: the whole image), ``min_poly_area`` (pixels^2; smaller polygons are
        dropped), and any key of :data:`INFER_PARAMETERS`. Cells whose centroid lies in the region are
        returned whole, in the image's pixel frame (QuPath adds its own offset for an uploaded patch): pixel
        ``(row, col)`` covers ``[col, col + 1) x [row, row + 1)`` and outlines run along pixel edges.

        Returns:
            ``{"file": polygons file (None for json), "params": summary}``: ``cells``, ``diameter``, ``region``
            [x, y, w, h], ``shape``, ``format``, ``model``.

        Raises:
            UploadRejected: 400 for a bad level, region, output or parameter.
        """
        output = request.get("output") or "asap"
        if output not in REGION_OUTPUTS:
            raise UploadRejected(400, f"output {output!r}: use one of {', '.join(REGION_OUTPUTS)}")
        try:
            level = int(request.get("level") or 0)
            min_area = float(request.get("min_poly_area") or 0)
        except (TypeError, ValueError) as err:
            raise UploadRejected(400, f"level and min_poly_area must be numbers ({err})") from err
        if level != 0:
            raise UploadRejected(400, f"level {level}: these images have one resolution level, use level 0")
        values = self.settings(request)
        image = self.load(request, values)
        region = region_box(request.get("location") or [0, 0], request.get("size") or [0, 0], tuple(image.shape[-2:]))
        if region[2] * region[3] > MAX_REGION_PIXELS:
            raise UploadRejected(
                413, f"region of {region[2]} x {region[3]} pixels is larger than {MAX_REGION_PIXELS} pixels: draw a smaller one"
            )
        segmentation, origin = self.segment_region(image, region, values)
        cells = region_cells(segmentation.masks, region, min_area, offset=origin)
        summary = {
            "cells": len(cells),
            "diameter": round(float(segmentation.diameter), 2),
            "region": list(region),
            "shape": list(image.shape[-2:]),
            "format": output,
            "model": self.model.describe(),
        }
        logger.info("segmented region %s of %s: %d cells at diameter %.1f", region, request["image"], len(cells), segmentation.diameter)
        if output == "json":
            return {"file": None, "params": summary}
        name = request.get("image_id") or "uploaded image"
        text = cells_to_asap(cells) if output == "asap" else cells_to_dsa(cells, f"mmcs cells: {name}")
        fd, path = tempfile.mkstemp(suffix=".xml" if output == "asap" else ".json")
        os.close(fd)
        with atomic_path(path) as tmp:
            tmp.write_text(text)
        return {"file": path, "params": summary}
