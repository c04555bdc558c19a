"""Batch preparation for the engines, running an evaluator over a data list that may be empty, the bare network
inside a DDP wrapper, and atomic ``torch.save``."""

from __future__ import annotations

import logging
from collections.abc import Sized
from pathlib import Path
from typing import Any

import torch
from monai.engines.utils import PrepareBatch
from monai.handlers import ValidationHandler

from mmcs_monai.io import atomic_path

logger = logging.getLogger(__name__)


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The bare network inside DataParallel/DistributedDataParallel wrappers."""
    return getattr(network, "module", network)


def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename: never a half-written file."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


class PrepareFlowBatch(PrepareBatch):
    """Take ``(image, flows)`` from a collated batch dict and move them to ``device``.

    ``image`` is float32 [B, 2, H, W]; ``flows`` (the training target) float32 [B, 3, H, W].
    With ``flag_key`` (semi-supervised batches), the per-sample flag float [B] is appended to the
    target as a fourth channel, broadcast over the image: target [B, 4, H, W].
    """

    def __init__(self, image_key: str = "image", target_key: str = "flows", flag_key: str | None = None):
        self.image_key = image_key
        self.target_key = target_key
        self.flag_key = flag_key

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        def move(x):
            return torch.as_tensor(x).to(device=device, non_blocking=non_blocking, **kwargs)

        image, target = move(batchdata[self.image_key]), move(batchdata[self.target_key])
        if self.flag_key is not None:
            flag = move(batchdata[self.flag_key]).to(target.dtype)
            target = torch.cat([target, flag[:, None, None, None].expand(-1, 1, *target.shape[-2:])], dim=1)
        return image, target


class PrepareImageBatch(PrepareBatch):
    """Take ``image`` (float32 [B, 2, H, W]) from a collated batch dict, moved to ``device``, and hand the inferer each
    image's diameter in pixels when the batch carries one (``diameter_px``: a diameter given in micrometres, turned
    into pixels per image by :class:`~mmcs_monai.transforms.DiameterInPixelsd`): ``(image, None, (), {"diameter": d})``.
    """

    def __init__(self, image_key: str = "image", diameter_key: str = "diameter_px"):
        self.image_key = image_key
        self.diameter_key = diameter_key

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        image = torch.as_tensor(batchdata[self.image_key]).to(device=device, non_blocking=non_blocking, **kwargs)
        if self.diameter_key not in batchdata:
            return image, None
        diameters = [float(d) for d in torch.as_tensor(batchdata[self.diameter_key]).reshape(-1)]
        return image, None, (), {"diameter": diameters[0] if len(set(diameters)) == 1 else diameters}


def run_if_any(engine, datalist: Sized, nothing: str = "nothing to run") -> bool:
    """Run ``engine`` when ``datalist`` holds anything; else log (and print) ``nothing``. Returns whether it ran."""
    if len(datalist):
        engine.run()
        return True
    logger.info(nothing)
    print(nothing)
    return False


def use_handler(handler):
    """Return ``handler`` itself: lets a config list a handler defined under its own key (``"teacher_handler"``,
    which ``"teacher"`` also reads) as a ``{"_target_": ...}`` entry, as model-zoo's checks expect every entry
    of a handler list to be."""
    return handler


class TeacherValidationHandler(ValidationHandler):
    """MONAI's ``ValidationHandler`` for the mean teacher's evaluator in the semi-supervised phase.

    Its own name keeps the trainer's one ``ValidationHandler`` the student's, which is what MONAI's bundle
    property checks (``ConfigWorkflow.check_properties``) read as the training workflow's evaluator.
    """
