"""The label server's infer task: one 2D image -> instance label TIFF + cell polygons (GeoJSON)."""

from __future__ import annotations

import logging
import tempfile
from typing import Any

import numpy as np
import torch
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from mmcs_monai.data import root_cause
from mmcs_monai.flows import MaskSettings
from mmcs_monai.inference import ROI_SIZE, CellInferer, resolve_diameter
from mmcs_monai.io import InputError, write_labels
from mmcs_monai.label.datastore import UploadRejected
from mmcs_monai.label.geojson import masks_to_geojson
from mmcs_monai.label.model import ServedModel
from mmcs_monai.segmentation import CellSegmenter
from mmcs_monai.transforms import inference_preprocessing

logger = logging.getLogger(__name__)

# request parameters a client may set per call (``params`` of POST /infer/mmcs), with their defaults
INFER_PARAMETERS: dict[str, Any] = {
    "diameter": "auto",  # pixels, a stored subset name, "auto" (estimated per image) or "stored" (the model's mean)
    "cyto_channel": None,  # channel of a multi-channel image to use as cytoplasm (None: mean of channels)
    "nucleus_channel": None,  # channel holding nuclei (None: no nucleus channel)
    # the library's defaults (MaskSettings); listed so /info/ shows every setting with its value
    "flow_threshold": MaskSettings.flow_threshold,
    "cellprob_threshold": MaskSettings.cellprob_threshold,
    "min_size": MaskSettings.min_size,
    "geojson": True,  # cell polygons in the result JSON
}


def input_problem(error: BaseException) -> str:
    """The first :class:`InputError`'s problem in ``error``'s chain (MONAI wraps transform errors), else the root cause."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, InputError):
            return cause.problem
        cause = cause.__cause__ or cause.__context__
    return str(root_cause(error))


def _optional_int(value: Any) -> int | None:
    return None if value in (None, "", "none", "None") else int(value)


class CellInferTask(InferTask):
    """Segment cells in a 2D microscopy image with the served model.

    Request (MONAI Label passes the datastore image's path as ``image``; any key of
    :data:`INFER_PARAMETERS` may be given in ``params``) -> ``(label TIFF path, result JSON)``.
    The TIFF holds uint16 instance ids 1..N at the image's size. The JSON holds ``cells`` (N),
    ``diameter`` (pixels used), ``model`` (file and time it was last replaced), ``shape`` [H, W] and, unless
    ``geojson`` is false, ``geojson``: a FeatureCollection of one polygon per cell (QuPath coordinates).

    Args:
        model: the served model (reloaded when training replaces it).
        defaults: server-wide values for :data:`INFER_PARAMETERS` (``--conf diameter 17`` ...).
        precision: network precision (``auto``: bf16 where the device computes it natively).
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
            values[key] = _optional_int(values[key])
        return values

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        path = request["image"]
        values = self.settings(request)
        try:
            item = inference_preprocessing("image", values["cyto_channel"], values["nucleus_channel"])({"image": path})
        except Exception as err:
            name = repr(request["image_id"]) if "image_id" in request else "(uploaded file)"
            raise UploadRejected(400, f"image {name} cannot be segmented: {input_problem(err)}") from err
        network = self.model.network()
        try:
            diameter = values["diameter"]
            resolve_diameter(network, diameter)
            settings = MaskSettings.from_options(
                flow_threshold=values["flow_threshold"], cellprob_threshold=values["cellprob_threshold"], min_size=values["min_size"]
            )
        except ValueError as err:
            raise UploadRejected(400, str(err)) from err
        # one segmenter per request: nothing of this request is kept on objects the next one uses
        segmentation = CellSegmenter(network, self.inferer, settings)(torch.as_tensor(item["image"]), diameter=diameter)
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
