"""Operators of the Deploy app: load one image, segment it, write its outputs.

Each operator wraps the library pieces ``mmcs infer`` runs (the bundle's inference config): the same
transforms and :class:`~mmcs_monai.segmentation.CellSegmenter` (tiles, diameter, masks), so the
app's masks equal ``mmcs infer``'s for the same model and settings. A sample travels between operators
as a dict: ``image`` ``[2, H, W]`` float32 (cytoplasm, nucleus), ``id``, ``image_file`` and, after
segmentation, ``masks`` ``[1, H, W]`` int32. A sample that fails carries ``error`` instead and is
reported by the writer, so one bad file does not stop the run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from monai.deploy.core import Fragment, Operator, OperatorSpec

from mmcs_monai.data import BadSampleLog
from mmcs_monai.distributed import local_device
from mmcs_monai.inference import resolve_diameter
from mmcs_monai.io import InputError, image_stem
from mmcs_monai.networks.model_files import load_torchscript
from mmcs_monai.segmentation import segmenter_from_options
from mmcs_monai.transforms import SaveCellOutputsd, inference_preprocessing

logger = logging.getLogger(__name__)


class MicroscopyLoaderOperator(Operator):
    """Emits the next image of ``items`` per call: ``image [2, H, W]`` float32 scaled to its 1-99 percentiles.

    Args:
        fragment: the application.
        items: ``[{"image": path, "id": name}, ...]`` (already screened by ``readable_images``).
        cyto_channel, nucleus_channel: channels of multi-channel images (None: mean of channels, zeros).
    """

    def __init__(self, fragment: Fragment, *args, items: list[dict], cyto_channel=None, nucleus_channel=None, **kwargs):
        self.items = list(items)
        self.index = 0
        self.preprocess = inference_preprocessing("image", cyto_channel, nucleus_channel)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.output("sample")

    def compute(self, op_input, op_output, context):
        item = dict(self.items[self.index])
        self.index += 1
        item["image_file"] = str(item["image"])
        try:
            sample = self.preprocess(item)
        except Exception as err:  # MONAI wraps transform errors; the root cause names the file
            sample = {**item, "error": err}
        op_output.emit(sample, "sample")


class CellSegmentationOperator(Operator):
    """Runs the TorchScript model over each image and turns the flows into instance masks.

    Args:
        fragment: the application.
        model_path: exported model (``.ts``) or a folder holding exactly one.
        device: torch device (default :func:`~mmcs_monai.distributed.local_device`: the GPU if any, else the CPU).
        diameter: cell diameter in the images: pixels, a stored subset name, ``auto`` or None (stored mean).
        precision: ``auto`` (default, as everywhere), ``fp32`` (masks identical to ``mmcs infer --precision fp32``),
            ``bf16``, ``fp16``.
        roi_size: tile size at network scale (None: the library's).
        flow_threshold, cellprob_threshold, min_size: mask post-processing, as in Cellpose (None: the
            library's defaults, :class:`~mmcs_monai.flows.MaskSettings`).
    """

    def __init__(
        self,
        fragment: Fragment,
        *args,
        model_path: str | Path,
        device: str | None = None,
        diameter: float | str | None = None,
        precision: str = "auto",
        roi_size: int | None = None,
        flow_threshold: float | None = None,
        cellprob_threshold: float | None = None,
        min_size: int | None = None,
        **kwargs,
    ):
        self.torch_device = torch.device(device) if device is not None else local_device()
        self.model, self.model_metadata = load_torchscript(model_file(model_path), map_location=self.torch_device)
        resolve_diameter(self.model, diameter)  # an unknown subset name stops the app here, not per image
        self.segmenter = segmenter_from_options(
            self.model,
            diameter,
            roi_size=roi_size,
            precision=precision,
            flow_threshold=flow_threshold,
            cellprob_threshold=cellprob_threshold,
            min_size=min_size,
        )
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("sample")
        spec.output("segmented")

    def compute(self, op_input, op_output, context):
        sample = op_input.receive("sample")
        if "error" not in sample:
            try:
                result = self.segmenter(torch.as_tensor(sample["image"], dtype=torch.float32))
                sample = {**sample, "masks": torch.as_tensor(result.masks)[None], "diameter": result.diameter}
            except Exception as err:
                sample = {**sample, "error": err}
        op_output.emit(sample, "segmented")


class CellOutputWriterOperator(Operator):
    """Writes ``<id>_masks.tif`` (uint16/uint32 labels, ids 1..N) and ``<id>_cells.csv`` per image, atomically.

    Failed samples go to ``bad_samples`` (written as ``bad_samples.csv`` when the app ends).

    Args:
        fragment: the application.
        output_path: destination folder.
        bad_samples: the run's :class:`~mmcs_monai.data.BadSampleLog`.
        overlay: also write ``<id>_overlay.png`` (outlines on the image).
    """

    def __init__(self, fragment: Fragment, *args, output_path: str | Path, bad_samples: BadSampleLog, overlay: bool = False, **kwargs):
        self.output_path = Path(output_path)
        self.bad_samples = bad_samples
        self.save = SaveCellOutputsd(keys="masks", output_dir=str(self.output_path), image_key="image", overlay=overlay, table=True)
        self.written: list[str] = []
        self.summary: list[dict] = []  # one row per image written (segmentation_summary.csv)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("segmented")

    def compute(self, op_input, op_output, context):
        sample = op_input.receive("segmented")
        if "error" in sample:
            self.bad_samples.add(sample, "segmenting", sample["error"])
            logger.warning("skipped %s: %s", sample.get("image_file"), sample["error"])
            return
        sample = self.save(sample)
        self.written.append(sample["masks_file"])
        cells = int(np.count_nonzero(np.unique(np.asarray(sample["masks"]))))
        diameter = round(float(sample["diameter"]), 1)
        self.summary.append(
            {
                "id": sample.get("id", image_stem(str(sample["image_file"]))),
                "image": sample["image_file"],
                "cells": cells,
                "diameter_px": diameter,
            }
        )
        logger.info("%s: %d cells at diameter %.1f px -> %s", sample["image_file"], cells, diameter, sample["masks_file"])


def model_file(path: str | Path) -> Path:
    """The model file ``path`` names: the file itself, or the only ``.ts``/``.pt`` file in a folder.

    Raises:
        InputError: a folder with no model file or several.
    """
    path = Path(path)
    if not path.is_dir():
        return path
    found = sorted(p for p in path.rglob("*") if p.suffix in (".ts", ".pt") and p.is_file())
    if len(found) != 1:
        raise InputError(path, f"model folder must hold exactly one .ts model file, found {[p.name for p in found]}")
    return found[0]
