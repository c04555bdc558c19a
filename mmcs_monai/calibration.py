"""Calibrating a model for int8 inference: the tiles inference feeds its networks, recorded on sample images, and the
calibration files written beside the model file (:mod:`mmcs_monai.networks.quantized`).

``mmcs calibrate MODEL DATA`` runs :func:`calibrate_model`: it segments a sample of ``DATA`` (a few images of each
subset) the way ``mmcs infer`` does, in fp32, records every tile batch the model sees (the final run at the size
found; the search's crops too where the model has no size network), measures its activation ranges on
them and writes ``<stem>.int8.json``. ``precision auto`` then runs that model in int8 on a CPU with AVX-512 VNNI and
no native bf16.
"""

from __future__ import annotations

import logging
import os
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mmcs_monai.networks import load_model
from mmcs_monai.networks.quantized import calibrate, calibration_file, write_calibration
from mmcs_monai.segmentation import CellSegmenter, segmenter_from_options

__all__ = ["calibrate_model", "record_tiles", "sample_items"]

logger = logging.getLogger(__name__)


def sample_items(items: Sequence[dict[str, Any]], per_subset: int, seed: int = 0) -> list[dict[str, Any]]:
    """Up to ``per_subset`` items of each ``subset`` (items without one form one subset), drawn with ``seed``, in the
    data list's order: every modality the model serves weighs alike in the ranges measured."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        groups[str(item.get("subset") or "")].append(index)
    rng = random.Random(seed)
    chosen = sorted(i for indices in groups.values() for i in rng.sample(indices, min(per_subset, len(indices))))
    return [items[i] for i in chosen]


def record_tiles(segmenter: CellSegmenter, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Segment each of ``images`` (``[2, H, W]`` float32, preprocessed as for inference) with ``segmenter`` and return
    every tile batch (``[B, 2, h, w]`` float32) its network saw (the size search's, where it runs on a size network of
    its own, are not its network's)."""
    seen: list[torch.Tensor] = []
    hook = segmenter.network.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().float().contiguous().cpu()))
    try:
        for image in images:
            segmenter(image)
    finally:
        hook.remove()
    return seen


def calibrate_model(
    model: str | os.PathLike,
    items: Sequence[dict[str, Any]],
    diameter: float | str = "auto",
    per_subset: int = 8,
    seed: int = 0,
) -> Path:
    """Calibrate the model file ``model`` for int8 on a sample of ``items`` (a data list:
    :func:`~mmcs_monai.data.load_datalist`), segmented at ``diameter`` in fp32; write the calibration beside the model
    file (:func:`~mmcs_monai.networks.quantized.calibration_file`; temporary file, then rename) and return its path.

    A size network is not calibrated: at the search's small tiles (4 x 144 px) int8 runs no faster than fp32 (2-core
    AVX2 CPU), and the sizes it measured moved (benchmarks/README.md, "0.4.6").

    Raises:
        InputError: a model file or image that cannot be used (naming it).
        ValueError: no images.
    """
    from mmcs_monai.transforms import inference_preprocessing

    model = Path(model)
    sample = sample_items(items, per_subset, seed)
    if not sample:
        raise ValueError("calibrating needs at least one image")
    network = load_model(model)
    segmenter = segmenter_from_options(network, diameter=diameter, precision="fp32", compile=False)
    preprocess = inference_preprocessing()
    images = [torch.as_tensor(preprocess(dict(item))["image"], dtype=torch.float32) for item in sample]
    calibration = calibrate(network, record_tiles(segmenter, images))
    calibration["images"] = len(sample)
    path = write_calibration(calibration_file(model), calibration)
    logger.info("%s: int8 calibration of %s from %d tiles of %d images", path, model.name, calibration["tiles"], len(sample))
    return path
